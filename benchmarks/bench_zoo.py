"""The guard on triggers nobody tuned it on: the trigger zoo (``guard.attacks.trigger_zoo``), CIFAR-10
trained as users train (random crop + flip in the Dataset's transform).

Each zoo trigger (its own family, shape, target and rate of 3-10 %) poisons the same CIFAR-10 subset;
an unguarded run (width-16 ResNet-18, SGD 0.05 cosine) keeps its model at scan epochs, and
``guard.detect`` reads each kept model with a trusted set and trust-free, so every row shows when the
guard would first catch the trigger and how much of it, against the attack success the undefended
run reaches. A scan that acts on nothing leaves training unchanged, so until its first catch this is
what a guarded run does; what the guarded run does *after* catching (follow-ups, unlearning, the final
attack success) needs whole guarded runs, which this CPU-sized benchmark does not make.

Size (CPU): ``N_TRAIN`` images, ``EPOCHS`` epochs, models kept at ``KEEP``; zoo seed ``ZOO_SEED``,
``--n`` triggers (20), and ``--clean`` no-attack seeds. The thresholds were not tuned on these seeds;
a tuning on them must be reported on another ``--zoo-seed``.

    taskset -c 0 python benchmarks/bench_zoo.py --train --part 0/2 &
    taskset -c 1 python benchmarks/bench_zoo.py --train --part 1/2
    taskset -c 0 python benchmarks/bench_zoo.py --scan --part 0/2 --out a.json &
    taskset -c 1 python benchmarks/bench_zoo.py --scan --part 1/2 --out b.json
    python benchmarks/bench_zoo.py --merge a.json b.json        # -> results/zoo_cifar10.json, BENCHMARKS.md

Whole guarded runs of the learned triggers (what the guard does after its first catch: follow-ups,
unlearning and its sweep, the final attack success), each beside its unguarded twin in lockstep:

    Z="--zoo-seed 1 --guarded benchmarks/results/zoo_cifar10_seed1.json"
    taskset -c 0 python benchmarks/bench_zoo.py $Z --part 0/2 --out a.json &
    taskset -c 1 python benchmarks/bench_zoo.py $Z --part 1/2 --out b.json
    python benchmarks/bench_zoo.py --zoo-seed 1 --merge-guarded a.json b.json \\
        --out benchmarks/results/zoo_cifar10_seed1_guarded.json

The plot of TPR against undefended attack success in ``BENCHMARKS.md``:
``--plot results/zoo_cifar10_seed0_guarded.json results/zoo_cifar10_seed1_guarded_views.json --out
results/plots/zoo_guarded_tpr.png``.

Chosen triggers (a zoo seed without a table, held-out triggers): ``--guarded - --triggers zoo:2:0 zoo:2:4``, then
``--merge-guarded a.json b.json --triggers zoo:2:0 zoo:2:4 --out F.json``.
The same with the opt-in two-group cut (``zoo_cifar10_seed1_guarded_split``): add
``--guard 'thresholds={"flag_split": true}'`` to all three commands.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.bench_guard import fields, render_benchmarks  # noqa: E402
from benchmarks.bench_harm import name, scan_rows, train  # noqa: E402
from guard.attacks import make_attack  # noqa: E402
from guard.experiment import RunSpec, run  # noqa: E402

ZOO_SEED, N_TRAIN, EPOCHS, LR, TRUSTED = 0, 4000, 20, 0.05, 50
KEEP = (3, 7, 11, 15, 19)          # every other scan of GuardConfig()'s default schedule


def spec(variant: str, attack: str | None, rate: float, seed: int, trusted: int = TRUSTED,
         guard: dict | None = None, recipe: str = "plain", optimizer: str = "sgd", lr: float = LR,
         arch: str | None = None) -> RunSpec:
    """The zoo recipe's run. ``arch``: a hand-written model of :mod:`guard.archs` as ``NAME[:WIDTH]``
    (e.g. ``cifar_vgg11:32``) instead of the width-16 ResNet-18 of :mod:`guard.models`."""
    target = make_attack(attack).target if attack else 0
    model: dict = {}
    if arch:
        name, _, width = arch.partition(":")
        model = {"model": "guard.archs:build", "model_kwargs": {"name": name, **({"width": int(width)} if width else {})}}
    return RunSpec(data="cifar10", attack=attack, rate=rate, target=target, seed=seed, trusted_per_class=trusted,
                   augment=True, epochs=EPOCHS, lr=lr, n_train=N_TRAIN, guard=guard or {}, recipe=recipe,
                   optimizer=optimizer, **model)


def arch_of(r: dict) -> str:
    """A run's model as ``--arch`` names it, empty for the default ResNet-18."""
    sp = r.get("spec", {})
    if sp.get("model", "auto") != "guard.archs:build":
        return ""
    kw = sp.get("model_kwargs", {})
    return kw["name"] + (f":{kw['width']}" if "width" in kw else "")


