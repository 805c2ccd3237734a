"""What ``scan_backoff`` would have skipped in the guarded runs already recorded, without training again.

A scan that changes nothing leaves the model, the quarantine and the RNG streams as they were
(``hooks.scan_mode``), so a recorded fixed-gap run is, up to its first skipped scan that acted, the
run a sparser schedule gives. Every guarded run under ``benchmarks/results`` whose scans fell on a
fixed grid is replayed through :class:`guard.schedule.ScanSchedule` with ``backoff`` and, optionally,
the gap doubled only after ``patience`` quiet scans in a row; it prints how many scans would run and
every run in which a scan that acted (took or gave back samples, or unlearned) would have been skipped.

    python benchmarks/backoff_replay.py --backoff 4 --patience 1 2 3
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from guard.schedule import ScanSchedule  # noqa: E402


def recorded_runs():
    """``(file, scans)`` of every recorded guarded run with its scans."""
    for f in sorted(glob.glob(str(HERE / "results" / "*.json"))):
        stack = [json.loads(Path(f).read_text())]
        while stack:
            o = stack.pop()
            if isinstance(o, dict):
                sc = o.get("scans")
                if isinstance(sc, list) and sc and isinstance(sc[0], dict) and {"epoch", "new_quarantined"} <= set(sc[0]):
                    yield Path(f).name, sc
                stack.extend(o.values())
            elif isinstance(o, list):
                stack.extend(o)


def acted(scan: dict) -> bool:
    released = scan.get("released") or []
    return bool(scan.get("new_quarantined") or (len(released) if isinstance(released, list) else released)
                or scan.get("remedy_steps"))


def replay(epochs: list[int], act: dict[int, bool], backoff: int, patience: int) -> list[int]:
    """The epochs a schedule with ``backoff`` and ``patience`` scans, given what each recorded scan did."""
    every = epochs[1] - epochs[0]
    s = ScanSchedule(epochs[0], every, backoff=backoff)

    def gap() -> int:
        quiet = 0
        for e in sorted(s.scanned, reverse=True):
            if e in s.acted:
                break
            quiet += 1
        return s.every * min(2 ** max(quiet - patience + 1, 0), s.backoff)

    s.gap = gap
    ran = []
    for e in range(epochs[-1] + 1):
        if s.due(e):
            ran.append(e)
            s.done(e, acted=act.get(e, False))
    return ran


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backoff", type=int, default=4)
    ap.add_argument("--patience", type=int, nargs="+", default=[1], help="quiet scans in a row before the gap doubles")
    a = ap.parse_args()
    for patience in a.patience:
        seen, total, lost = set(), Counter(), []
        for name, scans in recorded_runs():
            epochs = [s["epoch"] for s in scans]
            key = (name, tuple(epochs), tuple(s.get("new_quarantined") for s in scans), tuple(s.get("seconds") for s in scans))
            if key in seen or len(epochs) < 2 or len({b - a for a, b in zip(epochs, epochs[1:])}) != 1:
                continue
            seen.add(key)
            act = {s["epoch"]: acted(s) for s in scans}
            ran = replay(epochs, act, a.backoff, patience)
            total.update(runs=1, scans=len(epochs), ran=len(ran))
            skipped = [e for e in epochs if e not in ran and act[e]]
            if skipped:
                lost.append((name, "".join("A" if act[e] else "." for e in epochs), skipped))
        print(f"backoff {a.backoff}, patience {patience}: {total['runs']} fixed-gap runs, {total['scans']} scans -> "
              f"{total['ran']} ({1 - total['ran'] / total['scans']:.0%} fewer); runs where a skipped scan acted: "
              f"{len(lost)}")
        for name, pattern, skipped in lost:
            print(f"  {name}: {pattern} (A: the scan acted), skipped {skipped}")


if __name__ == "__main__":
    main()
