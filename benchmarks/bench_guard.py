"""Guard benchmark on real CIFAR-10: every attack at 5 % and 10 %, plus no attack.

Trains a width-configurable CIFAR ResNet-18 on a training subset with the guard, and the same run
without it (sharing the warm-up), and prints/writes: TPR and FPR of the quarantine (FPR over all
benign training samples), the paper-rule baseline at the first scan, final clean accuracy and
attack success with vs without the guard, scan time vs epoch time, and the guard's memory.

    python benchmarks/bench_guard.py                       # the committed default configuration
    python benchmarks/bench_guard.py --attacks badnets --rates 0.1 --epochs 4   # a quick look
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))        # this checkout's guard, not whatever the venv has installed

from guard.attacks import ATTACKS, make_attack  # noqa: E402
from guard.experiment import RunSpec, run  # noqa: E402


def row(name: str, r: dict) -> dict:
    g, u = r["guarded"], r.get("unguarded", {})
    first_scan = r["scan_seconds"][0] if r["scan_seconds"] else float("nan")
    p = r["paper_rule"][0] if r["paper_rule"] else {}
    return {
        "run": name, "attack": r["spec"]["attack"], "poisoned": g["poisoned"], "quarantined": g["flagged"],
        "tpr": g["tpr"], "fpr": g["fpr"], "f1": g["f1"],
        "paper_tpr": p.get("tpr", float("nan")), "paper_fpr": p.get("fpr", float("nan")),
        "paper_f1": p.get("f1", float("nan")),
        "asr_warmup": r.get("warmup", {}).get("attack_success", float("nan")),
        "asr_unguarded": u.get("attack_success", float("nan")), "asr_guarded": g["attack_success"],
        "asr_floor": float("nan"),      # filled in from the no-attack run (see with_floors)
        # the guarded model's own rate of predicting the target for the same images without the trigger
        "target_clean_guarded": g.get("target_rate_clean", float("nan")),
        "asr_correct_unguarded": u.get("attack_success_correct", float("nan")),
        "asr_correct_guarded": g["attack_success_correct"],
        "acc_unguarded": u.get("clean_acc", float("nan")), "acc_guarded": g["clean_acc"],
        "scan_over_epoch": first_scan / r["epoch_seconds_median"],
        # guard cost over the whole run (scans + remedies) relative to the training epochs it guarded
        "overhead": (sum(r["scan_seconds"]) + sum(s["remedy_seconds"] for s in r["scans"]))
        / (r["spec"]["epochs"] * r["epoch_seconds_median"]),
        "scan_s": first_scan, "epoch_s": r["epoch_seconds_median"],
        "guard_mem_mb": r["guard_scan_memory_mb"],
        "max_class_drop": max_class_drop(r["scans"]),
        "covers_quarantined": g.get("cover_flagged", float("nan")),
    }


def layer_auroc(gds, data) -> dict:
    """Per layer, the AUROC of the poison against the benign samples of the target class (cosine to
    the trusted class mean, the paper's score; cover samples left out), at the scan just run: what
    the layer-wise features show. All-to-all attacks have no single target class: empty."""
    targets = np.unique(data.labels[data.poisoned])
    if data.attack is None or len(targets) != 1 or data.trusted is None:
        return {}
    target = int(targets[0])
    rows = np.setdiff1d(np.flatnonzero(data.labels == target), data.cover)
    auroc = per_layer_auroc(gds, data, rows)
    return {"epoch": gds.report.scans[-1].epoch, "target": target,
            "auroc": {name: float(a) for name, a in zip(gds.layers, auroc)}}


def per_layer_auroc(gds, data, rows: np.ndarray) -> list[float]:
    """For the training samples ``rows`` (one class), per layer of the guard, the AUROC of the
    poisoned against the others by their cosine to the trusted class mean (lower = more suspicious)."""
    from sklearn.metrics import roc_auc_score

    from guard.hooks import scan_mode
    from guard.reference import Reference

    with scan_mode(gds.scanner.model):
        ref = None
        for b in gds.extractor.stream(data.trusted, gds.layers, None, "auroc/trusted"):
            ref = ref or Reference([f.shape[1] for f in b.feats], gds.num_classes)
            ref.update(b.feats, b.labels)
        cos = np.concatenate([ref.score(b.feats, b.labels).numpy()
                              for b in gds.extractor.stream(data.scan, gds.layers, rows, "auroc/class")])
    truth = np.isin(rows, data.poisoned)
    return [roc_auc_score(truth, -cos[:, i]) for i in range(len(gds.layers))]


def fields(items: list[str]) -> dict:
    """``["name=JSON", ...]`` as a dict."""
    return {k: json.loads(v) for k, v in (item.split("=", 1) for item in items)}


def class_drops(scans: list[dict]) -> dict[int, float]:
    """Per class, the share of it quarantined over the run (class sizes from the first scan)."""
    if not scans:
        return {}
    size = {c["cls"]: c["n_scanned"] for c in scans[0]["classes"]}
    dropped: dict[int, int] = {}
    for s in scans:
        for c in s["classes"]:
            dropped[c["cls"]] = dropped.get(c["cls"], 0) + c["n_flagged"]
    return {c: dropped.get(c, 0) / n for c, n in size.items()}


def max_class_drop(scans: list[dict]) -> float:
    """The largest share of one class quarantined over the run (class sizes from the first scan)."""
    return max(class_drops(scans).values(), default=float("nan"))


def fmt(v: float, pct: bool = True) -> str:
    if isinstance(v, float) and np.isnan(v):
        return "-"
    return f"{100 * v:.1f}" if pct else f"{v:.2f}"


def table(rows: list[dict]) -> str:
    head = ("| run | poisoned | quarantined | TPR % | FPR % | paper TPR % | paper FPR % | ASR warm-up % | "
            "ASR no guard % | ASR guard % | ASR floor % | target w/o trigger, guard % | ASR(correct) no guard % | "
            "ASR(correct) guard % | ASR(correct) floor % | acc no guard % | acc guard % | scan/epoch | overhead % | "
            "guard MB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["run"], str(r["poisoned"]), str(r["quarantined"]), fmt(r["tpr"]), fmt(r["fpr"]),
            fmt(r["paper_tpr"]), fmt(r["paper_fpr"]), fmt(r["asr_warmup"]), fmt(r["asr_unguarded"]),
            fmt(r["asr_guarded"]), fmt(r.get("asr_floor", float("nan"))), fmt(r.get("target_clean_guarded", float("nan"))),
            fmt(r["asr_correct_unguarded"]), fmt(r["asr_correct_guarded"]), fmt(r.get("asr_correct_floor", float("nan"))),
            fmt(r["acc_unguarded"]), fmt(r["acc_guarded"]), fmt(r["scan_over_epoch"], False), fmt(r["overhead"]),
            fmt(r["guard_mem_mb"], False)]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attacks", nargs="*", default=["badnets", "blended", "wanet"], help=f"any of {sorted(ATTACKS)}")
    ap.add_argument("--rates", nargs="+", type=float, default=[0.05, 0.1])
    ap.add_argument("--no-attack", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--trust-free", nargs="*", default=["badnets:0.1", "none:0"],
                    help="attack:rate runs repeated in trust-free mode")
    ap.add_argument("--n-train", type=int, default=10000, help="training subset size (0: all of CIFAR-10's train split)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--batch-size", type=int, default=128, help="training batch size (the guard's scans use its own)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trusted", type=int, default=100, help="trusted samples per class")
    ap.add_argument("--augment", action="store_true", help="random crop + flip in the training Dataset")
    ap.add_argument("--recipe", default="plain", choices=["plain", "strong"],
                    help="strong: torchvision's reference recipe on top of crop + flip (TrivialAugmentWide, "
                         "RandomErasing 0.1, label smoothing 0.1, MixUp 0.2 / CutMix 1.0 per batch)")
    ap.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    ap.add_argument("--no-scan-dataset", action="store_true",
                    help="no scan_dataset given to the guard: it reads its own view (guard.scan_view), as a newcomer's run")
    ap.add_argument("--attack-args", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="further attack fields, e.g. cover_rate=0.05 (JSON values)")
    ap.add_argument("--layer-auroc", action="store_true",
                    help="record per-layer AUROC of poison vs benign in the target class at each scan")
    ap.add_argument("--trace-memory", action="store_true",
                    help="record each run's peak Python allocation (tracemalloc slows the scan's analysis)")
    ap.add_argument("--device", default="cpu", help="where the model trains, e.g. cuda")
    ap.add_argument("--give-optimizer", action=argparse.BooleanOptionalAction, default=True,
                    help="GuardedDataset(optimizer=opt): unlearning at the training's current learning rate "
                         "(--no-give-optimizer: at GuardConfig.unlearn_lr, as before this option)")
    ap.add_argument("--guard", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="GuardConfig fields for every run, e.g. num_workers=8 (JSON values)")
    ap.add_argument("--out", default=str(HERE / "results" / "guard_cifar10.json"))
    ap.add_argument("--render", metavar="JSON", help="only re-render the table of an earlier result file")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="merge result files of parallel runs (e.g. one per pinned core) into --out")
    a = ap.parse_args(argv)
    if a.render:
        saved = json.loads(Path(a.render).read_text())
        print(table(with_floors({"runs": saved["runs"], "rows": [row(n, r) for n, r in saved["runs"].items()]})["rows"]))
        render_benchmarks()
        print(json.dumps(saved["meta"]))
        return 0
    if a.merge:
        parts = [json.loads(Path(p).read_text()) for p in a.merge]
        for sc in (sc for p in parts for r in p["runs"].values() for sc in r.get("scans", [])):
            sc.pop("reference_scores", None)     # per-sample plot data: keeps a merged file small
        merged = {"meta": {"parts": [p["meta"] for p in parts]}, "rows": [r for p in parts for r in p["rows"]],
                  "runs": {k: v for p in parts for k, v in p["runs"].items()}}
        write(Path(a.out), merged)
        return 0
    torch.set_num_threads(max(1, torch.get_num_threads()))
    pct = lambda r: f"{r:.1%}".replace(".0%", "%")  # noqa: E731 - 0.5 % stays 0.5 %, 10 % stays 10 %
    runs = [(f"{atk} {pct(rate)}", atk, rate, False) for atk in a.attacks for rate in a.rates]
    if a.no_attack:
        runs.append(("no attack", None, 0.0, False))
    for item in a.trust_free:
        atk, rate = item.rsplit(":", 1)              # zoo triggers: zoo:SEED:INDEX:RATE
        runs.append((f"{atk} {pct(float(rate))} trust-free" if atk != "none" else "no attack trust-free",
                     None if atk == "none" else atk, float(rate), True))
    if a.seed:
        runs = [(f"{name} seed {a.seed}", atk, rate, tf) for name, atk, rate, tf in runs]
    for name, atk, _, _ in runs:                  # before any training: --attack-args go to every attacked run
        try:
            make_attack(atk, **fields(a.attack_args)) if atk else None
        except TypeError as e:
            ap.error(f"--attack-args {' '.join(a.attack_args)} do not fit the run {name!r} ({e}); name the "
                     "trust-free runs too (--trust-free ATTACK:RATE ..., or --trust-free with nothing for none)")
    results, rows = {}, []
    t0 = time.time()
    for name, atk, rate, tf in runs:
        spec = RunSpec(data="cifar10", attack=atk, rate=rate, n_train=a.n_train or None, epochs=a.epochs,
                       width=a.width, lr=a.lr, seed=a.seed, trust_free=tf, device=a.device,
                       trusted_per_class=a.trusted, augment=a.augment, scan_dataset=not a.no_scan_dataset,
                       attack_kwargs=fields(a.attack_args) if atk else {}, guard=fields(a.guard),
                       give_optimizer=a.give_optimizer, batch_size=a.batch_size, recipe=a.recipe,
                       optimizer=a.optimizer)
        r = run(spec, compare=not tf, on_scan=layer_auroc if a.layer_auroc and not tf else None,
                trace_memory=a.trace_memory)
        r.pop("report")
        results[name] = r
        rows.append(row(name, r))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    meta = {"machine": platform.platform(), "processor": platform.processor(), "python": sys.version.split()[0],
            "torch": torch.__version__, "threads": torch.get_num_threads(), "seed": a.seed,
            "n_train": next(iter(results.values()))["n_train"] if results else a.n_train, "epochs": a.epochs,
            "width": a.width, "lr": a.lr, "device": a.device, "guard": a.guard, "trusted": a.trusted,
            "augment": a.augment, "scan_dataset": not a.no_scan_dataset, "give_optimizer": a.give_optimizer,
            "attack_args": a.attack_args, "batch_size": a.batch_size, "recipe": a.recipe, "optimizer": a.optimizer,
            "gpu": torch.cuda.get_device_name() if a.device.startswith("cuda") else None,
            "wall_seconds": time.time() - t0}
    write(Path(a.out), {"meta": meta, "rows": rows, "runs": results})
    return 0


def with_floors(result: dict) -> dict:
    """Each attack row's floor: its trigger's attack success on the no-attack run's final model,
    which never saw it (what misclassification into the target class alone gives)."""
    floor = next((r["trigger_floor"] for n, r in result["runs"].items() if n.startswith("no attack")
                  and "trigger_floor" in r), {})
    for r in result["rows"]:
        f = floor.get(r.get("attack"))
        if isinstance(f, dict):
            r["asr_floor"], r["asr_correct_floor"] = f["all"], f["correct"]
        elif f is not None:                  # results written before the "correct" floor existed
            r["asr_floor"] = f
    return result


def write(out: Path, result: dict) -> None:
    """The JSON result, a markdown table beside it, and BENCHMARKS.md regenerated from every result."""
    result = with_floors(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=float))
    md = table(result["rows"])
    out.with_suffix(".md").write_text(f"{md}\n\n{json.dumps(result['meta'])}\n")
    print(md)
    print(json.dumps(result["meta"]))
    render_benchmarks()


def render_benchmarks(results: Path = HERE / "results", target: Path = HERE.parent / "BENCHMARKS.md") -> None:
    """BENCHMARKS.md: one section per result file (its table and the machine/settings it ran on),
    under the hand-written notes kept in ``benchmarks/NOTES.md``."""
    parts = ["# Benchmarks", "", "Generated by `benchmarks/bench_guard.py` from `benchmarks/results/*.json`; "
             "do not edit by hand (notes live in `benchmarks/NOTES.md`).", ""]
    notes = HERE / "NOTES.md"
    if notes.exists():
        parts += [notes.read_text().strip(), ""]
    plotted = False
    for path in sorted(results.glob("*.json")):
        saved = json.loads(path.read_text())
        if "markdown" in saved:                    # benchmarks/bench_archs.py: the section comes written
            parts += [f"## {path.stem}", "", saved["markdown"].strip(), ""]
            continue
        if "speedup" in saved:                     # benchmarks/bench_distributed.py
            one, two = saved["single"], saved["ranks"]
            parts += [f"## {path.stem}", "",
                      f"One scan of a {saved['n_train']:,}-image CIFAR-10 subset (width-16 ResNet-18 after 2 epochs "
                      f"of BadNets 10 %), torch {saved['torch']}, gloo, one thread per process, median of "
                      f"{len(one['scan_seconds'])}:", "",
                      "| ranks | scan s | guard MB per rank | quarantined |", "|---|---|---|---|",
                      f"| 1 | {one['median']:.2f} | {one['guard_mb']:.2f} | {one['quarantined']} |",
                      f"| 2 | {max(r['median'] for r in two):.2f} | "
                      + " / ".join(f"{r['guard_mb']:.2f}" for r in two) + f" | {two[0]['quarantined']} |", "",
                      f"speed-up {saved['speedup']:.2f}x; identical quarantine on both ranks and the single "
                      f"process: {saved['same_quarantine']}.", ""]
            continue
        if "synthetic" in saved:                   # benchmarks/bench_scale.py
            parts += [f"## {path.stem}", "",
                      "Scan time and guard memory against N and layer width (one forced scan; torch "
                      f"{saved['meta']['torch']}, {saved['meta']['threads']} thread(s); {saved['meta']['machine']}). "
                      "Peak traced = numpy/Python allocations during the scan (the guard's tables; torch's own "
                      "allocator, holding model and batch, is not traced).", "",
                      path.with_suffix(".md").read_text().strip(), ""]
            continue
        if "cells" in saved:                       # benchmarks/bench_peers.py
            metas = saved["meta"].get("parts", [saved["meta"]])
            m = metas[0]
            wall = max(p["wall_seconds"] for p in metas) / 60
            parts += [f"## {path.stem}", "",
                      "`python benchmarks/bench_peers.py "
                      + (f"--suite {m.get('suite', 'full')}" if path.stem in ("peers_quick", "peers_full")
                         else "--cells " + " ".join(f"{c['attack'] or 'none'}:{c['rate']:g}"
                                                    + ("" if c["model"] == "auto" else f":{c['model']}")
                                                    + "".join(f":{k}={json.dumps(v, separators=(',', ':'))}"
                                                              for k, v in c.get("attack_kwargs", {}).items())
                                                    for c in saved["cells"].values()) + " --cost")
                      + f"`: {len(metas)} process(es) "
                      f"of {m['threads']} thread(s), {wall:.0f} minutes wall (the longest process). "
                      "Every detector on the same checkpoint (the first of the guard's default scans, epochs 2, 4, 6 "
                      f"of {m['epochs']}, where the attack is learned) of a poisoned {m['n_train']:,}-image CIFAR-10 "
                      f"run, width-{m['width']} "
                      f"ResNet-18 unless named, lr {m['lr']}, seed {m['seed']}, torch {m['torch']}; {m['machine']}. "
                      "Cells: F1 (TPR / FPR), all in %; FPR over all benign training samples.", "",
                      path.with_suffix(".md").read_text().strip(), ""]
            if not plotted:                        # the plots folder is shared by both suites: shown once
                parts += [f"![{png.stem}](benchmarks/results/plots/{png.name})" for png in
                          sorted((results / "plots").glob("*.png"))
                          if not png.stem.endswith("_layer_auroc") and not png.stem.startswith("zoo_")] + [""]
                plotted = True
            continue
        rows = with_floors({"runs": saved["runs"], "rows": [row(n, r) for n, r in saved["runs"].items()]})["rows"]
        metas = saved["meta"].get("parts", [saved["meta"]])
        m = metas[0]
        parts += [f"## {path.stem}", "",
                  f"CIFAR-10 {m['n_train']:,}-image subset, width-{m['width']} ResNet-18, "
                  f"{' or '.join(sorted({str(p['epochs']) for p in metas}, key=int))} epochs, "
                  f"lr {m['lr']}, seed {' or '.join(sorted({str(p['seed']) for p in metas}))}, torch {m['torch']}, "
                  + ("random crop + flip, " if m.get("augment") else "")
                  + (f"{m['trusted']} trusted per class, " if "trusted" in m else "")
                  + (f"trained on one {m['gpu']}, " if m.get("gpu") else "")
                  + (f"GuardConfig {', '.join(m['guard'])}, " if m.get("guard") else "")
                  + f"{m['threads']} thread(s) per process, "
                  f"{len(metas)} process(es); {m['machine']}.", "", table(rows), "",
                  "max class drop (share of one class quarantined): " + ", ".join(
                      f"{r['run']} {fmt(r['max_class_drop'])} %" for r in rows), ""]
        covers = [f"{r['run']} {fmt(r['covers_quarantined'])} %" for r in rows if not np.isnan(r["covers_quarantined"])]
        if covers:
            parts += ["cover samples quarantined (triggered, true label kept; counted as benign in FPR): "
                      + ", ".join(covers), ""]
        aurocs = auroc_lines(saved["runs"])
        if aurocs:
            png = results / "plots" / f"{path.stem}_layer_auroc.png"
            plot_auroc(saved["runs"], png)
            parts += ["Per-layer AUROC of the poison against the benign samples of the target class (cosine to "
                      "the trusted class mean), at each scan: the best layer, and the head:", "", *aurocs, "",
                      f"![{png.stem}](benchmarks/results/plots/{png.name})", ""]
    target.write_text("\n".join(parts))


def auroc_lines(runs: dict) -> list[str]:
    out = []
    for name, r in runs.items():
        scans = [s for s in r.get("on_scan", []) if s.get("auroc")]
        if scans:
            best = [max(s["auroc"], key=s["auroc"].get) for s in scans]
            out.append(f"- {name}: " + "; ".join(
                f"epoch {s['epoch']} {b} {s['auroc'][b]:.2f} (head {list(s['auroc'].values())[-1]:.2f})"
                for s, b in zip(scans, best)))
    return out


def plot_auroc(runs: dict, path: Path) -> None:
    """One panel per run: per-layer AUROC, one line per scan."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = {n: [s for s in r.get("on_scan", []) if s.get("auroc")] for n, r in runs.items()}
    cells = {n: s for n, s in cells.items() if s}
    cols = min(4, len(cells))
    rows = -(-len(cells) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(cells):]:
        ax.set_visible(False)
    for ax, (name, scans) in zip(axes.flat, cells.items()):
        layers = list(scans[0]["auroc"])
        for s in scans:
            ax.plot(range(len(layers)), [s["auroc"][k] for k in layers], "o-", ms=3, label=f"epoch {s['epoch']}")
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_xticks(range(len(layers)), layers, rotation=60, ha="right", fontsize=7)
        ax.set_ylim(0.0, 1.02)
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=5, ncol=2)
    for ax in axes[:, 0]:
        ax.set_ylabel("AUROC, poison vs benign (target class)", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
