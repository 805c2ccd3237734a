"""Scan wall time on 2 ranks vs 1 (torch.distributed, gloo, CPU) on the same model and data.

Trains a width-16 CIFAR ResNet-18 on a 10,000-image CIFAR-10 subset with BadNets 10 % for two
epochs (so a class separates and the confirming pass runs), then scans it with 1 process and
with 2 processes (one thread each), median of ``--repeats`` scans, and records the guard's own
memory per rank and that both ranks and the single process reach the same quarantine.

    python benchmarks/bench_distributed.py [--n-train 10000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from guard import GuardConfig, GuardedDataset
from guard.experiment import RunSpec, _epoch, prepare

HERE = Path(__file__).resolve().parent


def _scan(spec: RunSpec, state_path: str, repeats: int) -> dict:
    data = prepare(spec)
    model = data.make_model()
    model.load_state_dict(torch.load(state_path))
    times, hashes, mem = [], set(), 0
    for _ in range(repeats):
        gds = GuardedDataset(data.train, model, GuardConfig(remedy="none", progress=False), trusted=data.trusted,
                             scan_dataset=data.scan)
        t = time.perf_counter()
        rep = gds.scan()
        times.append(time.perf_counter() - t)
        hashes.add(hashlib.sha256(gds.quarantined.tobytes()).hexdigest())
        mem = max(mem, rep.memory_bytes)
    return {"scan_seconds": times, "median": float(np.median(times)), "hash": sorted(hashes),
            "quarantined": int(len(gds.quarantined)), "guard_mb": mem / 2**20}


def _rank(rank: int, world: int, folder: str, spec: RunSpec, state: str, repeats: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world,
                            timeout=timedelta(minutes=10))
    try:
        Path(folder, f"rank{rank}.json").write_text(json.dumps(_scan(spec, state, repeats)))
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=10000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "results" / "distributed.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    spec = RunSpec(data="cifar10", attack="badnets", rate=0.1, n_train=a.n_train)
    data = prepare(spec)
    model = data.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    loader = DataLoader(data.train, batch_size=128, shuffle=True)
    for epoch in range(2):
        _epoch(model, opt, loader, f"warm-up epoch {epoch + 1}/2")
    with tempfile.TemporaryDirectory() as folder:
        state = os.path.join(folder, "model.pt")
        torch.save(model.state_dict(), state)
        single = _scan(spec, state, a.repeats)
        mp.spawn(_rank, args=(2, folder, spec, state, a.repeats), nprocs=2, join=True)
        ranks = [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(2)]
    result = {"n_train": a.n_train, "torch": torch.__version__, "threads_per_process": 1, "single": single,
              "ranks": ranks, "speedup": single["median"] / max(r["median"] for r in ranks),
              "same_quarantine": single["hash"] == ranks[0]["hash"] == ranks[1]["hash"]}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    from bench_guard import render_benchmarks      # a sibling script: BENCHMARKS.md shows this result too

    render_benchmarks()
    print(f"scan: 1 rank {single['median']:.1f}s, 2 ranks {max(r['median'] for r in ranks):.1f}s "
          f"(speedup {result['speedup']:.2f}x); guard MB per rank {[round(r['guard_mb'], 2) for r in ranks]} "
          f"vs {single['guard_mb']:.2f}; same quarantine: {result['same_quarantine']} ({single['quarantined']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