def cells(zoo_seed: int, n: int, clean: int) -> list[tuple]:
    zoo = [("zoo", f"zoo:{zoo_seed}:{i}", make_attack(f"zoo:{zoo_seed}:{i}").rate, 0) for i in range(n)]
    return zoo + [("zoo", None, 0.0, s) for s in range(clean)]


def row_of(cell: tuple, rows: list[dict]) -> dict:
    """One trigger: its description, undefended attack success, and per reference the TPR / FPR by scan."""
    mine = [r for r in rows if r["cell"] == name(*cell)]
    atk = make_attack(cell[1]) if cell[1] else None
    out = {"trigger": cell[1] or f"none (seed {cell[3]})", "attack": repr(atk) if atk else "none",
           "family": atk.name if atk else "none", "target": atk.target if atk else None, "rate": cell[2],
           "asr_unguarded": mine[0]["asr_unguarded_final"], "acc_unguarded": mine[0]["acc_unguarded_final"]}
    for label, t in (("trusted", TRUSTED), ("trust_free", 0)):
        sel = sorted((r for r in mine if r["trusted"] == t), key=lambda r: r["epoch"])
        out[label] = {"epochs": [r["epoch"] for r in sel], "tpr": [r["tpr"] for r in sel],
                      "fpr": [r["fpr"] for r in sel], "dropped": [r["flagged"] for r in sel],
                      "first_catch": next((r["epoch"] for r in sel if r["tpr"] >= 0.5), None)}
    return out


