"""Where one scan's time goes, stage by stage: the same checkpoint scanned again and again, medians.

Whole runs (``cost_table.py``) measure what users pay, but their scans differ from run to run by
more than a small change saves. This scans one fixed checkpoint of the main recipe (CIFAR-10 10k,
width-16 ResNet-18, no augmentation, 100 trusted a class, at the first scan: after epoch 3) ``--repeats``
times with ``remedy="none"`` and reports the median of each stage (``ScanReport.seconds_by_step``)
and part (``seconds_by_part``). Run it at two commits side by side (one pinned thread each, then
swap the cores) to compare code:

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/scan_stages.py --attack badnets --out a.json
    python benchmarks/scan_stages.py --render a.json b.json --labels before after

The checkpoint is trained once (``--checkpoint``; three epochs, about two minutes on this CPU) and
reused; the data needs ``GUARD_CIFAR10_ARCHIVE`` (or ``--archive``). On a GPU, at full size:
``--device cuda --n-train 0 --width 64`` (a scan's device work shows where the host first waits for it,
mostly ``transfer``: read forward + transfer there).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from guard import GuardConfig, GuardedDataset  # noqa: E402
from guard.experiment import RunSpec, _epoch, prepare  # noqa: E402


def checkpoint(spec: RunSpec, path: Path, epochs: int = 3) -> None:
    """Train the main recipe's guarded run up to its first scan (nothing is scanned before it) and save it."""
    from torch.utils.data import DataLoader

    torch.manual_seed(spec.seed)
    data = prepare(spec)
    model = data.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=spec.epochs)
    gds = GuardedDataset(data.train, model, GuardConfig(seed=spec.seed), trusted=data.trusted, scan_dataset=data.scan)
    loader = DataLoader(gds, batch_size=spec.batch_size, sampler=gds.sampler)
    for e in range(epochs):
        gds.sampler.set_epoch(e)
        _epoch(model, opt, loader, f"train epoch {e + 1}/{epochs}")
        sched.step()
    torch.save(model.state_dict(), path)


class Decoded(torch.utils.data.Dataset):
    """An array dataset (:class:`guard.datasets.ArrayImageDataset`, no augmentation) as an image-folder
    user's dataset reads it: each image kept as PNG bytes, decoded by PIL at every read, then torchvision's
    ``ToImage``, ``ToDtype(scale=True)`` and ``Normalize``. The same pixels; what a read costs changes."""

    def __init__(self, ds) -> None:
        from torchvision.transforms import v2

        self.files = []
        for img in ds.images:
            buf = io.BytesIO()
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="PNG")
            self.files.append(buf.getvalue())
        self.labels, self.targets = ds.labels, ds.targets
        self.transform = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                                     v2.Normalize(ds.mean.flatten().tolist(), ds.std.flatten().tolist())])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(io.BytesIO(self.files[i])) as im:
            return self.transform(im.convert("RGB")), int(self.labels[i])


def floor(model: torch.nn.Module, data, spec: RunSpec, state: dict, cfg: GuardConfig) -> dict[str, float]:
    """What a scan is held against, timed in the scan's process: one training epoch of the recipe from the same
    checkpoint (SGD, the recipe's batch size, shuffled) and one plain forward pass, without hooks, over what a
    scan forwards (the training set and the trusted set), fed as the guard feeds it (``cfg``'s batch size,
    channels-last, eval mode, the guard's autocast): the floor of a scan's cost. On an accelerator each clock
    is read after the device has finished."""
    from torch.utils.data import ConcatDataset, DataLoader

    from guard.batches import autocast

    def done() -> float:
        if spec.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter()

    model.load_state_dict(state)
    opt = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=0.9, weight_decay=5e-4)
    t = done()
    _epoch(model, opt, DataLoader(data.train, batch_size=spec.batch_size, shuffle=True), "floor: one epoch")
    end = done()
    epoch, t = end - t, end
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad(), autocast(torch.device(spec.device), cfg.amp):
        for x, _ in DataLoader(ConcatDataset([data.scan, data.trusted]), batch_size=cfg.batch_size):
            model(x.to(spec.device).contiguous(memory_format=torch.channels_last))
    return {"epoch": epoch, "plain_forward": done() - t}


