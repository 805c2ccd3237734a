"""Crash and resume: a training process killed with SIGKILL after a scan resumes from its last
checkpoint with the same quarantine and the same sample order as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "crash_run.py"


def _run(out: Path, *args: str) -> subprocess.Popen:
    out.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(SCRIPT), str(out), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _orders(out: Path) -> dict[int, list[int]]:
    rows = [json.loads(line) for line in (out / "orders.jsonl").read_text().splitlines()]
    return {r["epoch"]: r["order"] for r in rows}


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_sigkill_after_a_scan_then_resume_matches_an_uninterrupted_run(tmp_path):
    whole = _run(tmp_path / "whole")
    assert whole.wait(timeout=300) == 0, whole.stderr.read().decode()[-2000:]

    crashed = tmp_path / "crashed"
    p = _run(crashed, "--hang-after-scan", "2")
    deadline = time.monotonic() + 300
    while not (crashed / "scanned").exists():
        assert p.poll() is None, p.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    p.send_signal(signal.SIGKILL)
    assert p.wait(timeout=60) == -signal.SIGKILL
    killed_in = int((crashed / "scanned").read_text())
    assert not (crashed / "final.json").exists()
    done_before = set(_orders(crashed))
    assert max(done_before) == killed_in - 1                 # the epoch in progress never checkpointed

    resumed = _run(crashed, "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()[-2000:]
    a = json.loads((tmp_path / "whole" / "final.json").read_text())
    b = json.loads((crashed / "final.json").read_text())
    assert a["quarantined"] and a["quarantined"] == b["quarantined"]
    assert a["scans"] == b["scans"]
    assert _orders(tmp_path / "whole") == _orders(crashed)     # every epoch's order, before and after the crash
