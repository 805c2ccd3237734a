"""The guard when a user fine-tunes a pretrained model on poisoned data, the most common recipe of all.

There are no downloadable weights on this machine, so the pretrained model is made here, on data the
fine-tuning never sees: a width-16 ResNet-18 (``guard.models.CifarResNet18``) trained on the CIFAR-10
classes 5-9 (dog, frog, horse, ship, truck; every training image of them but one a class, crop + flip,
SGD 0.05 cosine, ``--pretrain-epochs``). The fine-tuning task is the other five classes (airplane,
automobile, bird, cat, deer), a new head, ``N_TRAIN`` training images of them with random crop + flip
in the Dataset, 50 trusted a class, SGD ``LR`` cosine for ``EPOCHS`` epochs, the guard's defaults.
Four recipes (``--recipe``):

* ``all``: every layer trained (full fine-tuning);
* ``layer4``: the backbone frozen (``requires_grad=False``) but its last stage and the new head, as
  torchvision's fine-tuning tutorial does it (BatchNorm layers stay in train mode, so their running
  statistics still move);
* ``layer4-eval``: the same, the frozen stages kept in eval mode by the model's ``train()``
  (:class:`FrozenStages`), so the pretrained statistics stay;
* ``fc``: the head alone (a linear probe).

Each guarded run is the same run as its unguarded twin until the first scan (``guard.experiment.run``);
attack success is reported over all non-target test images and over the correctly classified ones,
beside the never-poisoned floor (the no-attack run's fine-tuned model, every trigger aimed as in its
row). A zoo trigger keeps its shape and rate; its target becomes ``target % 5``.

    python benchmarks/bench_finetune.py --pretrain        # once: about 6 min on two cores (cached)
    taskset -c 0 python benchmarks/bench_finetune.py --recipe all --no-attack --part 0/2 --out a.json &
    taskset -c 1 python benchmarks/bench_finetune.py --recipe all --no-attack --part 1/2 --out b.json
    python benchmarks/bench_finetune.py --merge a.json b.json --out benchmarks/results/finetune_cifar10.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.bench_zoo import targets_met, was_learned  # noqa: E402
from guard.attacks import make_attack  # noqa: E402
from guard.datasets import cache_dir  # noqa: E402
from guard.experiment import (RunSpec, _epoch, make_optimizer, predict, prepare, run,  # noqa: E402
                              trigger_floor)
from guard.models import CifarResNet18  # noqa: E402

PRE_CLASSES, FT_CLASSES = [5, 6, 7, 8, 9], [0, 1, 2, 3, 4]
N_TRAIN, EPOCHS, LR, TRUSTED, WIDTH = 4000, 10, 0.01, 50, 16
TRIGGERS = ["badnets:0.1", "blended:0.1", "zoo:9:1", "zoo:9:3", "zoo:9:4", "zoo:9:6", "zoo:9:11", "zoo:9:12"]


def weights_path(epochs: int) -> Path:
    return cache_dir() / f"pretrained_cifar5-9_w{WIDTH}_e{epochs}.pt"


def pretrain(archive: str | None, epochs: int, seed: int = 0) -> dict:
    """Train the backbone on the classes the fine-tuning never sees; save it; its test accuracy there."""
    spec = RunSpec(data="cifar10", classes=PRE_CLASSES, attack=None, n_train=None, trusted_per_class=1,
                   augment=True, epochs=epochs, lr=0.05, width=WIDTH, seed=seed, archive=archive)
    torch.manual_seed(seed)
    data = prepare(spec)
    model = data.make_model()
    opt = make_optimizer(model, spec)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(data.train, batch_size=128, shuffle=True, generator=g)
    t0 = time.perf_counter()
    for e in range(epochs):
        _epoch(model, opt, loader, f"pretrain epoch {e + 1}/{epochs}")
        sched.step()
        p, y = predict(model, data.test)
        print(f"pretrain epoch {e + 1}/{epochs}: test accuracy {(p == y).mean():.1%} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    torch.save(model.state_dict(), weights_path(epochs))
    info = {"classes": PRE_CLASSES, "epochs": epochs, "n_train": len(data.labels), "test_acc": float((p == y).mean()),
            "seconds": time.perf_counter() - t0}
    weights_path(epochs).with_suffix(".json").write_text(json.dumps(info))
    return info


class FrozenStages(CifarResNet18):
    """The model with its frozen stages kept in eval mode whatever ``train()`` is asked, as a careful
    fine-tuning script writes it: the pretrained BatchNorm statistics stay as they were."""

    frozen: tuple[str, ...] = ()

    def train(self, mode: bool = True) -> "FrozenStages":
        super().train(mode)
        for name in self.frozen:
            self.get_submodule(name).eval()
        return self


def pretrained(path: str, num_classes: int, train: str = "all", width: int = WIDTH) -> nn.Module:
    """The pretrained backbone with a new ``num_classes`` head; ``train``: ``all`` layers, ``layer4`` (and
    the head) or ``fc`` only; the others are frozen (``requires_grad=False``). ``layer4-eval``: as ``layer4``,
    with the frozen stages also kept in eval mode (:class:`FrozenStages`)."""
    model = (FrozenStages if train == "layer4-eval" else CifarResNet18)(num_classes=len(PRE_CLASSES), width=width)
    model.load_state_dict(torch.load(path, weights_only=True))
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    if train != "all":
        keep = {"layer4": ("layer4.", "fc."), "layer4-eval": ("layer4.", "fc."), "fc": ("fc.",)}[train]
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(keep))
    if train == "layer4-eval":
        model.frozen = ("stem", "layer1", "layer2", "layer3")
        model.train()
    return model


def cell_spec(trigger: str | None, recipe: str, pre_epochs: int, seed: int, archive: str | None,
              trust_free: bool = False, lr: float = LR) -> RunSpec:
    attack, rate, target = None, 0.0, 0
    if trigger is not None:
        attack, _, r = trigger.partition(":") if not trigger.startswith("zoo:") else (trigger, "", "")
        atk = make_attack(attack)
        rate = float(r) if r else atk.rate
        target = atk.target % len(FT_CLASSES) if trigger.startswith("zoo:") else 0
    return RunSpec(data="cifar10", classes=FT_CLASSES, attack=attack, rate=rate, target=target, n_train=N_TRAIN,
                   trusted_per_class=TRUSTED, trust_free=trust_free, augment=True, epochs=EPOCHS, lr=lr, width=WIDTH,
                   seed=seed, archive=archive, model="benchmarks.bench_finetune:pretrained",
                   model_kwargs={"path": str(weights_path(pre_epochs)), "num_classes": len(FT_CLASSES),
                                 "train": recipe})


def floors(model: nn.Module, spec: RunSpec, triggers: list[str]) -> dict:
    """Attack success of each trigger, aimed as in its row, on the never-poisoned fine-tuned ``model``."""
    cells = {t: cell_spec(t, "all", 0, spec.seed, spec.archive) for t in triggers}
    target = {c.attack: c.target for c in cells.values()}
    out = trigger_floor(model, prepare(spec), spec, list(target), aim=target.__getitem__)
    return {t: out[c.attack] for t, c in cells.items()}


def row(key: str, r: dict) -> dict:
    g, u = r["guarded"], r.get("unguarded", {})
    return {"cell": key, "tpr": g["tpr"], "fpr": g["fpr"], "quarantined": g.get("flagged"),
            "asr_unguarded": u.get("attack_success"), "asr_guarded": g["attack_success"],
            "asr_correct_unguarded": u.get("attack_success_correct"), "asr_correct_guarded": g["attack_success_correct"],
            "acc_unguarded": u.get("clean_acc"), "acc_guarded": g["clean_acc"],
            "first_catch": next((s["epoch"] for s in r["scans"] if s["new_quarantined"]), None),
            "quarantined_by_scan": [s["new_quarantined"] for s in r["scans"]],
            "layers": r["layers"], "scan_seconds": r["scan_seconds"],
            "epoch_seconds_median": r["epoch_seconds_median"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrain", action="store_true", help="train and save the pretrained backbone, then stop")
    ap.add_argument("--pretrain-epochs", type=int, default=12)
    ap.add_argument("--recipe", default="all", choices=["all", "layer4", "layer4-eval", "fc"])
    ap.add_argument("--lr", type=float, default=LR, help="the fine-tuning's peak learning rate (cosine)")
    ap.add_argument("--triggers", nargs="*", default=TRIGGERS, help="'NAME:RATE' (guard.attacks) or 'zoo:S:I'")
    ap.add_argument("--no-attack", action="store_true", help="also the no-attack run (its model gives the floors)")
    ap.add_argument("--trust-free", action="store_true", help="no trusted set given to the guard")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--part", default="0/1", help="K/N: this process takes every N-th cell from K")
    ap.add_argument("--archive", default=os.environ.get("GUARD_CIFAR10_ARCHIVE"))
    ap.add_argument("--merge", nargs="+", metavar="JSON")
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if a.pretrain:
        print(json.dumps(pretrain(a.archive, a.pretrain_epochs)))
        return
    if a.merge:
        parts = [json.loads(Path(p).read_text()) for p in a.merge]
        order = {t: i for i, t in enumerate(["none", *TRIGGERS])}
        rank = lambda r: (["all", "layer4", "layer4-eval", "fc"].index(r["cell"].split(" ")[0]), "lr" in r["cell"],  # noqa: E731
                          " trust-free" in r["cell"], "@" in r["cell"], order.get(r["cell"].split(" ")[1].split("@")[0], 99))
        out = {"rows": sorted((r for p in parts for r in p["rows"]), key=rank), "runs": {k: v for p in parts for k, v in p["runs"].items()},
               "floors": {k: v for p in parts for k, v in p.get("floors", {}).items()}}
        info = weights_path(a.pretrain_epochs).with_suffix(".json")
        out["pretrain"] = json.loads(info.read_text()) if info.is_file() else {}
        out["markdown"] = markdown(out)
        Path(a.out).write_text(json.dumps(out, separators=(",", ":"), default=float))
        print(out["markdown"])
        return
    k, n = (int(x) for x in a.part.split("/"))
    cells = ([None] if a.no_attack else []) + list(a.triggers)
    rows, runs, fl = [], {}, {}
    for trigger in cells[k::n]:
        spec = cell_spec(trigger, a.recipe, a.pretrain_epochs, a.seed, a.archive, a.trust_free, a.lr)
        key = (f"{a.recipe} {trigger or 'none'}" + (f"@{a.seed}" if a.seed else "") + (" trust-free" if a.trust_free else "")
               + (f" lr {a.lr:g}" if a.lr != LR else ""))
        with tempfile.TemporaryDirectory() as tmp:
            r = run(spec, out_dir=tmp if trigger is None else None)
            if trigger is None:              # the floors: this run's guarded model (it should drop nothing)
                model = pretrained(**spec.model_kwargs)
                model.load_state_dict(torch.load(Path(tmp) / "checkpoint.pt", weights_only=False)["model"])
                fl[key] = {"dropped": int(r["guarded"]["flagged"]), **floors(model, spec, list(dict.fromkeys([*TRIGGERS, *a.triggers])))}
        r.pop("report")
        for sc in r["scans"]:
            sc.pop("reference_scores", None)
        runs[key] = r
        rows.append(row(key, r))
        print(json.dumps(rows[-1]), flush=True)
        Path(a.out).write_text(json.dumps({"rows": rows, "runs": runs, "floors": fl}, default=float))


def markdown(out: dict) -> str:
    """The table: every run beside its twin and its recipe's floor, and whether a learned trigger (attack
    success >= 30 % guarded or not, issue 19's bar) meets the four targets (TPR >= 95 %, FPR <= 1 %, attack
    success on correctly classified images <= 5 % and within 2 points of the floor, accuracy within 2 points)."""
    pct = lambda v: "-" if v is None or v != v else f"{100 * v:.1f}"  # noqa: E731
    pre = out.get("pretrain", {})
    lines = [f"`python benchmarks/bench_finetune.py`: a width-{WIDTH} ResNet-18 pretrained on CIFAR-10 classes "
             f"{', '.join(map(str, PRE_CLASSES))} ({pre.get('n_train', '?'):,} images, {pre.get('epochs', '?')} epochs, "
             f"test accuracy {pct(pre.get('test_acc'))} %), fine-tuned with a new head on classes "
             f"{', '.join(map(str, FT_CLASSES))}: {N_TRAIN:,} images, random crop + flip in the Dataset, SGD {LR} cosine, "
             f"{EPOCHS} epochs, {TRUSTED} trusted a class (none: trust-free), `GuardConfig()` defaults; recipes `all` "
             "(every layer trained), `layer4` (the backbone frozen but its last stage, `requires_grad=False`; its BatchNorm "
             "layers in train mode, as torchvision's fine-tuning tutorial leaves them), `layer4-eval` (the same with the "
             "frozen stages kept in eval mode by the model's `train()`: pretrained statistics kept) and `fc` (the head "
             "alone); `lr X`: another peak learning rate. Each guarded run beside its unguarded twin (the same run until the first scan); a zoo "
             "trigger aimed at its target mod 5. Attack success (ASR) in %, all non-target test images / correctly "
             "classified ones; floor: the no-attack run's model of the same recipe, learning rate and seed. Learned: ASR >= 30 % "
             "guarded or not; met: TPR >= 95, FPR <= 1, ASR(correct) <= 5 and within 2 points of the floor, accuracy "
             "within 2 points of the twin.", "",
             "| run | undefended ASR | floor (correct) | TPR | FPR | first caught | guarded ASR | accuracy, twin / guard "
             "| learned, met |", "|---|---|---|---|---|---|---|---|---|"]
    floors = out.get("floors", {})
    for r in out["rows"]:
        recipe, trigger = r["cell"].split(" ")[:2]
        trigger, seed = (trigger.split("@") + [""])[:2]
        lr = r["cell"][r["cell"].index(" lr "):] if " lr " in r["cell"] else ""
        same = floors.get(f"{recipe} none@{seed}{lr}" if seed else f"{recipe} none{lr}")
        fl = (same or floors.get(f"{recipe} none{lr}", {})).get(trigger, {}).get("correct")
        learned = trigger != "none" and was_learned(r)
        asr_met = r["asr_correct_guarded"] <= 0.05 and (fl is None or r["asr_correct_guarded"] <= fl + 0.02)
        met = learned and targets_met(r, asr_met)[1]
        lines.append(f"| {r['cell']} | {pct(r['asr_unguarded'])} / {pct(r['asr_correct_unguarded'])} | {pct(fl)} | "
                     f"{pct(r['tpr'])} | {pct(r['fpr'])} | {r['first_catch'] or '-'} | {pct(r['asr_guarded'])} / "
                     f"{pct(r['asr_correct_guarded'])} | {pct(r['acc_unguarded'])} / {pct(r['acc_guarded'])} | "
                     f"{'yes, ' + ('yes' if met else 'no') if learned else '-'} |")
    for key, f in floors.items():
        lines.append("")
        lines.append(f"No attack ({key}): {f['dropped']} samples dropped.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
