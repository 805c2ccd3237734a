"""What removing a zoo trigger's poison costs any defence: the poison taken out whole, by an oracle,
at the guard's first scan, and nothing unlearned, beside the unguarded twin.

The run is ``bench_zoo``'s guarded run with ``remedy="none"`` and no scan after the first; at that
scan the guard's catch is handed back and exactly the poisoned samples are quarantined instead. The
accuracy it ends with, against its twin, is what the training loses by the removal alone (fewer
samples of the target class, a model whose target class rested on the trigger); the attack success
it ends with is what training on without unlearning leaves. One run per ``--seed``; two seeds as two
pinned single-thread processes, then merge:

    GUARD_CIFAR10_ARCHIVE=... taskset -c 0 python benchmarks/zoo_oracle.py --trigger zoo:2:3 --seed 1 --out a.json &
    GUARD_CIFAR10_ARCHIVE=... taskset -c 1 python benchmarks/zoo_oracle.py --trigger zoo:2:3 --seed 0 --out b.json
    python benchmarks/zoo_oracle.py --merge a.json b.json          # -> results/zoo_oracle_cifar10.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.bench_guard import render_benchmarks  # noqa: E402
from benchmarks.bench_zoo import spec  # noqa: E402
from guard.attacks import make_attack  # noqa: E402
from guard.experiment import run  # noqa: E402


def oracle_run(trigger: str, seed: int, optimizer: str = "sgd", lr: float | None = None, arch: str | None = None) -> dict:
    atk = make_attack(trigger)
    sp = spec("guarded", trigger, atk.rate, seed, guard={"remedy": "none", "scan_every": 10**6}, optimizer=optimizer,
              arch=arch, **({} if lr is None else {"lr": lr}))

    def swap(gds, data) -> dict:
        took = gds.quarantined.copy()
        gds.restore(took)
        gds.quarantine(data.poisoned, "oracle: the poisoned samples")
        return {"guard_took": len(took), "poisoned": len(data.poisoned)}

    out = run(sp, on_scan=swap)
    g, u = out["guarded"], out["unguarded"]
    return {"trigger": trigger, "seed": seed, "optimizer": f"{optimizer} {sp.lr:g}", "arch": arch or "",
            "epoch": out["scans"][0]["epoch"],
            **out["on_scan"][0],
            "acc_oracle": g["clean_acc"], "acc_twin": u["clean_acc"],
            "asr_correct_oracle": g["attack_success_correct"], "asr_correct_twin": u["attack_success_correct"],
            "asr_oracle": g["attack_success"], "asr_twin": u["attack_success"]}


def markdown(rows: list[dict]) -> str:
    head = ("| trigger | seed | optimizer | removed at epoch | poisoned (guard's catch) | accuracy oracle / twin % | "
            "difference | ASR(correct) oracle / twin % |")
    arch = lambda r: f" ({r['arch']})" if r.get("arch") else ""  # noqa: E731
    body = [f"| {r['trigger']}{arch(r)} | {r['seed']} | {r.get('optimizer', 'sgd 0.05')} | {r['epoch']} | "
            f"{r['poisoned']} ({r['guard_took']}) | "
            f"{100 * r['acc_oracle']:.1f} / {100 * r['acc_twin']:.1f} | {100 * (r['acc_oracle'] - r['acc_twin']):+.1f} | "
            f"{100 * r['asr_correct_oracle']:.1f} / {100 * r['asr_correct_twin']:.1f} |" for r in rows]
    return "\n".join(["`python benchmarks/zoo_oracle.py`: the zoo recipe (4,000 CIFAR-10 images, crop + flip, "
                      "20 epochs), the poison removed whole by an oracle at the guard's first scan, nothing "
                      "unlearned, beside the unguarded twin.", "", head, "|" + "---|" * (head.count("|") - 1), *body])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trigger", default="zoo:2:3")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(HERE / "results" / "zoo_oracle_cifar10.json"))
    ap.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    ap.add_argument("--lr", type=float, help="peak learning rate (default: bench_zoo's)")
    ap.add_argument("--arch", help="a hand-written model of guard.archs as NAME[:WIDTH] (bench_zoo.py --arch)")
    ap.add_argument("--merge", nargs="+", metavar="JSON")
    a = ap.parse_args()
    if a.merge:
        rows = [r for p in a.merge for r in json.loads(Path(p).read_text())["rows"]]
    else:
        rows = [oracle_run(a.trigger, a.seed, a.optimizer, a.lr, a.arch)]
    Path(a.out).write_text(json.dumps({"rows": rows, "markdown": markdown(rows)}, indent=1))
    print(markdown(rows))
    if a.merge:
        render_benchmarks()


if __name__ == "__main__":
    main()
