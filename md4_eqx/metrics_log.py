"""A training run's events: WORKDIR/metrics.jsonl (one JSON object per event), their curves in
WORKDIR/curves.png and, when tensorboardX is installed, TensorBoard scalars in WORKDIR/tb.

metrics.jsonl is strict JSON, which has no literal for a number that is not finite (a skipped
step's loss, a perplexity bound past the float range). Such a value is written as the string
"nan", "inf" or "-inf" (Python's `str` of the float, which `float` reads back) rather than the bare
`NaN` / `Infinity` that Python's `json` would write and other JSON readers refuse; `read_events`
turns those strings back into floats.
"""

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from md4_eqx.visualize import line_chart

NON_FINITE = ("nan", "inf", "-inf")  # how metrics.jsonl spells the floats JSON has no literal for


class MetricsLog:
    """Only process 0 writes (`enabled`). A resumed run first drops the events after its
    checkpoint's step (the interrupted run logged them, and this run logs them again)."""

    def __init__(self, workdir: Path, resume_step: int | None, enabled: bool):
        self.enabled = enabled
        self.path = workdir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        workdir.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and self.path.exists():
            kept = [e for e in read_events(self.path) if e["step"] <= resume_step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(map(_line, kept)))
        os.replace(tmp, self.path)
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            return
        self.tb = SummaryWriter(str(workdir / "tb"))

    def write(self, **event) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(_line(event))
        if self.tb is not None:
            for name, value in event.items():
                if name != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(name, value, event["step"])
            self.tb.flush()

    def plot(self) -> None:
        """WORKDIR/curves.png: the training and evaluation bits per token logged so far (a skipped
        step's event and any other non-finite value are left out)."""
        if not self.enabled:
            return
        events = read_events(self.path)
        series = {}
        for key, name in (("train_bpt", "train"), ("eval_bpt", "eval (EMA model)")):
            points = np.array(
                [
                    (e["step"], e[key])
                    for e in events
                    if isinstance(e.get(key), float) and np.isfinite(e[key])
                ]
            )
            if points.size:
                series[name] = (points[:, 0], points[:, 1])
        path = self.path.with_name("curves.png")
        line_chart(series, "step", "bits per token").save(
            path.with_suffix(".png.tmp"), format="PNG"
        )
        os.replace(path.with_suffix(".png.tmp"), path)


def _line(event: dict[str, Any]) -> str:
    """One line of metrics.jsonl: `event` as strict JSON, non-finite floats as their strings."""
    plain = {
        name: str(value) if isinstance(value, float) and not math.isfinite(value) else value
        for name, value in event.items()
    }
    return json.dumps(plain, allow_nan=False) + "\n"


def read_events(path: Path) -> list[dict[str, Any]]:
    """The events of a metrics.jsonl, "nan", "inf" and "-inf" read back as floats. A line that is
    not a whole event (the half line a killed run can leave) is left out."""
    events = []
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and "step" in event:
            events.append({k: float(v) if v in NON_FINITE else v for k, v in event.items()})
    return events
