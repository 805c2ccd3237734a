"""The input view alone (``guard.inputs``): which zoo triggers its direction test finds, without a model.

For every trigger of a zoo seed (the zoo's data: CIFAR-10 4,000 images, 50 trusted a class, read
without augmentation as a scan reads them), the direction test (``guard.direction``) runs on each
class's high-passed images against the class's trusted images, exactly as a scan runs it in the
input view, and its p-value is corrected as a scan corrects it beside ``LAYERS`` model layers
(x (LAYERS + 1); the two sides are in ``direction_test``'s p already). A class is acted on below
``max_false_alarm / classes``. Prints per trigger the target class's p, share beyond every trusted
image, the share of the poison among those beyond (TPR of the test's own seed) and the poison's AUROC
on the held-out projection, and the smallest p of the nine clean classes.

    python benchmarks/input_view.py --zoo-seed 2 --out benchmarks/results/input_view_zoo2.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.bench_zoo import spec  # noqa: E402
from guard.attacks import make_attack  # noqa: E402
from guard.direction import direction_test  # noqa: E402
from guard.experiment import prepare  # noqa: E402
from guard.inputs import high_pass  # noqa: E402
from guard.reference import unit  # noqa: E402
from guard.thresholds import Thresholds  # noqa: E402

LAYERS = 10          # the probe layers a scan of the zoo's ResNet-18 tests beside the input


def view(ds) -> torch.Tensor:
    return unit(high_pass(torch.stack([ds[i][0] for i in range(len(ds))])))


def trigger_row(trigger: str | None, seed: int = 0) -> dict:
    atk = make_attack(trigger) if trigger else None
    data = prepare(spec("zoo", trigger, atk.rate if atk else 0.0, seed))
    x, t = view(data.scan), view(data.trusted)
    lab, tlab = data.labels, data.trusted.labels
    poison = np.isin(np.arange(len(lab)), data.poisoned)
    bar = Thresholds().max_false_alarm / data.num_classes
    rows = {}
    rng, n = np.random.default_rng([seed, 3]), Thresholds().screen_per_class
    for c in range(data.num_classes):
        mine = np.sort(rng.choice(np.flatnonzero(lab == c), min(int((lab == c).sum()), n), replace=False))
        test = direction_test([x[torch.from_numpy(mine)]], [t[torch.from_numpy(tlab == c)]], 0)
        p = min(1.0, test.p * (LAYERS + 1))
        pc = poison[mine]
        rows[c] = {"p": p, "share": test.share, "acted": p < bar,
                   "tpr": float(test.beyond[pc].mean()) if pc.any() else None,
                   "auroc": float(roc_auc_score(pc, test.z)) if 0 < pc.sum() < len(pc) else None}
    target = atk.target if atk else None
    clean = [r["p"] for c, r in rows.items() if c != target]
    return {"trigger": trigger or f"none (seed {seed})", "attack": repr(atk) if atk else "none",
            "family": atk.name if atk else "none", "kind": getattr(atk, "kind", getattr(atk, "style", "")) if atk else "",
            "target": target, "rate": atk.rate if atk else 0.0, "target_row": rows.get(target),
            "clean_min_p": min(clean), "clean_acted": int(sum(p < bar for p in clean)), "bar": bar}


def markdown(rows: list[dict], zoo_seed: int) -> str:
    lines = [f"`python benchmarks/input_view.py --zoo-seed {zoo_seed}`: the direction test in the input view alone "
             "(high-passed images, no model), zoo data (CIFAR-10 4,000, 50 trusted a class), p corrected as beside "
             f"{LAYERS} model layers; acted on below {rows[0]['bar']:.0e}. TPR: share of the poison beyond every trusted "
             "image on the held-out projection (the probe's seed); a screen of up to 512 a class, as a scan takes.", "",
             "| trigger | family | target / rate | p | acted | share beyond | TPR | AUROC | clean classes: min p, acted |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["target_row"]
        cells = (["-"] * 5 if t is None else
                 [f"{t['p']:.0e}", "yes" if t["acted"] else "no", f"{t['share']:.0%}", f"{t['tpr']:.0%}",
                  f"{t['auroc']:.2f}"])
        fam = r["family"] + (f" ({r['kind']})" if r["kind"] else "")
        lines.append(f"| {r['trigger']} | {fam} | {r['target'] if r['target'] is not None else '-'} / {r['rate']:.1%} | "
                     + " | ".join(cells) + f" | {r['clean_min_p']:.0e}, {r['clean_acted']} |")
    acted = [r for r in rows if r["target_row"] and r["target_row"]["acted"]]
    lines += ["", f"Acted on: {len(acted)} of {sum(r['target_row'] is not None for r in rows)} triggers; clean classes "
              f"acted on: {sum(r['clean_acted'] for r in rows)} of {sum(9 if r['target_row'] else 10 for r in rows)}."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo-seed", type=int, default=2)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--clean", type=int, default=2, help="no-attack data seeds")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = [trigger_row(f"zoo:{a.zoo_seed}:{i}") for i in range(a.n)] + [trigger_row(None, s) for s in range(a.clean)]
    md = markdown(rows, a.zoo_seed)
    print(md)
    if a.out:
        Path(a.out).write_text(json.dumps({"rows": rows, "markdown": md}, indent=1, default=float))


if __name__ == "__main__":
    main()