def stages(spec: RunSpec, path: Path, repeats: int, decode: bool = False, keep_mb: float | None = None,
           guard: dict | None = None, with_floor: bool = False, trust_free: bool = False) -> dict:
    data = prepare(spec)
    if decode:
        data.scan, data.trusted = Decoded(data.scan), Decoded(data.trusted)
    model = data.make_model()
    state = torch.load(path, weights_only=True, map_location=spec.device)
    runs = []
    for _ in range(repeats + 1):                       # the first is a warm-up, not counted
        model.load_state_dict(state)
        extra = ({} if keep_mb is None else {"keep_mb": keep_mb}) | (guard or {})
        cfg = GuardConfig(seed=spec.seed, remedy="none", progress=False, **extra)
        gds = GuardedDataset(data.train, model, cfg, trusted=None if trust_free else data.trusted,
                             scan_dataset=data.scan)
        t = time.perf_counter()
        rep = gds.scan(3)
        runs.append({"wall": time.perf_counter() - t, "seconds": rep.seconds, "steps": rep.seconds_by_step,
                     "parts": rep.seconds_by_part, "quarantined": len(gds.quarantined),
                     "memory_mb": rep.memory_bytes / 2**20, "passes": rep.passes})
        if with_floor and len(runs) > 1:              # interleaved with the scans: drift hits both alike
            runs[-1]["floor"] = floor(model, data, spec, state, cfg)
    runs = runs[1:]
    med = {"scan": float(np.median([r["seconds"] for r in runs]))}
    for key in ("steps", "parts"):
        for name in runs[0][key]:
            med[f"{key}:{name}"] = float(np.median([r[key].get(name, 0.0) for r in runs]))
    parts = {k: v for k, v in med.items() if k.startswith("parts:")}
    med["non_forward"] = 1 - med["parts:forward"] / sum(parts.values())
    if with_floor:
        for name in ("epoch", "plain_forward"):
            med[f"floor:{name}"] = float(np.median([r["floor"][name] for r in runs]))
        med["scan_per_epoch"] = float(np.median([r["seconds"] / r["floor"]["epoch"] for r in runs]))
        med["forward_per_epoch"] = float(np.median([r["parts"]["forward"] / r["floor"]["epoch"] for r in runs]))
        med["plain_forward_per_epoch"] = float(np.median([r["floor"]["plain_forward"] / r["floor"]["epoch"]
                                                          for r in runs]))
    return {"median": med, "runs": runs}


def render(results: list[tuple[str, dict]]) -> str:
    keys = list(dict.fromkeys(k for _, r in results for k in r["median"]
                              if k == "scan" or (":" in k and not k.startswith("floor:"))))
    floor_keys = [k for k in ("floor:epoch", "floor:plain_forward", "scan_per_epoch", "forward_per_epoch",
                              "plain_forward_per_epoch") if any(k in r["median"] for _, r in results)]
    head = ("| code | attack | " + " | ".join(k.split(":")[-1] for k in keys) + " | non-forward |"
            + "".join(f" {k.replace('floor:', '')} |" for k in floor_keys))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for label, r in results:
        m = r["median"]
        lines.append(f"| {label} | {r['meta']['attack']} | " + " | ".join(f"{m.get(k, 0.0):.2f}" for k in keys)
                     + f" | {m['non_forward']:.0%} |"
                     + "".join(f" {m[k]:.2f} |" if k in m else " - |" for k in floor_keys))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attack", default="badnets", help="a guard.attacks name, or none")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="where the model runs, e.g. cuda (the guard follows it)")
    ap.add_argument("--n-train", type=int, default=10000, help="training subset size (0: all of CIFAR-10's train split)")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--archive", default=os.environ.get("GUARD_CIFAR10_ARCHIVE"))
    ap.add_argument("--checkpoint", help="where the epoch-3 model is kept (default: /tmp/guard_stages_ATTACK.pt)")
    ap.add_argument("--decode", action="store_true",
                    help="read the scan's data as an image folder is read: PNG decoded by PIL at every read")
    ap.add_argument("--keep-mb", type=float, help="GuardConfig.keep_mb (default: the library's)")
    ap.add_argument("--guard", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="further GuardConfig fields, e.g. mirror_images=false (JSON values)")
    ap.add_argument("--floor", action="store_true",
                    help="also time, after each scan, one training epoch and one plain forward over what a scan "
                         "forwards (scan / epoch and the floor in the same process)")
    ap.add_argument("--trust-free", action="store_true", help="scan without the trusted set")
    ap.add_argument("--out")
    ap.add_argument("--render", nargs="+", metavar="JSON", help="only tabulate earlier result files")
    ap.add_argument("--labels", nargs="+")
    a = ap.parse_args()
    if a.render:
        labels = a.labels or [Path(p).stem for p in a.render]
        print(render([(lab, json.loads(Path(p).read_text())) for lab, p in zip(labels, a.render)]))
        return
    attack = None if a.attack == "none" else a.attack
    spec = RunSpec(data="cifar10", attack=attack, rate=0.1, n_train=a.n_train or None, epochs=8, width=a.width, lr=0.01,
                   seed=0, archive=a.archive, device=a.device)
    size = "" if (a.n_train, a.width) == (10000, 16) else f"_{a.n_train}_w{a.width}"
    path = Path(a.checkpoint or f"/tmp/guard_stages_{a.attack}{size}.pt")
    if not path.exists():
        checkpoint(spec, path)
    guard = {k: json.loads(v) for k, v in (item.split("=", 1) for item in a.guard)}
    out = stages(spec, path, a.repeats, a.decode, a.keep_mb, guard, a.floor, a.trust_free)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout
    out["meta"] = {"attack": a.attack + (" (decoded)" if a.decode else "") + (" trust-free" if a.trust_free else ""), "repeats": a.repeats, "threads": torch.get_num_threads(), "commit": commit.strip(),
                   "torch": torch.__version__, "device": a.device, "n_train": a.n_train, "width": a.width, "keep_mb": a.keep_mb, "guard": guard,
                   "gpu": torch.cuda.get_device_name() if a.device.startswith("cuda") else None,
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print(json.dumps(out["median"], indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
