"""Where does the poison a partial first catch leaves behind separate? (a lead for the follow-up)

On a zoo cell's cached unguarded models (``bench_zoo.py --train``), ``guard.detect`` at epoch
``CAUGHT`` gives the caught poison; a shrinkage LDA (the probe's, 0.8) fitted on it against the
target class's trusted samples (and, second number, against a screen of the class's kept samples)
then scores the leftover poison against the class's benign training samples, at the input pixels and
at every block, on the models of the epochs given. Prints one AUROC pair per layer.

    python benchmarks/leftover_layers.py zoo:0:6 3 3,7
    python benchmarks/leftover_layers.py zoo:1:8 3 3,7,11
    python benchmarks/leftover_layers.py zoo:1:12 15 15,19
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.bench_harm import name  # noqa: E402
from benchmarks.bench_zoo import spec  # noqa: E402
from guard import GuardConfig, detect  # noqa: E402
from guard.attacks import make_attack  # noqa: E402
from guard.experiment import prepare  # noqa: E402
from guard.hooks import pool  # noqa: E402
from guard.probe import lda_direction  # noqa: E402
from guard.reference import unit  # noqa: E402


def features(model: torch.nn.Module, ds, idx: np.ndarray, names: list[str]) -> dict[str, torch.Tensor]:
    """Unit features (the guard's pooling) of ``idx`` at ``names``, and the input pixels."""
    out: dict[str, list] = {n: [] for n in names}
    mods = dict(model.named_modules())
    hooks = [mods[n].register_forward_hook(lambda m, i, o, n=n: out[n].append(pool(o))) for n in names]
    pixels = []
    with torch.no_grad():
        for s in range(0, len(idx), 256):
            x = torch.stack([ds[int(i)][0] for i in idx[s:s + 256]])
            pixels.append(x.flatten(1))
            model(x)
    for h in hooks:
        h.remove()
    return {"pixels": unit(torch.cat(pixels).double()), **{n: unit(torch.cat(v).double()) for n, v in out.items()}}


def main() -> None:
    trigger, caught_at, epochs = sys.argv[1], int(sys.argv[2]), [int(x) for x in sys.argv[3].split(",")]
    torch.set_num_threads(1)
    atk = make_attack(trigger)
    cell = ("zoo", trigger, atk.rate, 0)
    data = prepare(spec(*cell))
    folder = HERE.parent / "runs" / "zoo" / name(*cell)

    def load(epoch: int) -> torch.nn.Module:
        m = data.make_model()
        m.load_state_dict(torch.load(folder / f"epoch{epoch}.pt", weights_only=True))
        return m.eval()

    report = detect(load(caught_at), data.train, data.trusted, GuardConfig(progress=False), data.scan)
    taken = {r.index for r in report.quarantine}
    poison = set(data.poisoned.tolist())
    caught, left = np.array(sorted(taken & poison)), np.array(sorted(poison - taken))
    benign = np.array(sorted(set(np.flatnonzero(data.labels == atk.target).tolist()) - poison))
    trusted_labels = np.array([data.trusted[i][1] for i in range(len(data.trusted))])
    trusted = np.flatnonzero(trusted_labels == atk.target)
    print(f"{trigger}: target {atk.target}, poison {len(poison)}, caught {len(caught)} at epoch {caught_at}, "
          f"left {len(left)}, benign {len(benign)}")
    names = [n for n, _ in load(caught_at).named_modules()
             if n == "stem" or n.count(".") == 1 and n.startswith("layer")]
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(len(left)), np.zeros(len(benign))]
    for epoch in epochs:
        model = load(epoch)
        fc, fl, fb = (features(model, data.scan, i, names) for i in (caught, left, benign))
        ft = features(model, data.trusted, trusted, names)
        cells = []
        for layer in fc:
            pool_ = torch.cat([fb[layer], fl[layer]])
            kept = pool_[torch.from_numpy(rng.permutation(len(pool_))[:512])]
            aurocs = [roc_auc_score(y, (torch.cat([fl[layer], fb[layer]]) @ lda_direction(fc[layer], neg, 0.8)).numpy())
                      for neg in (ft[layer], kept)]
            cells.append(f"{layer} {aurocs[0]:.2f}/{aurocs[1]:.2f}")
        print(f"epoch {epoch}: " + ", ".join(cells), flush=True)


if __name__ == "__main__":
    main()
