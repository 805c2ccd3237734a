"""Progress of long passes: a ``tqdm.auto`` bar on a terminal or in a notebook (a widget there),
periodic loguru lines elsewhere (CI logs, files; shown once the guard's log is enabled), so neither
floods a log nor stays silent for minutes. ``GuardConfig(progress=False)`` turns both off."""

from __future__ import annotations

import sys
import time
from types import TracebackType

from loguru import logger


class Progress:
    """``with Progress(total, desc) as p: ... p.update(n)``. Shows nothing for passes under
    ``min_total`` items; off a terminal, logs at most every ``every`` seconds and at the end."""

    def __init__(self, total: int, desc: str, enabled: bool = True, min_total: int = 2000,
                 every: float = 10.0, unit: str = "samples") -> None:
        self.total, self.desc, self.every, self.unit = total, desc, every, unit
        self.on = enabled and total >= min_total
        self.done, self.t0, self.last = 0, time.monotonic(), time.monotonic()
        self.bar = None
        if self.on and (sys.stderr.isatty() or "ipykernel" in sys.modules):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit[:-1] if unit.endswith("s") else unit,
                            leave=False, dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if self.on and (now - self.last > self.every or self.done >= self.total):
            rate = self.done / max(now - self.t0, 1e-9)
            logger.info("{}: {:,}/{:,} {} ({:.0%}), {:.0f} {}/s, eta {:.0f}s", self.desc, self.done, self.total,
                        self.unit, self.done / max(self.total, 1), rate, self.unit,
                        (self.total - self.done) / max(rate, 1e-9))
            self.last = now

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.bar is not None:
            self.bar.close()