def markdown(table: list[dict], zoo_seed: int = ZOO_SEED) -> str:
    pct = lambda v: "-" if v != v else f"{v:.0%}"  # noqa: E731 - nan prints as '-'
    lines = [f"`python benchmarks/bench_zoo.py`: zoo seed {zoo_seed}, CIFAR-10 subset of {N_TRAIN:,} with random crop "
             f"+ flip in the Dataset, width-16 ResNet-18, SGD {LR} cosine, {EPOCHS} epochs, unguarded; `guard.detect` "
             f"on the models of epochs {', '.join(map(str, KEEP))} (the scans GuardConfig() runs, every other one) with "
             f"{TRUSTED} trusted a class and trust-free. TPR by scan; first = first epoch at TPR >= 50 %. "
             "Learned = undefended attack success (all non-target images) >= 30 %.", "",
             "| trigger | family | target / rate | undefended ASR | TPR by scan, trusted | first | worst FPR | "
             "TPR by scan, trust-free | first | worst FPR |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        t, f = r["trusted"], r["trust_free"]
        lines.append(f"| {r['trigger']} | {r['family']} | {r['target']} / {r['rate']:.1%} | "
                     f"{pct(r['asr_unguarded'])} | {'/'.join(pct(x) for x in t['tpr'])} | {t['first_catch'] or '-'} | "
                     f"{max(t['fpr']):.1%} | {'/'.join(pct(x) for x in f['tpr'])} | {f['first_catch'] or '-'} | "
                     f"{max(f['fpr']):.1%} |")
    learned = [r for r in table if r["family"] != "none" and r["asr_unguarded"] >= 0.3]
    caught = [r for r in learned if max(r["trusted"]["tpr"]) >= 0.95]
    caught_tf = [r for r in learned if max(r["trust_free"]["tpr"]) >= 0.95]
    lines += ["", f"Learned triggers: {len(learned)} of {sum(r['family'] != 'none' for r in table)}; caught at "
              f"TPR >= 95 % at some scan: {len(caught)} of {len(learned)} with a trusted set, {len(caught_tf)} of "
              f"{len(learned)} trust-free."]
    clean = [r for r in table if r["family"] == "none"]
    if clean:
        dropped = [sum(r[k]["dropped"]) for r in clean for k in ("trusted", "trust_free")]
        lines.append(f"No-attack seeds: {len(clean)} ({', '.join(str(r['trigger']) for r in clean)}), clean accuracy "
                     f"{min(r['acc_unguarded'] for r in clean):.1%}-{max(r['acc_unguarded'] for r in clean):.1%}; "
                     f"samples dropped over their {len(clean[0]['trusted']['epochs'])} scans: at most {max(dropped)} "
                     f"(trusted and trust-free), i.e. {sum(d > 0 for d in dropped)} of {len(dropped)} runs dropped any; "
                     f"{10 * len(clean) * len(clean[0]['trusted']['epochs'])} clean class decisions a reference.")
    else:
        lines.append("No-attack seeds were not run in this pass (`--clean 0`); clean false alarms on crop + flip "
                     "training are measured by `harm_cifar10`.")
    return "\n".join(lines)


def guarded_row(key: str, r: dict) -> dict:
    """One whole guarded run of a zoo trigger beside its unguarded twin (``key``: the trigger, with
    ``@SEED`` for a run at another ``--seed``)."""
    g, u = r["guarded"], r["unguarded"]
    trigger = key.split("@")[0].split(" ")[0]
    atk = make_attack(trigger)
    return {"trigger": trigger, "trust_free": " trust-free" in key, "scan_dataset": " no scan_dataset" not in key,
            "family": atk.name, "target": atk.target, "rate": atk.rate,
            "seed": r.get("spec", {}).get("seed", 0), "recipe": r.get("spec", {}).get("recipe", "plain"),
            "optimizer": r.get("spec", {}).get("optimizer", "sgd"), "lr": r.get("spec", {}).get("lr", LR),
            "arm": key[key.index("["):key.index("]") + 1] if "[" in key else "",   # --guard fields of the run
            "arch": arch_of(r),
            "tpr": g["tpr"], "fpr": g["fpr"], "asr_unguarded": u["attack_success"], "asr_guarded": g["attack_success"],
            "asr_correct_unguarded": u["attack_success_correct"], "asr_correct_guarded": g["attack_success_correct"],
            "acc_unguarded": u["clean_acc"], "acc_guarded": g["clean_acc"],
            "first_catch": next((s["epoch"] for s in r["scans"] if s["new_quarantined"]), None),
            "swept": sum(w["taken"] for s in r["scans"] for w in s.get("sweep", [])),
            "given_back": sum(len(s.get("released", [])) for s in r["scans"]),
            "quarantined_by_scan": [s["new_quarantined"] for s in r["scans"]], "epochs": [s["epoch"] for s in r["scans"]]}


def was_learned(r: dict) -> bool:
    """A whole guarded run whose trigger was learned: attack success >= 30 % guarded or not."""
    return max(r["asr_unguarded"], r["asr_guarded"]) >= 0.3


def targets_met(r: dict, asr_met: bool | None = None) -> tuple[bool, bool]:
    """Whether a guarded run meets TPR >= 95 %, the attack-success target (``asr_met``; default
    ASR(correct) <= 5 %) and accuracy within 2 points of its twin; and all that with FPR <= 1 %."""
    asr_met = r["asr_correct_guarded"] <= 0.05 if asr_met is None else asr_met
    three = r["tpr"] >= 0.95 and asr_met and r["acc_guarded"] >= r["acc_unguarded"] - 0.02
    return three, three and r["fpr"] <= 0.01


def guarded_markdown(rows: list[dict], zoo_seed: int, guard: list[str] | None = None,
                     chosen: list[str] | None = None) -> str:
    pct = lambda v: f"{v:.1%}"  # noqa: E731
    which = (f"the chosen triggers {', '.join(chosen)} (`--triggers`), each trained as a whole guarded run " if chosen else
             f"zoo seed {zoo_seed}, the triggers its unguarded runs learned (attack success >= 30 % in "
             f"`zoo_cifar10{f'_seed{zoo_seed}' if zoo_seed else ''}`), each trained again as a whole guarded run ")
    strong = bool(rows) and all(r.get("recipe") == "strong" for r in rows)
    recipe = (" with torchvision's reference recipe on top (TrivialAugmentWide and RandomErasing 0.1 in the Dataset, "
              "label smoothing 0.1, MixUp 0.2 / CutMix 1.0 per batch; `--recipe strong`)" if strong else "")
    opts = {(r.get("optimizer", "sgd"), r.get("lr", LR)) for r in rows} or {("sgd", LR)}
    optim = ", ".join(f"{'SGD' if o == 'sgd' else 'AdamW'} {lr:g}" for o, lr in sorted(opts))
    archs = sorted({r.get("arch", "") for r in rows}) or [""]
    model = ", ".join(f"`guard.archs` `{a}` (`--arch`; layers discovered)" if a else "width-16 ResNet-18" for a in archs)
    lines = [f"`python benchmarks/bench_zoo.py --guarded`: {which}"
             f"(`GuardConfig({', '.join(guard or [])})`{'' if guard else ' defaults'}, "
             f"{'no trusted set (trust-free)' if rows and all(r.get('trust_free') for r in rows) else f'{TRUSTED} trusted a class'}, scans "
             "at epochs 3, 5, ...) beside its unguarded twin "
             f"in lockstep (same warm-up); {N_TRAIN:,} CIFAR-10 images, crop + flip{recipe}, {model}, {optim} cosine, "
             f"{EPOCHS} epochs. ASR: attack success over non-target test images; (correct): over those classified "
             "correctly without the trigger. swept: quarantined by the unlearning sweep; given back: earlier-quarantined "
             "samples a class found separate again returned (`decide.give_back`).", "",
             "| trigger | family | target / rate | TPR | FPR | ASR no guard | ASR guard | ASR(correct) no guard | "
             "ASR(correct) guard | acc no guard | acc guard | first catch | quarantined by scan | swept | given back |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        seed = f" (seed {r['seed']})" if r.get("seed") else ""
        seed += (" (trust-free)" if r.get("trust_free") and not all(q.get("trust_free") for q in rows) else "")
        seed += " (no scan_dataset)" if r.get("scan_dataset") is False else ""
        seed += f" {r['arm']}" if r.get("arm") else ""
        seed += f" ({r['arch']})" if r.get("arch") and len(archs) > 1 else ""
        lines.append(f"| {r['trigger']}{seed} | {r['family']} | {r['target']} / {r['rate']:.1%} | {pct(r['tpr'])} | "
                     f"{r['fpr']:.2%} | {pct(r['asr_unguarded'])} | {pct(r['asr_guarded'])} | "
                     f"{pct(r['asr_correct_unguarded'])} | {pct(r['asr_correct_guarded'])} | {pct(r['acc_unguarded'])} | "
                     f"{pct(r['acc_guarded'])} | {r['first_catch'] or '-'} | "
                     f"{'/'.join(str(q) for q in r['quarantined_by_scan'])} | {r['swept']} | {r.get('given_back', 0)} |")
    taken = [r for r in rows if was_learned(r)]
    three = [r for r in taken if targets_met(r)[0]]
    met = [r for r in taken if targets_met(r)[1]]
    lines += ["", f"Learned in these runs (attack success >= 30 % guarded or not; sample order differs from the "
              f"unguarded zoo run): {len(taken)} of {len(rows)}. Meeting TPR >= 95 %, ASR(correct) <= 5 % and accuracy "
              f"within 2 points: {len(three)} of {len(taken)}; and FPR <= 1 % as well: {len(met)} of {len(taken)}."]
    return "\n".join(lines)


def plot_guarded(files: list[str], path: Path) -> None:
    """TPR against the undefended run's attack success, one point per whole guarded run of ``files``
    (``--guarded`` results), marked by trigger family and filled where the run met the targets (TPR
    >= 95 %, FPR <= 1 %, ASR(correct) <= 5 %, accuracy within 2 points)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    marks = {"patch": "s", "blended": "o", "frequency": "^", "wanet": "D"}
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for k, f in enumerate(files):
        colour = f"C{k}"
        for r in json.loads(Path(f).read_text())["rows"]:
            met = (r["tpr"] >= 0.95 and r["fpr"] <= 0.01 and r["asr_correct_guarded"] <= 0.05
                   and r["acc_guarded"] >= r["acc_unguarded"] - 0.02)
            ax.scatter(100 * r["asr_unguarded"], 100 * r["tpr"], marker=marks.get(r["family"], "x"), s=42,
                       edgecolors=colour, facecolors=colour if met else "none")
            ax.annotate(r["trigger"].removeprefix("zoo:"), (100 * r["asr_unguarded"], 100 * r["tpr"]),
                        fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.scatter([], [], marker="o", facecolors="none", edgecolors=colour, label=Path(f).stem)
    for fam, m in marks.items():
        ax.scatter([], [], marker=m, color="grey", label=fam)
    ax.axvline(30, color="grey", lw=0.8, ls=":")
    ax.axhline(95, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("undefended attack success, all non-target images (%)")
    ax.set_ylabel("guarded run's TPR (%)")
    ax.set_xlim(0, 102)
    ax.set_ylim(-3, 103)
    ax.set_title("whole guarded zoo runs (filled: all four targets met)", fontsize=9)
    ax.legend(fontsize=6, loc="center right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--scan", action="store_true")
    ap.add_argument("--part", default="0/1", help="K/N: this process takes every N-th cell from K")
    ap.add_argument("--zoo-seed", type=int, default=ZOO_SEED)
    ap.add_argument("--n", type=int, default=20, help="zoo triggers")
    ap.add_argument("--clean", type=int, default=2, help="no-attack seeds")
    ap.add_argument("--cache", default=str(HERE.parent / "runs" / "zoo"))
    ap.add_argument("--out", default=str(HERE / "results" / "zoo_cifar10.json"))
    ap.add_argument("--merge", nargs="+", metavar="JSON")
    ap.add_argument("--guarded", metavar="JSON",
                    help="whole guarded runs of the triggers this zoo result file found learned")
    ap.add_argument("--merge-guarded", nargs="+", metavar="JSON")
    ap.add_argument("--triggers", nargs="*", help="with --guarded: these triggers instead of the table's learned ones "
                    "(for a zoo seed without a table; the twin gives the undefended attack success)")
    ap.add_argument("--plot", nargs="+", metavar="JSON", help="plot TPR against undefended attack success for these "
                    "--guarded result files into --out (a .png)")
    ap.add_argument("--trust-free", action="store_true", help="with --guarded: no trusted set given to the guard")
    ap.add_argument("--trusted", type=int, default=TRUSTED, help="with --guarded: trusted samples per class")
    ap.add_argument("--no-scan-dataset", action="store_true",
                    help="with --guarded: no scan_dataset given to the guard (it reads its own view, guard.scan_view)")
    ap.add_argument("--seed", type=int, default=0, help="with --guarded: the runs' subset, poison draw and sample "
                    "order (a replicate of a trigger's run)")
    ap.add_argument("--guard", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="GuardConfig fields of the guarded runs, e.g. 'thresholds={\"flag_split\": true}'")
    ap.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"],
                    help="with --guarded: the runs' optimizer (adamw: weight decay 0.05; give --lr, e.g. 0.001)")
    ap.add_argument("--lr", type=float, default=LR, help="with --guarded: the runs' peak learning rate (cosine)")
    ap.add_argument("--arch", help="with --guarded: a hand-written model of guard.archs as NAME[:WIDTH] (e.g. "
                    "cifar_vgg11:32) instead of the width-16 ResNet-18")
    ap.add_argument("--recipe", default="plain", choices=["plain", "strong"],
                    help="with --guarded: strong adds torchvision's reference recipe (guard.experiment._Step)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.plot:
        plot_guarded(a.plot, Path(a.out))
        return
    if a.merge_guarded:
        parts = [json.loads(Path(p).read_text()) for p in a.merge_guarded]
        order = {t: i for i, t in enumerate(a.triggers or [f"zoo:{a.zoo_seed}:{i}" for i in range(a.n)])}
        rows = sorted((guarded_row(t, r) for p in parts for t, r in p["runs"].items()),   # rows of the current form
                      key=lambda r: (order.get(r["trigger"], 99), r["seed"]))
        md = guarded_markdown(rows, a.zoo_seed, a.guard, a.triggers)
        Path(a.out).write_text(json.dumps({"rows": rows, "runs": {k: v for p in parts for k, v in p["runs"].items()},
                                           "markdown": md}, indent=1, default=float))
        print(md)
        render_benchmarks()
        return
    if a.guarded:
        table = [] if a.triggers else json.loads(Path(a.guarded).read_text())["table"]
        learned = a.triggers or [r["trigger"] for r in table if r["family"] != "none" and r["asr_unguarded"] >= 0.3]
        k, n = (int(x) for x in a.part.split("/"))
        rows, runs = [], {}
        for trigger in learned[k::n]:
            atk = make_attack(trigger)
            r = run(replace(spec("zoo", trigger, atk.rate, a.seed, trusted=a.trusted, guard=fields(a.guard),
                                 recipe=a.recipe, optimizer=a.optimizer, lr=a.lr, arch=a.arch),
                            trust_free=a.trust_free, scan_dataset=not a.no_scan_dataset))
            r.pop("report")
            for sc in r["scans"]:
                sc.pop("reference_scores", None)          # per-sample plot data: not needed here
            key = ((f"{trigger}@{a.seed}" if a.seed else trigger) + (" trust-free" if a.trust_free else "")
                   + (" no scan_dataset" if a.no_scan_dataset else "") + (" strong" if a.recipe == "strong" else "")
                   + (f" {a.optimizer} {a.lr:g}" if (a.optimizer, a.lr) != ("sgd", LR) else "")
                   + (f" [{' '.join(a.guard)}]" if a.guard else "")
                   + (f" arch={a.arch}" if a.arch else "")
                   + (f" {a.trusted} trusted" if a.trusted != TRUSTED and not a.trust_free else ""))
            runs[key] = r
            rows.append(guarded_row(key, r))
            print(json.dumps(rows[-1]), flush=True)
            Path(a.out).write_text(json.dumps({"rows": rows, "runs": runs}, default=float))
        return
    todo = cells(a.zoo_seed, a.n, a.clean)
    if a.merge:
        rows = [r for p in a.merge for r in json.loads(Path(p).read_text())["rows"]]
        done = {r["cell"] for r in rows}
        table = [row_of(c, rows) for c in todo if name(*c) in done]
        md = markdown(table, a.zoo_seed)
        Path(a.out).write_text(json.dumps({"table": table, "rows": rows, "markdown": md}, indent=1))
        print(md)
        render_benchmarks()
        return
    k, n = (int(x) for x in a.part.split("/"))
    mine, cache = todo[k::n], Path(a.cache)
    if a.train:
        for c in mine:
            print(json.dumps(train(c, cache, make=spec, keep=KEEP)), flush=True)
    if a.scan:                      # cells whose training has not finished are left out (and said so)
        ready = [c for c in mine if (cache / name(*c) / "done.json").is_file()]
        if len(ready) < len(mine):
            print(f"not trained yet, left out: {[name(*c) for c in mine if c not in ready]}", flush=True)
        rows = [r for c in ready for r in scan_rows(c, cache, {"defaults": {}}, make=spec, trusted_sizes=(TRUSTED,),
                                                    epochs=KEEP)]
        Path(a.out).write_text(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
