"""The post-hoc route: guard.detect on a trained model, a DataFrame per sample and per class."""

import numpy as np
import pytest
import torch

import guard
from guard.experiment import RunSpec, detection, prepare
from tests.conftest import Blobs, mlp, train
from tests.golden import fit


def test_detect_reports_per_sample_and_never_changes_the_model():
    ds = Blobs(600, poison=0.08, seed=0)
    model = train(mlp(), ds, epochs=25).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = guard.detect(model, ds, trusted=Blobs(150, seed=7))
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert report.scans[-1].remedy is None
    df = report.to_pandas()
    assert list(df.columns) == ["label", "status", "is_quarantined", "score", "threshold", "layer", "reason", "scan"]
    assert len(df) == 600 and df.index.tolist() == list(range(600))
    flagged = df.index[df.is_quarantined].to_numpy()
    d = detection(flagged, ds.poisoned, len(ds))
    assert d["tpr"] >= 0.95 and d["fpr"] <= 0.02
    hit = df.loc[flagged]
    assert (hit.score >= hit.threshold).all() and (hit.scan == 1).all() and hit.reason.str.contains("class 0").all()
    per_class = report.to_pandas(per="class")
    assert per_class.set_index("cls").loc[0, "quarantined"] == len(flagged)
    # a report read back from JSON keeps the quarantined rows
    again = guard.GuardReport.model_validate_json(report.model_dump_json()).to_pandas()
    assert again.index.tolist() == sorted(flagged.tolist())


@pytest.mark.cifar
def test_detect_on_a_model_trained_on_poisoned_cifar10(cifar_archive):
    # a small CNN trained 3 epochs on 3,000 real CIFAR-10 images with BadNets 10 % (attack success
    # 100 %, clean accuracy 36 %); measured: TPR 100 %, FPR 1.1 % (29 of 2,700 clean samples, class 0)
    data = prepare(RunSpec(data="cifar10", attack="badnets", rate=0.1, n_train=3000, trusted_per_class=30,
                           archive=cifar_archive))
    model = fit(data.train, epochs=3)
    report = guard.detect(model, data.train, trusted=data.trusted)
    df = report.to_pandas()
    d = detection(df.index[df.is_quarantined].to_numpy(), data.poisoned, len(data.labels))
    assert d["tpr"] >= 0.95 and d["fpr"] <= 0.02, d
    assert np.isfinite(df.score).all() and set(df.label) == set(range(10))
