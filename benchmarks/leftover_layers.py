"""Where does the poison a partial first catch leaves behind separate? (a lead for the follow-up)

On a zoo cell's cached unguarded models (``bench_zoo.py --train``), ``guard.detect`` at epoch
``CAUGHT`` gives the caught poison; a shrinkage LDA (the probe's ``probe_shrinkage``) fitted on it
against the target class's trusted samples (and, second number, against a screen of the class's
kept samples) then scores the leftover poison against the class's benign training samples, at the
input pixels and at every block (read as a scan reads them), on the models of the epochs given.
Prints one AUROC pair per layer.

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
from guard import GuardConfig, GuardedDataset, detect  # noqa: E402
from guard.attacks import make_attack  # noqa: E402
from guard.experiment import prepare  # noqa: E402
from guard.hooks import scan_mode  # noqa: E402
from guard.probe import lda_direction  # noqa: E402
from guard.reference import unit  # noqa: E402
from guard.thresholds import Thresholds  # noqa: E402


def features(gds: GuardedDataset, ds, idx: np.ndarray, names: list[str]) -> dict[str, torch.Tensor]:
    """Unit features of ``idx`` at ``names`` as a scan reads them (``gds``'s extractor), and the
    input pixels."""
    with scan_mode(gds.scanner.model):
        batches = list(gds.extractor.stream(ds, names, idx, "leftovers", stop_early=True))
    pixels = torch.stack([ds[int(i)][0].flatten() for i in idx])
    return {"pixels": unit(pixels.double()),
            **{n: unit(torch.cat([b.feats[k] for b in batches]).double()) for k, n in enumerate(names)}}


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
    trusted = np.flatnonzero(data.trusted.labels == atk.target)
    print(f"{trigger}: target {atk.target}, poison {len(poison)}, caught {len(caught)} at epoch {caught_at}, "
          f"left {len(left)}, benign {len(benign)}")
    names = [n for n, _ in load(caught_at).named_modules()
             if n == "stem" or n.count(".") == 1 and n.startswith("layer")]
    shrinkage = Thresholds().probe_shrinkage
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(len(left)), np.zeros(len(benign))]
    for epoch in epochs:
        gds = GuardedDataset(data.train, load(epoch), GuardConfig(progress=False), trusted=data.trusted)
        fc, fl, fb = (features(gds, data.scan, i, names) for i in (caught, left, benign))
        ft = features(gds, data.trusted, trusted, names)
        cells = []
        for layer in fc:
            pool_ = torch.cat([fb[layer], fl[layer]])
            kept = pool_[torch.from_numpy(rng.permutation(len(pool_))[:512])]
            aurocs = [roc_auc_score(y, (torch.cat([fl[layer], fb[layer]]) @ lda_direction(fc[layer], neg, shrinkage)).numpy())
                      for neg in (ft[layer], kept)]
            cells.append(f"{layer} {aurocs[0]:.2f}/{aurocs[1]:.2f}")
        print(f"epoch {epoch}: " + ", ".join(cells), flush=True)


if __name__ == "__main__":
    main()
