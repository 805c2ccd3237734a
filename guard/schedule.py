"""When scheduled scans run: at the start of epoch ``warmup_epochs``, then on the grid every
``scan_every`` epochs, further apart while scans find nothing."""

from __future__ import annotations

from typing import Any


class ScanSchedule:
    """Which epochs are due for a scan, and which have had one (a forced scan counts too).

    Scans fall on the grid ``warmup_epochs + k * scan_every``. A scan that changes nothing (no sample
    quarantined or given back, nothing unlearned) doubles the gap the next scan keeps from it, up to
    ``backoff`` times ``scan_every``; a scan that acts brings the gap back to ``scan_every``. So a run
    whose scans find nothing pays for a few of them rather than one every ``scan_every`` epochs, and a
    run where the guard is finding poison is looked at again soon. ``backoff=1`` keeps a fixed gap.

    >>> s = ScanSchedule(warmup_epochs=3, scan_every=2, backoff=4)
    >>> for e in range(24):
    ...     if s.due(e): s.done(e)              # every scan finds nothing: gaps 4, 8, 8
    >>> sorted(s.scanned)
    [3, 7, 15, 23]
    >>> s = ScanSchedule(warmup_epochs=3, scan_every=2, backoff=4)
    >>> s.done(3, acted=True); [e for e in range(4, 9) if s.due(e)]
    [5, 7]
    >>> s = ScanSchedule(warmup_epochs=3, scan_every=2)   # backoff=1: every grid epoch, a forced scan or not
    >>> s.done(4); [e for e in range(4, 9) if s.due(e)]
    [5, 7]
    """

    def __init__(self, warmup_epochs: int, scan_every: int, max_scans: int | None = None, backoff: int = 1) -> None:
        self.warmup, self.every, self.max_scans, self.backoff = warmup_epochs, scan_every, max_scans, backoff
        self.scanned: set[int] = set()
        self.acted: set[int] = set()

    def due(self, epoch: int) -> bool:
        if epoch in self.scanned or epoch < self.warmup or (epoch - self.warmup) % self.every:
            return False
        if self.max_scans is not None and len(self.scanned) >= self.max_scans:
            return False
        if self.backoff == 1 or not self.scanned:    # the fixed grid: every grid epoch not yet scanned
            return True
        return epoch - max(self.scanned) >= self.gap()

    def gap(self) -> int:
        """Epochs the next scheduled scan keeps from the last scan: ``scan_every`` doubled for each scan
        since the last one that acted, at most ``backoff`` times."""
        quiet = 0
        for e in sorted(self.scanned, reverse=True):
            if e in self.acted:
                break
            quiet += 1
        return self.every * min(2 ** min(quiet, 30), self.backoff)

    def done(self, epoch: int, acted: bool = False) -> None:
        """Record a scan at ``epoch``; ``acted``: it quarantined, gave back or unlearned something."""
        self.scanned.add(int(epoch))
        if acted:
            self.acted.add(int(epoch))

    def state_dict(self) -> dict[str, Any]:
        return {"scanned_epochs": sorted(self.scanned), "acted_epochs": sorted(self.acted)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scanned = {int(e) for e in state["scanned_epochs"]}
        # a state saved before scans were told apart: every scan counts as acting (the fixed gap it ran with)
        self.acted = {int(e) for e in state.get("acted_epochs", state["scanned_epochs"])}
