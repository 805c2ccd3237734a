"""How a scan's time and the guard's memory grow with the number of samples and the layer width.

Two parts, each a forced scan (``GuardedDataset.scan()``) of a freshly built guard:

- CIFAR-10 (real images, width-16 ResNet-18 after one epoch of BadNets 10 % training): scan time
  at N = 10,000 and N = 49,000 (the whole train split less the trusted set): time per sample
  should stay flat (linear in N).
- Synthetic 8x8 images (random, 10 classes, a 6-layer CNN): the guard's memory at N up to
  1,000,000, at two layer widths (8 and 32 channels). Memory is the peak traced by
  ``tracemalloc`` during the scan (numpy and Python allocations: the guard's per-sample tables;
  torch's CPU allocator, which holds the model and each batch, is not traced) plus what the
  guard keeps between scans. It should grow as N x L and not with the width.

    python benchmarks/bench_scale.py                      # the committed configuration
    python benchmarks/bench_scale.py --synthetic 10000 100000 --no-cifar   # a quick look
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from guard import GuardConfig, GuardedDataset
from guard.experiment import EpochPermutation, RunSpec, _epoch, prepare

HERE = Path(__file__).resolve().parent


class Synthetic(Dataset):
    """N random 1 x 8 x 8 images with labels ``i % 10``, made on the fly from the index (the data
    itself takes no memory, so what is measured is the guard's)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed = n, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(self.seed * 10_000_019 + i)
        return torch.randn(1, 8, 8, generator=g), i % 10


def cnn(width: int) -> nn.Module:
    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())
    torch.manual_seed(0)
    return nn.Sequential(block(1, width), block(width, width), block(width, width), block(width, width),
                         block(width, width), nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)))


def measure_scan(ds: Dataset, model: nn.Module, trusted: Dataset, scan_ds: Dataset | None = None) -> dict:
    tracemalloc.start()
    gds = GuardedDataset(ds, model, GuardConfig(remedy="none", progress=False), trusted=trusted, scan_dataset=scan_ds)
    t = time.perf_counter()
    gds.scan()
    seconds = time.perf_counter() - t
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    kept_between = gds._scores.nbytes + gds._labels.nbytes
    return {"n": len(ds), "layers": len(gds.layers), "seconds": seconds, "us_per_sample": 1e6 * seconds / len(ds),
            "peak_traced_mb": peak / 2**20, "scan_arrays_mb": gds.report.scans[-1].memory_bytes / 2**20,
            "kept_between_scans_mb": kept_between / 2**20, "quarantined": len(gds.quarantined)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cifar", nargs="*", type=int, default=[10000, 0], help="CIFAR-10 sizes (0: the whole split)")
    ap.add_argument("--no-cifar", dest="cifar", action="store_const", const=[])
    ap.add_argument("--synthetic", nargs="*", type=int, default=[10000, 100000, 1000000])
    ap.add_argument("--widths", nargs="+", type=int, default=[8, 32])
    ap.add_argument("--out", default=str(HERE / "results" / "scale.json"))
    a = ap.parse_args(argv)
    out: dict = {"cifar": [], "synthetic": []}
    for n in a.cifar:
        data = prepare(RunSpec(data="cifar10", attack="badnets", rate=0.1, n_train=n or None))
        model = data.make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        _epoch(model, opt, DataLoader(data.train, batch_size=128, sampler=EpochPermutation(len(data.labels), 0)))
        out["cifar"].append(measure_scan(data.train, model, data.trusted, data.scan))
        print(out["cifar"][-1], flush=True)
    trusted = Synthetic(1000, seed=1)
    for width in a.widths:
        for n in a.synthetic:
            r = {"width": width, **measure_scan(Synthetic(n), cnn(width), trusted)}
            out["synthetic"].append(r)
            print(r, flush=True)
    out["meta"] = {"machine": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
                   "threads": torch.get_num_threads()}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    Path(a.out).with_suffix(".md").write_text(table(out) + "\n")
    print(table(out))
    sys.path.insert(0, str(HERE))
    from bench_guard import render_benchmarks
    render_benchmarks()
    return 0


def table(out: dict) -> str:
    lines = ["| data | width | N | layers | scan s | us/sample | peak traced MB | scan arrays MB | kept between scans MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for kind in ("cifar", "synthetic"):
        for r in out[kind]:
            lines.append(f"| {kind} | {r.get('width', 16)} | {r['n']:,} | {r['layers']} | {r['seconds']:.1f} | "
                         f"{r['us_per_sample']:.0f} | {r['peak_traced_mb']:.1f} | {r['scan_arrays_mb']:.1f} | "
                         f"{r['kept_between_scans_mb']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
