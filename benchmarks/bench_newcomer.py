"""A newcomer's run: the guard as someone who just found it would use it, on triggers it never saw.

The model is a hand-written CIFAR ResNet-18 in the style of the popular CIFAR repositories (its own
block class, ``F.relu``; ``guard.archs``), trained with random crop + flip in the Dataset's
torchvision transform, and the guard gets ``GuardConfig()`` defaults, a trusted set of 50 a class
(or none) and **no** ``scan_dataset``: it finds its layers and reads the data through
``guard.scan_view``. The triggers are 5 % patches drawn from zoo seeds 7 and 8, which no threshold
was set on (``TRIGGERS``). Each trusted run trains beside its unguarded twin in lockstep; the
no-attack run gives the triggers' never-poisoned floors (their attack success on a model that never
saw them).

    taskset -c 0 python benchmarks/bench_newcomer.py --part 0/2 --out a.json &
    taskset -c 1 python benchmarks/bench_newcomer.py --part 1/2 --out b.json
    python benchmarks/bench_newcomer.py --merge a.json b.json    # -> results/newcomer_cifar10.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.bench_archs import cell_row  # noqa: E402
from benchmarks.bench_guard import fields, fmt, render_benchmarks  # noqa: E402
from guard.experiment import RunSpec, prepare, run, trigger_floor  # noqa: E402

TRIGGERS = ["zoo:7:9", "zoo:7:15", "zoo:8:4", "zoo:8:19"]   # the patches of held-out zoo seeds, at RATE
RATE, N_TRAIN, EPOCHS, LR, TRUSTED = 0.05, 10000, 8, 0.01, 50
MODEL = dict(model="guard.archs:build", model_kwargs={"name": "cifar_resnet18", "width": 16})


def spec(attack: str | None, trust_free: bool, seed: int, guard: dict | None = None,
         give_optimizer: bool = True) -> RunSpec:
    return RunSpec(data="cifar10", attack=attack, rate=RATE if attack else 0.0, n_train=N_TRAIN, epochs=EPOCHS,
                   lr=LR, seed=seed, trusted_per_class=TRUSTED, trust_free=trust_free, augment=True,
                   scan_dataset=False, guard=guard or {}, give_optimizer=give_optimizer, **MODEL)


def cells(triggers: list[str] = TRIGGERS, clean: bool = True, trust_free: bool = True) -> list[tuple[str | None, bool]]:
    return [(None, False)] * clean + [(t, tf) for t in triggers for tf in (False, True)[:1 + trust_free]]


def one(attack: str | None, trust_free: bool, seed: int, guard: dict | None = None,
        give_optimizer: bool = True) -> tuple[str, dict, dict]:
    sp = spec(attack, trust_free, seed, guard, give_optimizer)
    name = f"{attack or 'none'} / {'trust-free' if trust_free else f'{TRUSTED} trusted'}"
    data = prepare(sp)
    with tempfile.TemporaryDirectory() as d:
        r = run(sp, compare=not trust_free, data=data, out_dir=d if attack is None else None)
        if attack is None:
            model = data.make_model()
            model.load_state_dict(torch.load(Path(d) / "checkpoint.pt", weights_only=False)["model"])
            r["trigger_floor"] = trigger_floor(model, data, sp, TRIGGERS)
    report = r.pop("report")
    clean = [q.label for q in report.quarantine if q.index not in set(data.poisoned.tolist())]
    lost = np.bincount(clean, minlength=data.num_classes) / np.bincount(data.labels, minlength=data.num_classes)
    row = {**cell_row(name, r), "trigger": attack or "none", "trust_free": trust_free, "target": r["spec"]["target"],
           "worst_clean_class_drop": float(lost.max())}
    return name, r, row


def table(rows: list[dict], floors: dict) -> str:
    head = ("| trigger | guard | layers found | TPR % | FPR % | ASR no guard % | ASR guard % | ASR(correct) no guard % "
            "| ASR(correct) guard % | floor, correct % | acc no guard % | acc guard % | first caught at epoch | "
            "critical layers |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        f = floors.get(r["trigger"], {}).get("correct", float("nan"))
        lines.append("| " + " | ".join([
            r["trigger"], "trust-free" if r["trust_free"] else f"{TRUSTED} trusted", str(len(r["layers"])),
            fmt(r["tpr"]), fmt(r["fpr"]), fmt(r["asr_unguarded"]), fmt(r["asr_guarded"]),
            fmt(r["asr_correct_unguarded"]), fmt(r["asr_correct_guarded"]), fmt(f),
            fmt(r["acc_unguarded"]), fmt(r["acc_guarded"]), str(r["first_catch_epoch"] or "-"),
            ", ".join(r["critical_layers"]) or "-"]) + " |")
    return "\n".join(lines)


def write(out: Path, result: dict) -> None:
    m = result["meta"]
    floors = next((r["trigger_floor"] for r in result["runs"].values() if "trigger_floor" in r), {})
    result["markdown"] = (
        f"`python benchmarks/bench_newcomer.py`: a hand-written CIFAR ResNet-18 (own block class, `F.relu`, width "
        f"16), CIFAR-10 {N_TRAIN:,}-image subset, random crop (pad 4) + flip in the Dataset's transform, {EPOCHS} "
        f"epochs, SGD lr {LR} cosine, seed {m['seed']}; `GuardConfig()` defaults"
        f"{' except ' + ', '.join(m['guard']) if m.get('guard') else ''}, layers discovered, **no "
        f"`scan_dataset`** (scans read `guard.scan_view`), {TRUSTED} trusted a class or none. Triggers: the patches "
        f"of zoo seeds 7 and 8 (never used to set a threshold) at {RATE:.0%} poisoning, each aimed at its own target. "
        f"ASR: over non-target test images; ASR(correct): over those classified correctly without the trigger; "
        f"floor: ASR(correct) of the trigger on the no-attack run's model, which never saw it. Torch {m['torch']}, "
        f"{m['machine']}.{' ' + m['note'] + '.' if m.get('note') else ''}\n\n{table(result['rows'], floors)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=float))
    print(result["markdown"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--part", default="0/1", help="K/N: run every N-th cell starting at K")
    ap.add_argument("--triggers", nargs="*", default=TRIGGERS, help="a subset of TRIGGERS (or other zoo triggers)")
    ap.add_argument("--no-clean", action="store_true", help="skip the no-attack run")
    ap.add_argument("--give-optimizer", action=argparse.BooleanOptionalAction, default=True,
                    help="GuardedDataset(optimizer=opt): unlearning at the training's current learning rate "
                         "(--no-give-optimizer: at GuardConfig.unlearn_lr, as before this option)")
    ap.add_argument("--no-trust-free", action="store_true", help="skip the trust-free runs")
    ap.add_argument("--guard", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="GuardConfig fields for every run, e.g. remedy=\"none\" (JSON values)")
    ap.add_argument("--out", default=str(HERE / "results" / "newcomer_cifar10.json"))
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="merge parts into --out")
    a = ap.parse_args(argv)
    if a.merge:
        parts = [json.loads(Path(p).read_text()) for p in a.merge]
        order = {(t or "none", tf): i for i, (t, tf) in enumerate(cells())}
        rows = sorted((r for p in parts for r in p["rows"]),
                      key=lambda r: order.get((r["trigger"], r["trust_free"]), 99))
        meta = {**parts[0]["meta"], "wall_seconds": max(p["meta"]["wall_seconds"] for p in parts)}
        write(Path(a.out), {"meta": meta, "rows": rows, "runs": {k: v for p in parts for k, v in p["runs"].items()}})
        render_benchmarks()
        return 0
    torch.set_num_threads(1)
    k, n = map(int, a.part.split("/"))
    rows, runs, t0 = [], {}, time.time()
    for attack, tf in cells(a.triggers, not a.no_clean, not a.no_trust_free)[k::n]:
        name, r, row = one(attack, tf, a.seed, fields(a.guard), a.give_optimizer)
        runs[name], rows = r, rows + [row]
        print(json.dumps({key: row[key] for key in ("trigger", "trust_free", "tpr", "fpr", "asr_unguarded",
                                                     "asr_guarded", "acc_unguarded", "acc_guarded")}), flush=True)
    meta = {"machine": platform.platform(), "torch": torch.__version__, "seed": a.seed,
            "guard": a.guard + ["no optimizer="] * (not a.give_optimizer), "wall_seconds": time.time() - t0}
    write(Path(a.out), {"meta": meta, "rows": rows, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
