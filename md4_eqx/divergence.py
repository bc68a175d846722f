"""Divergence: how many non-finite steps in a row a run tolerates before it stops.

The train step itself keeps its state when the loss or the gradient norm is not finite
(`Metrics.skipped`, see `md4_eqx.train_step`). `BadSteps` is the loop's side of it: it turns each
skipped step into an event for the log, and `check` raises `Diverged` after `limit` in a row.
While a streak lasts the loop writes no checkpoint, so the kept ones are from before it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from md4_eqx.errors import Diverged

if TYPE_CHECKING:  # for annotations only: the loop's bookkeeping sits below the train step
    from md4_eqx.train_step import Metrics


class BadSteps:
    """Counts consecutive skipped steps; `observe` once per step, in order."""

    def __init__(self, limit: int):
        self.limit = limit
        self.streak = 0  # consecutive skipped steps up to the last observed one
        self.last: dict = {}  # the event of the last skipped step

    def observe(self, step: int, metrics: Metrics) -> dict | None:
        """None for a good step; for a skipped one, the event to log ({"step", "skipped", ...},
        non-finite values as strings so the log stays plain JSON). Reading `metrics` waits for
        the step to finish."""
        if not bool(metrics.skipped):
            self.streak = 0
            return None
        self.streak += 1
        self.last = {
            "step": step,
            "skipped": self.streak,
            "train_bpt": str(float(metrics.bpt)),
            "grad_norm": str(float(metrics.grad_norm)),
        }
        return self.last

    def check(self) -> None:
        """Raises `Diverged` once `limit` steps in a row were skipped."""
        if self.streak >= self.limit:
            last = self.last
            raise Diverged(
                f"{self.streak} non-finite steps in a row (the last: step {last['step']}, loss "
                f"{last['train_bpt']} bits/token, gradient norm {last['grad_norm']}); the "
                f"checkpoints are from before them"
            )
