"""What a class found separate again holds: the cut of the re-catch and the earlier catch's samples.

Runs a guarded training (no twin) up to its ``SCANS``-th scan and records, with the ground truth,
every confirmed class's probe z of its kept samples (what a cut at ``flag_z`` 2 or ``follow_z`` 3
takes) and, where the class already holds quarantined samples, the new probe's z of those (what
``decide.give_back`` would give back). Prints per class and scan the poisoned / benign counts.
A zoo trigger runs the zoo recipe (``bench_zoo.spec``); a JSON object is a ``RunSpec``.

    python benchmarks/recatch_study.py zoo:0:17 2
    python benchmarks/recatch_study.py zoo:1:8 2
    python benchmarks/recatch_study.py '{"data": "cifar10", "attack": "adaptive_patch", "rate": 0.1,
        "attack_kwargs": {"cover_rate": 0.2, "train_alphas": [1.0, 0.4, 1.0, 0.6]}, "target": 0,
        "n_train": 10000, "trusted_per_class": 100, "epochs": 8, "lr": 0.01, "augment": false}' 3
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.bench_zoo import spec  # noqa: E402
from guard import scan as S  # noqa: E402
from guard.attacks import make_attack  # noqa: E402
from guard.experiment import RunSpec, prepare, run  # noqa: E402
from guard.inputs import read_views  # noqa: E402


class _Stop(Exception):
    pass


def main() -> None:
    what, scans = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    sp = RunSpec(**json.loads(what)) if what.startswith("{") else spec("zoo", what, make_attack(what).rate, 0)
    data = prepare(sp)
    poisoned, labels = set(data.poisoned.tolist()), np.asarray(data.labels)
    lines: list[str] = []

    def count(z: np.ndarray, idx: np.ndarray, bar: float, above: bool) -> str:
        p = np.array([int(i) in poisoned for i in idx], dtype=bool)
        hit = z > bar if above else z < bar
        return f"{int((hit & p).sum())}p/{int((hit & ~p).sum())}b"

    def earlier(st, c: int, z: np.ndarray) -> None:
        q = np.setdiff1d(np.flatnonzero(labels == c), st.kept)
        lines.append(f"  class {c}: its {len(q)} quarantined on the new probe: above 3 {count(z, q, 3.0, True)}, "
                     f"below 2 {count(z, q, 2.0, False)}")

    flag, probed, input_probed = S.Scanner._flag, S.Scanner._flag_probed, S.Scanner._flag_input_probed

    def _flag(self, st, c, rows, z, verdict):
        idx = st.kept[rows]
        lines.append(f"  class {c} {verdict.value} (quarantined before: {st.classes[c].n_quarantined_before}): "
                     f"z > 2 {count(z, idx, 2.0, True)}, z > 3 {count(z, idx, 3.0, True)}")
        return flag(self, st, c, rows, z, verdict)

    def _flag_probed(self, train, st, probes, probe_ids, desc, verdict):
        for c, probe in probes.items():
            q = np.setdiff1d(np.flatnonzero(labels == c), st.kept)
            if len(q):
                at = list(range(len(probe_ids)))
                earlier(st, c, self._probe_z(train, st, probe, probe_ids, at, q))
        return probed(self, train, st, probes, probe_ids, desc, verdict)

    def _flag_input_probed(self, train, st, probes, views):
        ex = self.extractor
        for c, (k, probe) in probes.items():
            q = np.setdiff1d(np.flatnonzero(labels == c), st.kept)
            if len(q):
                units = views.units(read_views(train, q, ex.adapter, ex.batch_size, ex.num_workers))
                earlier(st, c, probe.z([units[k].double()]))
        return input_probed(self, train, st, probes, views)

    S.Scanner._flag, S.Scanner._flag_probed, S.Scanner._flag_input_probed = _flag, _flag_probed, _flag_input_probed

    def on_scan(gds, _data):
        s = gds.report.scans[-1]
        print(f"scan {s.scan} (epoch {s.epoch}): +{s.new_quarantined}, given back {len(s.released)}", flush=True)
        print("\n".join(lines), flush=True)
        lines.clear()
        if len(gds.report.scans) >= scans:
            raise _Stop

    try:
        run(sp, compare=False, data=data, on_scan=on_scan)
    except _Stop:
        pass


if __name__ == "__main__":
    main()
