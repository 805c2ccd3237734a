"""When scheduled scans run: at the start of epoch ``warmup_epochs``, then every ``scan_every``."""

from __future__ import annotations

from typing import Any


class ScanSchedule:
    """Which epochs are due for a scan, and which have had one (a forced scan counts too).

    >>> s = ScanSchedule(warmup_epochs=3, scan_every=2)
    >>> [e for e in range(9) if s.due(e)]
    [3, 5, 7]
    >>> s.done(3); s.due(3)
    False
    """

    def __init__(self, warmup_epochs: int, scan_every: int, max_scans: int | None = None) -> None:
        self.warmup, self.every, self.max_scans = warmup_epochs, scan_every, max_scans
        self.scanned: set[int] = set()

    def due(self, epoch: int) -> bool:
        if epoch in self.scanned or epoch < self.warmup or (epoch - self.warmup) % self.every:
            return False
        return self.max_scans is None or len(self.scanned) < self.max_scans

    def done(self, epoch: int) -> None:
        self.scanned.add(int(epoch))

    def state_dict(self) -> dict[str, Any]:
        return {"scanned_epochs": sorted(self.scanned)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scanned = {int(e) for e in state["scanned_epochs"]}
