"""The main demo: poison a real dataset, train a model with the guard, show what was caught.

    python examples/demo.py                      # scikit-learn digits, offline, about a minute
    python examples/demo.py --data cifar10       # CIFAR-10 subset from $GUARD_CIFAR10_ARCHIVE
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from guard.experiment import RunSpec, run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=["digits", "cifar10"], default="digits")
    ap.add_argument("--attack", choices=["badnets", "blended", "wanet", "none"], default="badnets")
    ap.add_argument("--rate", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--n-train", type=int, default=None, help="CIFAR-10 training subset size (default 10000)")
    ap.add_argument("--trust-free", action="store_true", help="no trusted set: build the reference from training data")
    ap.add_argument("--out", default="runs/demo", help="folder for report.json / quarantine.csv / samples.csv")
    a = ap.parse_args(argv)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    if a.data == "digits":
        spec = RunSpec(data="digits", attack=None if a.attack == "none" else a.attack, rate=a.rate,
                       epochs=a.epochs or 12, lr=0.05, batch_size=64, width=16, trusted_per_class=20,
                       trust_free=a.trust_free, guard={"warmup_epochs": 4, "scan_every": 4})
    else:
        spec = RunSpec(data="cifar10", attack=None if a.attack == "none" else a.attack, rate=a.rate,
                       epochs=a.epochs or 6, n_train=a.n_train or 10000, trust_free=a.trust_free)
    res = run(spec)
    g, u = res["guarded"], res.get("unguarded", {})
    report = res.pop("report")
    print(report.summary())
    print()
    print(f"data: {spec.data}, {res['n_train']} training samples, attack: {spec.attack} at {spec.rate:.0%} "
          f"(target class {spec.target}), {g['poisoned']} poisoned")
    print(f"quarantined: {g['flagged']}  TPR {g['tpr']:.2%}  FPR {g['fpr']:.2%}  (paper rule at first scan: "
          + (f"TPR {res['paper_rule'][0]['tpr']:.2%}  FPR {res['paper_rule'][0]['fpr']:.2%})" if res["paper_rule"] else "no scan)"))
    w = res.get("warmup", {})
    print(f"attack success: after warm-up {w.get('attack_success', float('nan')):.2%}; final without guard "
          f"{u.get('attack_success', float('nan')):.2%}, with guard {g['attack_success']:.2%}")
    print(f"clean accuracy: without guard {u.get('clean_acc', float('nan')):.2%}, with guard {g['clean_acc']:.2%}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    report.save_json(out / "report.json")
    report.save_csv(out / "quarantine.csv")
    (out / "result.json").write_text(json.dumps(res, indent=2, default=float))
    print(f"report: {out / 'report.json'}, quarantine table: {out / 'quarantine.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
