"""Do no harm on data unlike CIFAR-10's ten balanced classes of 1,000: small and long-tailed subsets
with 10-20 trusted samples a class. Measures how often the guard acts on a clean class.

Part 1, ``--train``: unguarded models trained as users train (random crop + flip in the Dataset's
transform, SGD with momentum, cosine schedule) on CIFAR-10 subsets: *small* (250 a class) and
*long-tailed* (head class 500, imbalance ratio 10 or 50, as CIFAR-10-LT), without attack over many
seeds, and poisoned (BadNets / Blended 10 %, target 0). The model is kept at every other epoch a scan
is scheduled by ``GuardConfig()`` defaults (3, 7, ..., 23 of 24), in ``--cache`` (not committed).

Part 2, ``--scan``: ``guard.detect`` on every kept model with trusted sets of 10 and 20 a class (and
trust-free), recording every class decision. On a clean model every class acted on is a false
alarm: with 10 classes, 3 scans and 10 seeds that is 300 decisions a setting, enough to see the
per-class false-alarm rate itself (with its Clopper-Pearson interval); ``SCANNED`` says which of
the kept models are read. Because a scan that acts on nothing leaves training unchanged, scanning
the unguarded trajectory measures exactly what the guarded run would do up to its first action.

    python benchmarks/bench_harm.py --train --part 0/2 &   # two processes (pinned, one thread each)
    python benchmarks/bench_harm.py --train --part 1/2
    python benchmarks/bench_harm.py --scan --part 0/2 --out a.json &     # likewise
    python benchmarks/bench_harm.py --scan --part 1/2 --out b.json
    python benchmarks/bench_harm.py --merge a.json b.json --out benchmarks/results/harm_cifar10.json
    python benchmarks/bench_harm.py --render benchmarks/results/harm_cifar10.json

Part 3, ``--guarded``: whole guarded runs beside their unguarded twins (what a scan that acts does to
the rest of the run: the share dropped, the worst clean class, accuracy against the twin):

    python benchmarks/bench_harm.py --guarded lt50:none:0:0:10 lt50:badnets:0.1:0:10 --out g.json
    python benchmarks/bench_harm.py --floors floors.json --variants lt50 --seeds 3   # after --train
    python benchmarks/bench_harm.py --merge-guarded g.json --with-floors floors.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.bench_guard import render_benchmarks  # noqa: E402
from guard import GuardConfig, detect  # noqa: E402
from guard.experiment import Prepared, RunSpec, _epoch, detection, measure, prepare  # noqa: E402
from guard.thresholds import Thresholds  # noqa: E402

VARIANTS = {"small": dict(n_train=2500), "lt10": dict(n_train=5000, imbalance=10.0),
            "lt50": dict(n_train=5000, imbalance=50.0)}
CLEAN_SEEDS = list(range(10))
ATTACKED = [("badnets", 0.1, 0), ("blended", 0.1, 0)]
EPOCHS, SCAN_EPOCHS, LR = 24, (3, 7, 11, 15, 19, 23), 0.05     # every other scan GuardConfig() schedules
SCANNED = (3, 7, 15)        # the kept models --scan reads (CPU time)
TRUSTED = (10, 20)


def cells() -> list[tuple[str, str | None, float, int]]:
    out = [(v, a, r, s) for v in VARIANTS for a, r, s in ATTACKED]
    return out + [(v, None, 0.0, s) for s in CLEAN_SEEDS for v in VARIANTS]


def spec(variant: str, attack: str | None, rate: float, seed: int, trusted: int = 10) -> RunSpec:
    return RunSpec(data="cifar10", attack=attack, rate=rate, seed=seed, trusted_per_class=trusted, augment=True,
                   epochs=EPOCHS, lr=LR, **VARIANTS[variant])


def name(variant: str, attack: str | None, rate: float, seed: int) -> str:
    return f"{variant}-{attack or 'none'}-{rate:g}-s{seed}"


def fit(sp: RunSpec, label: str, before_epoch=None) -> tuple[Prepared, torch.nn.Module, float]:
    """Train ``sp`` unguarded (SGD, momentum 0.9, cosine, as ``experiment.run`` trains);
    ``before_epoch(epoch, model)`` is called before each epoch. Returns the data, the model and the
    seconds spent training."""
    torch.manual_seed(sp.seed)
    data = prepare(sp)
    model = data.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=sp.lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=sp.epochs)
    loader = DataLoader(data.train, batch_size=sp.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(sp.seed))
    t = time.perf_counter()
    for epoch in range(sp.epochs):
        if before_epoch is not None:
            before_epoch(epoch, model)
        _epoch(model, opt, loader, f"{label} epoch {epoch + 1}")
        sched.step()
    return data, model, time.perf_counter() - t


def train(cell: tuple, cache: Path, make=spec, keep: tuple[int, ...] = SCAN_EPOCHS) -> dict:
    """One unguarded run of ``make(*cell)``; keeps the model at the epochs ``keep`` and measures the last one."""
    folder = cache / name(*cell)
    if (folder / "done.json").is_file():
        return json.loads((folder / "done.json").read_text())
    folder.mkdir(parents=True, exist_ok=True)

    def save(epoch: int, model: torch.nn.Module) -> None:
        if epoch in keep:
            torch.save(model.state_dict(), folder / f"epoch{epoch}.pt")
    data, model, seconds = fit(make(*cell), folder.name, save)
    out = {"cell": folder.name, "counts": np.bincount(data.labels).tolist(), "seconds": seconds,
           **measure(model, data)}
    (folder / "done.json").write_text(json.dumps(out))
    return out


def scan_rows(cell: tuple, cache: Path, configs: dict[str, dict], make=spec, trusted_sizes=TRUSTED,
              epochs: tuple[int, ...] = SCANNED) -> list[dict]:
    """Every class decision of every kept model of one cell, for every trusted size (and trust-free)
    and config."""
    folder = cache / name(*cell)
    done = json.loads((folder / "done.json").read_text())
    rows = []
    for trusted in (*trusted_sizes, None):
        data = prepare(make(*cell, trusted=trusted or 10))
        for epoch in epochs:
            model = data.make_model()
            model.load_state_dict(torch.load(folder / f"epoch{epoch}.pt", weights_only=True))
            for label, extra in configs.items():
                cfg = GuardConfig(**{"progress": False, **extra})
                report = detect(model, data.train, None if trusted is None else data.trusted, cfg, data.scan)
                q = np.array([r.index for r in report.quarantine], dtype=np.int64)
                classes = [{"cls": c.cls, "verdict": str(c.verdict), "n": c.n_scanned, "reason": c.reason,
                            "candidate": is_candidate(str(c.verdict), c.reason),
                            "dropped": int(np.isin(q, np.flatnonzero(data.labels == c.cls)).sum()),
                            "poison_dropped": int(np.isin(q, data.poisoned[data.labels[data.poisoned] == c.cls]).sum()),
                            "poisoned": int((data.labels[data.poisoned] == c.cls).sum())}
                           for c in report.scans[-1].classes]
                rows.append({"cell": folder.name, "variant": cell[0], "attack": cell[1] or "none", "seed": cell[3],
                             "epoch": epoch, "trusted": trusted or 0, "config": label, "classes": classes,
                             **detection(q, data.poisoned, len(data.labels)),
                             "mismatch_p": report.scans[-1].trusted_mismatch_p,
                             "asr_unguarded_final": done.get("attack_success", float("nan")),
                             "acc_unguarded_final": done["clean_acc"]})
    return rows


def is_candidate(verdict: str, reason: str) -> bool:
    """Whether a class passed the first step of the decision and was screened: separate, screened and
    not separate, or separate but held back by the reference gate."""
    return (verdict == "separate cluster" or reason.startswith("screened")
            or "lies beyond every reference sample than" in reason)


def summarise(rows: list[dict]) -> list[dict]:
    """Per (variant, trusted, config): clean class decisions, those acted on, the worst clean class
    drop, the largest share of a clean run dropped; and per attacked cell the best TPR / worst FPR."""
    from scipy.stats import binomtest

    out = []
    keys = sorted({(r["variant"], r["trusted"], r["config"]) for r in rows})
    for v, t, c in keys:
        sel = [r for r in rows if (r["variant"], r["trusted"], r["config"]) == (v, t, c)]
        clean = [(r, k) for r in sel for k in r["classes"] if k["poisoned"] == 0]
        acted = sum(k["dropped"] > 0 for _, k in clean)
        # older rows have no reason, and their "candidate" left out the classes the gate held back
        cand = sum(k["candidate"] or is_candidate(k["verdict"], k.get("reason", "")) for _, k in clean)
        ci = binomtest(acted, max(len(clean), 1)).proportion_ci(0.95, method="exact")
        cci = binomtest(cand, max(len(clean), 1)).proportion_ci(0.95, method="exact")
        none_runs = [r for r in sel if r["attack"] == "none"]
        att = [r for r in sel if r["attack"] != "none"]
        out.append({"variant": v, "trusted": t, "config": c, "clean_decisions": len(clean), "acted": acted,
                    "rate": acted / max(len(clean), 1), "ci": [ci.low, ci.high], "candidates": cand,
                    "candidate_rate": cand / max(len(clean), 1), "candidate_ci": [cci.low, cci.high],
                    "worst_clean_class": max((k["dropped"] / k["n"] for _, k in clean), default=0.0),
                    "worst_clean_run": max((r["flagged"] / sum(k["n"] for k in r["classes"]) for r in none_runs),
                                           default=0.0),
                    "mismatch": mismatch_summary([r.get("mismatch_p") for r in sel]),
                    "attacked": {r2: {"tpr_by_epoch": [r["tpr"] for r in att if r["cell"] == r2],
                                      "fpr_by_epoch": [r["fpr"] for r in att if r["cell"] == r2],
                                      "asr_unguarded": next(r["asr_unguarded_final"] for r in att if r["cell"] == r2)}
                                 for r2 in sorted({r["cell"] for r in att})}})
    return out


def mismatch_summary(ps: list[float | None]) -> dict | None:
    """Scans' trusted-set checks (``ScanReport.trusted_mismatch_p``, None where a scan had none): how many
    warned (p below ``max_false_alarm``), of how many reported one, and the smallest p; None when none did
    (rows that predate the check, trust-free scans)."""
    ps = [p for p in ps if p is not None]
    if not ps:
        return None
    return {"scans": len(ps), "warned": sum(p < Thresholds().max_false_alarm for p in ps), "min_p": min(ps)}


def mismatch_cell(m: dict | None) -> str:
    """:func:`mismatch_summary` as a table cell."""
    return "-" if m is None else f"{m['warned']} of {m['scans']} ({m['min_p']:.0e})"


def render(summary: list[dict]) -> str:
    lines = ["| data | trusted / class | config | clean class decisions | candidates (95 % CI) | acted on (95 % CI) | "
             "worst clean class | worst clean run | attacked: TPR by scan (FPR worst) | trusted mismatch: scans warned "
             "(smallest p) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        att = "; ".join(f"{k.split('-')[1]} (ASR {v['asr_unguarded']:.0%}): "
                        + "/".join(f"{x:.0%}" for x in v["tpr_by_epoch"]) + f" ({max(v['fpr_by_epoch']):.1%})"
                        for k, v in s["attacked"].items())
        lines.append(f"| {s['variant']} | {s['trusted'] or 'trust-free'} | {s['config']} | {s['clean_decisions']} | "
                     f"{s['candidates']}: {s['candidate_rate']:.1%} ({s['candidate_ci'][0]:.1%}-"
                     f"{s['candidate_ci'][1]:.1%}) | "
                     f"{s['acted']}: {s['rate']:.1%} ({s['ci'][0]:.1%}-{s['ci'][1]:.1%}) | "
                     f"{s['worst_clean_class']:.1%} | {s['worst_clean_run']:.2%} | {att} | {mismatch_cell(s.get('mismatch'))} |")
    return "\n".join(lines)


def markdown(summary: list[dict], rows: list[dict]) -> str:
    """The BENCHMARKS.md section: what ran, then the table."""
    runs = sorted({(r["cell"], r["acc_unguarded_final"], r["asr_unguarded_final"]) for r in rows})
    attacked = ", ".join(f"{c} {a:.0%}" for c, _, a in runs if "-none-" not in c)
    seeds = len({r["seed"] for r in rows if r["attack"] == "none"})
    return "\n".join([
        f"`python benchmarks/bench_harm.py` (two pinned single-thread processes, then `--scan`): CIFAR-10 subsets "
        f"trained unguarded as users train (random crop + flip in the Dataset, SGD lr {LR} momentum 0.9, cosine, "
        f"{EPOCHS} epochs, width-16 ResNet-18): *small* 250 a class, *lt10* / *lt50* long-tailed (head 500, imbalance "
        f"10 / 50; the tail class has 50 / 10 samples). `guard.detect` on the models of epochs {', '.join(map(str, SCANNED))} "
        f"(scans the default schedule runs), trusted sets of 10 and 20 a class and trust-free. No attack: {seeds} seeds a "
        "variant; every clean class of every scan is one decision. A *candidate* passed the first step (significant "
        "excess, screened); *acted on* = lost samples. Configs: `defaults` = the rules as shipped; earlier rule sets, "
        "kept for comparison: `no gate` = without the reference gate (`beyond_reference_p`) and the trust-free "
        "reference-fit rule, `no gate, no fit` = also without `min_class_fit`. "
        f"Attacked (10 %, target 0, seed 0), undefended attack success at the end: {attacked}; BadNets with crop + "
        "flip is not learned in any variant (its attack success is the target's plain-error floor), so those cells "
        "cannot show detection.", "", render(summary)])


def guarded_row(item: str, make) -> dict:
    """One whole guarded run beside its twin (``experiment.run``), with what issue 20 asks of it: the
    share dropped, the worst clean class, each clean class acted on. ``item``: ``ATTACK:RATE:SEED:TRUSTED``
    (ATTACK ``none`` for no attack, TRUSTED 0 for trust-free); ``make(attack, rate, seed, trusted)``
    gives its ``RunSpec``."""
    from benchmarks.bench_guard import row
    from guard.experiment import run

    attack, rate, seed, trusted = item.rsplit(":", 3)
    attack = None if attack == "none" else attack
    sp = make(attack, float(rate), int(seed), int(trusted) or 10)
    if not int(trusted):
        sp.trust_free = True
    r = run(sp, compare=True)
    r.pop("report")
    out = row(item, r)
    out.update(seed=int(seed), trusted=int(trusted), n_train=r["n_train"], scans=len(r["scans"]),
               dropped_share=r["guarded"]["flagged"] / r["n_train"],
               **clean_classes(r["scans"], None if attack is None else sp.target),
               benign_flagged=int(round(r["guarded"]["fpr"] * (r["n_train"] - r["guarded"]["poisoned"]))),
               unlearnings=[{"epoch": s["epoch"], "fit_before": s["remedy_fit_before"], "p": s["remedy_fit_p"],
                             "class": s.get("remedy_fit_class"), "steps": s["remedy_steps"]}
                            for s in r["scans"] if s.get("remedy_steps")])
    return out


def clean_classes(scans: list[dict], target: int | None) -> dict:
    """What a whole run's scans did to its clean classes (every class but ``target``; all of them
    without an attack, ``target`` None): the clean class decisions (one per class and scan), each one
    that took samples, and the clean class that lost the largest share over the run."""
    from benchmarks.bench_guard import class_drops

    acted = [{k: c[k] for k in ("cls", "n_scanned", "n_flagged", "verdict", "reason")} | {"epoch": s["epoch"]}
             for s in scans for c in s["classes"] if c["cls"] != target and c["n_flagged"]]
    drops = {c: v for c, v in class_drops(scans).items() if c != target}
    worst = max(drops, key=drops.get) if drops else None
    return {"worst_clean_class": worst, "worst_clean_drop": drops.get(worst, 0.0),
            "clean_classes_over_2pct": sum(v > 0.02 for v in drops.values()),
            "clean_decisions": sum(c["cls"] != target for s in scans for c in s["classes"]),
            "clean_acted": len(acted), "acted": acted}


def guarded_table(rows: list[dict], floor: dict | None, intro: str) -> str:
    """The markdown of :func:`guarded_row` rows under ``intro``; ``floor``: per attack, its never-poisoned
    attack success (all / correctly classified images), shown in brackets."""
    pct = lambda v: "-" if v != v else f"{100 * v:.1f}"  # noqa: E731 - nan prints as a dash
    floor = floor or {}
    key = lambda r: f"{r['variant']}:{r['attack']}" if "variant" in r else r["attack"]  # noqa: E731
    at = lambda r, k: f" ({pct(floor[key(r)][k])})" if key(r) in floor else ""  # noqa: E731
    lines = [intro + " Worst clean class: the largest share one clean class lost over the run. Clean class "
             "decisions: one per clean class and scan." + (" In brackets: the attack's never-poisoned floor." if floor
                                                            else "") + (" [code]: the commit a row ran at, where "
                                                                        "rows differ." if any("code" in r for r in rows)
                                                                        else ""),
             "", "| run | trusted a class | scans | clean class decisions acted on | dropped % | worst clean class % "
             "(classes > 2 %) | TPR % | FPR % | ASR no guard -> guard % | ASR(correct) no guard -> guard % | "
             "acc no guard -> guard % | overhead % |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r.get("variant", ""), r["attack"] or "", r["trusted"], r["seed"])):
        lines.append(" | ".join([
            f"| {(r['variant'] + ', ') if 'variant' in r else ''}{r['attack'] or 'no attack'}, seed {r['seed']}"
            + (f" [{r['code']}]" if "code" in r else ""),
            str(r["trusted"] or "trust-free"), str(r["scans"]), f"{r['clean_acted']} of {r['clean_decisions']}",
            pct(r["dropped_share"]), f"{pct(r['worst_clean_drop'])} ({r['clean_classes_over_2pct']})",
            pct(r["tpr"]) if r["poisoned"] else "-", pct(r["fpr"]),
            f"{pct(r['asr_unguarded'])} -> {pct(r['asr_guarded'])}{at(r, 'all')}" if r["poisoned"] else "-",
            f"{pct(r['asr_correct_unguarded'])} -> {pct(r['asr_correct_guarded'])}{at(r, 'correct')}"
            if r["poisoned"] else "-",
            f"{pct(r['acc_unguarded'])} -> {pct(r['acc_guarded'])}", pct(r["overhead"])]) + " |")
    return "\n".join(lines)


def merge(files: list[str], out: Path, describe=markdown) -> None:
    """Merge the rows of ``--scan`` parts into ``out`` (summary and ``describe(summary, rows)``'s
    BENCHMARKS.md section) and re-render BENCHMARKS.md."""
    parts = [json.loads(Path(p).read_text()) for p in files]
    rows = [r for p in parts for r in p["rows"]]
    summary = summarise(rows)
    out.write_text(json.dumps({"meta": parts[0]["meta"], "summary": summary, "rows": rows,
                               "markdown": describe(summary, rows)}, separators=(",", ":")))
    print(render(summary))
    render_benchmarks()


GUARDED_INTRO = ("`python benchmarks/bench_harm.py --guarded VARIANT:ATTACK:RATE:SEED:TRUSTED ... --out PART.json` "
                 f"(pinned single-thread processes): whole runs of {EPOCHS} epochs on the subsets above (crop + flip, "
                 f"SGD {LR} cosine, width-16 ResNet-18) with the guard's defaults (a scan every 2 epochs from epoch 3), "
                 "each beside its unguarded twin in lockstep. Attacked: 10 % of the data into class 0, the head class "
                 "(floors: the variant's no-attack `--train` models after epoch 23, the highest).")


def floors(cache: Path, variants: list[str], seeds: int) -> dict:
    """Each attack read by the no-attack models of ``--train``'s cache (after epoch 23 of 24), which never
    saw it: the never-poisoned floor of its attack success per ``VARIANT:ATTACK``, the highest over seeds.
    (A long-tailed model sends many images to the head class, the target, without any trigger.)"""
    out = {}
    for attack, rate, seed in ATTACKED:
        for v in variants:
            data = prepare(spec(v, attack, rate, seed))
            per = []
            for s in range(seeds):
                model = data.make_model()
                model.load_state_dict(torch.load(cache / name(v, None, 0.0, s) / "epoch23.pt", weights_only=True))
                m = measure(model, data)
                per.append({"seed": s, "all": m["attack_success"], "correct": m["attack_success_correct"]})
            out[f"{v}:{attack}"] = {k: max(p[k] for p in per) for k in ("all", "correct")} | {"seeds": per}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--scan", action="store_true")
    ap.add_argument("--part", default="0/1", help="K/N: this process takes every N-th cell from K")
    ap.add_argument("--cache", default=str(HERE.parent / "runs" / "harm"))
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--seeds", type=int, default=len(CLEAN_SEEDS), help="clean seeds per variant")
    ap.add_argument("--config", nargs="*", default=["defaults"], metavar="LABEL[:JSON]",
                    help="guard configs to scan with, e.g. 'defaults' or 'strict:{\"thresholds\": {...}}'")
    ap.add_argument("--out", help="--scan, --merge: where to write (default results/harm_cifar10.json); "
                                  "--guarded: the part's JSON (needed)")
    ap.add_argument("--render", metavar="JSON")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="merge the rows of --scan parts into --out")
    ap.add_argument("--guarded", nargs="+", metavar="VARIANT:ATTACK:RATE:SEED:TRUSTED",
                    help="whole guarded runs beside their twins (TRUSTED 0: trust-free); --out: the part's JSON")
    ap.add_argument("--floors", metavar="JSON", help="write the attacks' never-poisoned floors here (after --train)")
    ap.add_argument("--merge-guarded", nargs="+", metavar="JSON",
                    help="merge --guarded parts into --out (default results/harm_cifar10_guarded.json)")
    ap.add_argument("--with-floors", metavar="JSON", help="--merge-guarded: the floors --floors wrote")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.guarded:
        if not a.out:
            ap.error("--guarded needs --out PART.json (then merge the parts with --merge-guarded)")
        rows = []
        for item in a.guarded:
            variant, rest = item.split(":", 1)
            rows.append({"variant": variant, **guarded_row(rest, lambda *x, v=variant: spec(v, *x))})
            Path(a.out).write_text(json.dumps({"rows": rows}, indent=1, default=float))
            print(json.dumps(rows[-1], default=float), flush=True)
        return
    if a.floors:
        Path(a.floors).write_text(json.dumps(floors(Path(a.cache), a.variants, a.seeds), indent=1))
        print(Path(a.floors).read_text())
        return
    if a.merge_guarded:
        rows = [r for f in a.merge_guarded for r in json.loads(Path(f).read_text())["rows"]]
        floor = json.loads(Path(a.with_floors).read_text()) if a.with_floors else {}
        md = guarded_table(rows, floor, GUARDED_INTRO)
        (Path(a.out) if a.out else HERE / "results" / "harm_cifar10_guarded.json").write_text(
            json.dumps({"rows": rows, "floors": floor, "markdown": md}, indent=1, default=float))
        render_benchmarks()
        print(md)
        return
    if a.render:
        print(render(json.loads(Path(a.render).read_text())["summary"]))
        return
    out = Path(a.out) if a.out else HERE / "results" / "harm_cifar10.json"
    if a.merge:
        merge(a.merge, out)
        return
    k, n = (int(x) for x in a.part.split("/"))
    todo = [c for c in cells() if c[0] in a.variants and (c[1] is not None or c[3] < a.seeds)][k::n]
    cache = Path(a.cache)
    if a.train:
        for c in todo:
            r = train(c, cache)
            print(json.dumps(r), flush=True)
    if a.scan:
        configs = {s.split(":", 1)[0]: (json.loads(s.split(":", 1)[1]) if ":" in s else {}) for s in a.config}
        rows = [row for c in todo for row in scan_rows(c, cache, configs)]
        summary = summarise(rows)
        meta = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                "epochs": EPOCHS, "scan_epochs": SCAN_EPOCHS, "lr": LR, "variants": VARIANTS}
        out.write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows,
                                   "markdown": markdown(summary, rows)}, separators=(",", ":")))
        print(render(summary))


if __name__ == "__main__":
    main()
