"""Which committed checkpoints to keep: the newest few, the best, every N-th epoch."""

from __future__ import annotations

import dataclasses
import math

from cluster_trainer.errors import JobError


@dataclasses.dataclass(frozen=True)
class Retention:
    """What survives pruning. The newest committed checkpoint is always kept.

    Args:
        keep_last: the newest N committed checkpoints.
        keep_best: a metric of the epoch logs (e.g. "val_loss"): also keep the
            end-of-epoch checkpoint where it was best.
        best_mode: "min" or "max" for `keep_best`.
        keep_every_epochs: also keep the end-of-epoch checkpoint of every N-th epoch.

    Example:
        >>> entries = [{"name": "c", "epoch_end": None, "metrics": None},  # newest first
        ...            {"name": "b", "epoch_end": 2, "metrics": {"val_loss": 0.7}},
        ...            {"name": "a", "epoch_end": 1, "metrics": {"val_loss": 0.5}}]
        >>> sorted(Retention(keep_last=1, keep_best="val_loss").kept(entries))
        ['a', 'c']
    """

    keep_last: int = 3
    keep_best: str | None = None
    best_mode: str = "min"
    keep_every_epochs: int | None = None

    def __post_init__(self):
        if self.keep_last < 1:
            raise JobError(f"keep_last must be >= 1, got {self.keep_last}")
        if self.best_mode not in ("min", "max"):
            raise JobError(f"best_mode must be 'min' or 'max', got {self.best_mode!r}")
        if self.keep_every_epochs is not None and self.keep_every_epochs < 1:
            raise JobError(f"keep_every_epochs must be >= 1 or None, got {self.keep_every_epochs}")

    def kept(self, entries: list[dict]) -> set[str]:
        """Names to keep, given entries newest first: {name, epoch_end (epochs done, or None), metrics}."""
        keep = {e["name"] for e in entries[: self.keep_last]}
        if self.keep_best:
            sign = 1 if self.best_mode == "min" else -1
            scored = [
                (sign * e["metrics"][self.keep_best], i, e["name"])
                for i, e in enumerate(entries)
                if e.get("metrics") and isinstance(e["metrics"].get(self.keep_best), (int, float))
                and not math.isnan(e["metrics"][self.keep_best])
            ]
            if scored:
                keep.add(min(scored)[2])  # ties: the newest
        if self.keep_every_epochs:
            keep |= {e["name"] for e in entries if e.get("epoch_end") and e["epoch_end"] % self.keep_every_epochs == 0}
        return keep
