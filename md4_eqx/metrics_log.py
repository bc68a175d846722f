"""A training run's events: WORKDIR/metrics.jsonl (one JSON object per event), their curves in
WORKDIR/curves.png and, when tensorboardX is installed, TensorBoard scalars in WORKDIR/tb."""

import json
import os
from pathlib import Path

import numpy as np

from md4_eqx.visualize import line_chart


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
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):  # e.g. half a line from a killed run
                    continue
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
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
            f.write(json.dumps(event) + "\n")
        if self.tb is not None:
            for name, value in event.items():
                if name != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(name, value, event["step"])
            self.tb.flush()

    def plot(self) -> None:
        """WORKDIR/curves.png: the training and evaluation bits per token logged so far (a skipped
        step's event, whose values are strings, and any non-finite value are left out)."""
        if not self.enabled:
            return
        events = [json.loads(line) for line in self.path.read_text().splitlines()]
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
