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
        cand = sum(k["candidate"] or is_candidate(k["verdict"], k["reason"]) for _, k in clean)
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
                    "attacked": {r2: {"tpr_by_epoch": [r["tpr"] for r in att if r["cell"] == r2],
                                      "fpr_by_epoch": [r["fpr"] for r in att if r["cell"] == r2],
                                      "asr_unguarded": next(r["asr_unguarded_final"] for r in att if r["cell"] == r2)}
                                 for r2 in sorted({r["cell"] for r in att})}})
    return out


def render(summary: list[dict]) -> str:
    lines = ["| data | trusted / class | config | clean class decisions | candidates (95 % CI) | acted on (95 % CI) | "
             "worst clean class | worst clean run | attacked: TPR by scan (FPR worst) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        att = "; ".join(f"{k.split('-')[1]} (ASR {v['asr_unguarded']:.0%}): "
                        + "/".join(f"{x:.0%}" for x in v["tpr_by_epoch"]) + f" ({max(v['fpr_by_epoch']):.1%})"
                        for k, v in s["attacked"].items())
        lines.append(f"| {s['variant']} | {s['trusted'] or 'trust-free'} | {s['config']} | {s['clean_decisions']} | "
                     f"{s['candidates']}: {s['candidate_rate']:.1%} ({s['candidate_ci'][0]:.1%}-"
                     f"{s['candidate_ci'][1]:.1%}) | "
                     f"{s['acted']}: {s['rate']:.1%} ({s['ci'][0]:.1%}-{s['ci'][1]:.1%}) | "
                     f"{s['worst_clean_class']:.1%} | {s['worst_clean_run']:.2%} | {att} |")
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
    ap.add_argument("--out", default=str(HERE / "results" / "harm_cifar10.json"))
    ap.add_argument("--render", metavar="JSON")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="merge the rows of --scan parts into --out")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.render:
        print(render(json.loads(Path(a.render).read_text())["summary"]))
        return
    if a.merge:
        merge(a.merge, Path(a.out))
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
        Path(a.out).write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows,
                                           "markdown": markdown(summary, rows)}, separators=(",", ":")))
        print(render(summary))


if __name__ == "__main__":
    main()
