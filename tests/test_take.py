"""What a first catch takes: with a trusted set, only above the class's highest trusted sample on the
same score (where that is above ``flag_z``), so the benign share taken is bounded by the trusted set's size."""

import numpy as np
import pytest
import torch

from guard import GuardConfig, detect


@pytest.mark.cifar
@pytest.mark.parametrize("case", ["badnets", "blended"])
def test_a_first_catch_takes_only_beyond_the_highest_trusted_sample(case, cifar_archive):
    from tests.golden import FOLDER, _data, _model

    data = _data(case, cifar_archive)
    model = _model()
    model.load_state_dict(torch.load(FOLDER / f"{case}.pt", weights_only=True))
    taken = {}
    for beyond in (True, False):
        cfg = GuardConfig(progress=False, thresholds={"flag_beyond_trusted": beyond})
        report = detect(model, data.train, data.trusted, cfg)
        scan, target = report.scans[0], report.scans[0].classes[0]
        assert target.verdict == "separate cluster"
        q = np.array([r.index for r in report.quarantine])
        taken[beyond] = (int(np.isin(q, data.poisoned).sum()), int((~np.isin(q, data.poisoned)).sum()))
        ref = np.array(scan.reference_scores)[np.asarray(data.trusted.labels) == 0]
        if beyond:                              # the bar is the target's highest trusted score, above flag_z here
            assert target.threshold == pytest.approx(float(ref.max()), abs=1e-3) and target.threshold > 2.0
        else:
            assert target.threshold == 2.0 and (ref > 2.0).any()
    # every poisoned sample is still taken; the benign ones between flag_z and the trusted extreme are not
    assert taken[True][0] == taken[False][0] == len(data.poisoned)
    assert taken[True][1] <= taken[False][1] - 15, taken
