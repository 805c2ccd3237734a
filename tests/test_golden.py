"""The scan's decisions on saved real-data checkpoints are exactly the recorded ones (see tests/golden.py)."""

import json

import pytest

from tests.golden import CASES, FOLDER, MODES, outputs

GOLDEN = json.loads((FOLDER / "outputs.json").read_text())


def _same(got, want, where: str) -> None:
    if isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-3, abs=1e-3), where
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for k in want:
            _same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list) and want and isinstance(want[0], (dict, float)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _same(g, w, f"{where}[{i}]")
    else:
        assert got == want, where          # indices, verdicts, layer names, counts: exactly


@pytest.mark.cifar
@pytest.mark.parametrize("case", list(CASES))
def test_scan_decisions_match_the_golden_outputs(case, cifar_archive):
    for mode in MODES:
        _same(outputs(case, mode, cifar_archive), GOLDEN[f"{case}/{mode}"], f"{case}/{mode}")


@pytest.mark.cifar
@pytest.mark.parametrize("case", ["badnets", "blended"])
def test_flag_split_takes_the_same_poison_with_fewer_benign_samples(case, cifar_archive):
    """The opt-in two-group cut (``Thresholds.flag_split``) on the golden checkpoints, whose poisoned
    clusters stand apart at the layers (``scan_inputs=False``; in the fine input view hardly a benign
    image lies near them): every poisoned sample the fixed cut at ``flag_z`` takes is still taken, with at
    most half of the benign samples (recorded: 47 -> 17 for BadNets, 39 -> 4 for Blended); and no more
    than the default cut beyond the trusted extreme (``flag_beyond_trusted``: 28 and 19)."""
    import numpy as np
    import torch

    from guard import GuardConfig, GuardedDataset
    from tests.golden import _data, _model

    data = _data(case, cifar_archive)
    model = _model()
    model.load_state_dict(torch.load(FOLDER / f"{case}.pt", weights_only=True))
    taken = {}
    for split, beyond in ((False, False), (True, False), (False, True)):
        cfg = GuardConfig(remedy="none", progress=False, scan_inputs=False,
                          thresholds={"flag_split": split, "flag_beyond_trusted": beyond})
        gds = GuardedDataset(data.train, model, cfg, trusted=data.trusted)
        gds.scan(0)
        q = gds.quarantined
        taken[split, beyond] = (np.isin(q, data.poisoned).sum(), (~np.isin(q, data.poisoned)).sum())
    fixed, split, default = taken[False, False], taken[True, False], taken[False, True]
    assert fixed[0] == split[0] == default[0] == len(data.poisoned)
    assert fixed[1] >= 20 and split[1] <= fixed[1] / 2 and split[1] <= default[1] < fixed[1]



@pytest.mark.cifar
def test_trust_free_finds_the_blended_poison_in_the_images(cifar_archive):
    """Without a trusted set the model-based stages miss the Blended checkpoint's poison (its class's
    trust-free reference is the half the model fits worst); the images, each class held against the
    other classes' (``guard.direction.across_classes``), show it. What the recorded outputs must keep:
    every poisoned sample at the first scan, at most 1 % of the benign ones, and nothing in the clean
    checkpoint."""
    from tests.golden import _data

    data = _data("blended", cifar_archive)
    poisoned = set(data.poisoned.tolist())
    first = set(GOLDEN["blended/trust-free"]["scans"][0]["quarantined"])
    assert poisoned <= first
    assert len(first - poisoned) <= 0.01 * (len(data.train) - len(poisoned))
    assert GOLDEN["clean/trust-free"]["scans"][-1]["quarantined"] == []


@pytest.mark.cifar
def test_a_small_screen_passes_the_gate_held_against_all_trusted_samples_and_not_the_cross_fitted_one(cifar_archive):
    """A 16-sample screen of the BadNets checkpoint's poisoned class: held against all 30 trusted samples
    (``gate_cross_fit=False``, the gate before cross-fitting) it is acted on, 30 taken under the cap;
    held against a half that did not choose the direction, 16 samples cannot beat the bar, and
    nothing is taken by that route (the recorded outputs: none at either scan)."""
    import torch

    from guard import GuardConfig, GuardedDataset
    from tests.golden import _data, _model

    data = _data("badnets", cifar_archive)
    model = _model()
    model.load_state_dict(torch.load(FOLDER / "badnets.pt", weights_only=True))
    th = {**MODES["small-screen"]["thresholds"], "gate_cross_fit": False}
    gds = GuardedDataset(data.train, model, GuardConfig(remedy="none", progress=False, thresholds=th),
                         trusted=data.trusted)
    gds.scan(0)
    c = gds.report.scans[-1].classes[0]
    assert c.verdict == "separate cluster" and c.n_flagged == 30 and c.beyond_p < 1e-4
    assert GOLDEN["badnets/small-screen"]["scans"][0]["quarantined"] == []
