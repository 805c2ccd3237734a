"""Do no harm: a clean model on real CIFAR-10 with a small trusted set loses no class's samples."""

import numpy as np
import pytest
import torch

import guard
from tests.golden import FOLDER, _model


@pytest.mark.cifar
@pytest.mark.parametrize("trusted", [10, None])
def test_a_clean_cifar10_model_with_10_trusted_a_class_or_none_drops_no_class(trusted, cifar_archive):
    # the golden clean checkpoint: a small CNN trained 4 epochs on 3,000 real CIFAR-10 images; scanned
    # with 10 trusted samples a class (the least GuardConfig accepts) and trust-free
    from guard.experiment import RunSpec, prepare

    data = prepare(RunSpec(data="cifar10", attack=None, n_train=3000, trusted_per_class=trusted or 10,
                           archive=cifar_archive))
    model = _model()
    model.load_state_dict(torch.load(FOLDER / "clean.pt", weights_only=True))
    report = guard.detect(model, data.train, data.trusted if trusted else None, guard.GuardConfig(progress=False))
    dropped = np.bincount([r.label for r in report.quarantine], minlength=10) / np.bincount(data.labels)
    assert dropped.max() <= 0.02, dropped
    classes = report.scans[-1].classes
    assert all(c.reason for c in classes) and {c.n_scanned for c in classes} == {300}


@pytest.mark.cifar
@pytest.mark.parametrize("case", ["badnets", "blended"])
def test_with_10_trusted_a_class_the_images_still_catch_a_10_percent_trigger(case, cifar_archive):
    # 10 trusted samples a class are too few for the trusted tests' bound to act on a 10 % all-to-one
    # cluster (README, "False alarms"); the images held against the other classes' need no trusted set
    from guard.experiment import RunSpec, detection, prepare

    data = prepare(RunSpec(data="cifar10", attack=case, rate=0.1, n_train=3000, trusted_per_class=10,
                           archive=cifar_archive))
    model = _model()
    model.load_state_dict(torch.load(FOLDER / f"{case}.pt", weights_only=True))
    report = guard.detect(model, data.train, data.trusted, guard.GuardConfig(progress=False))
    q = np.array([r.index for r in report.quarantine], dtype=np.int64)
    d = detection(q, data.poisoned, len(data.labels))
    assert d["tpr"] >= 0.95 and d["fpr"] <= 0.01, d
    target = next(c for c in report.scans[-1].classes if c.cls == 0)
    assert "image of the other classes" in target.reason, target.reason


@pytest.mark.cifar
def test_with_a_trusted_set_the_images_take_only_beyond_the_class_s_highest_trusted_image(cifar_archive):
    # the images held against the other classes' need no trusted sample to find a class, but with one
    # the catch is bounded by it, as every other catch is: the class's trusted images, on the probe that
    # takes (fitted without them), set the bar; the view is model-free, so they are alike the class's
    # benign training images there and a clean one lies beyond all of them with probability <= 1 / (n + 1)
    from guard.experiment import RunSpec, prepare

    data = prepare(RunSpec(data="cifar10", attack="blended", rate=0.1, n_train=3000, trusted_per_class=10,
                           archive=cifar_archive))
    model = _model()
    model.load_state_dict(torch.load(FOLDER / "blended.pt", weights_only=True))
    gds = guard.GuardedDataset(data.train, model, guard.GuardConfig(remedy="none", progress=False), trusted=data.trusted)
    gds.scan()
    res = gds.last_result
    target = next(c for c in res.classes if c.cls == 0)
    assert "image of the other classes" in target.reason and target.critical_layers == ["<input>"], target.reason
    ref = res.reference_suspicion[res.reference_labels == 0]
    assert len(ref) == 10 and ref.max() > gds.config.thresholds.flag_z           # the bound binds here
    assert target.threshold == pytest.approx(float(ref.max()))
    mine = np.isin(res.scanned, gds.quarantined) & (res.labels == 0)
    assert mine.sum() >= 0.95 * len(data.poisoned) and (res.suspicion[mine] > ref.max()).all()


def test_a_noisier_source_changes_the_training_split_only_and_says_which_labels():
    # RunSpec.label_noise / train_jpeg: the training data from a less careful source than the trusted set
    from guard.experiment import RunSpec, prepare

    base = prepare(RunSpec(data="digits", attack=None))
    data = prepare(RunSpec(data="digits", attack=None, label_noise=0.1, train_jpeg=30))
    changed = np.flatnonzero(data.labels != base.labels)
    assert len(changed) == round(0.1 * len(base.labels)) and np.array_equal(changed, data.noisy)
    assert torch.equal(data.trusted.images, base.trusted.images) and torch.equal(data.test.images, base.test.images)
    diff = (data.train.images.float() - base.train.images.float()).abs()
    assert diff.mean() > 0.5 and data.train.images.shape == base.train.images.shape
    again = prepare(RunSpec(data="digits", attack=None, label_noise=0.1, train_jpeg=30))
    assert np.array_equal(again.labels, data.labels) and torch.equal(again.train.images, data.train.images)
    with pytest.raises(ValueError, match="label_noise"):
        prepare(RunSpec(data="digits", attack=None, label_noise=1.5))


def test_a_class_subset_keeps_those_classes_everywhere_relabelled_in_the_order_given():
    # RunSpec.classes: a task made of some of a dataset's classes (bench_finetune's pretraining and fine-tuning)
    from guard.experiment import RunSpec, prepare

    base = prepare(RunSpec(data="digits", attack=None, n_train=None, trusted_per_class=10))
    data = prepare(RunSpec(data="digits", attack="badnets", rate=0.1, target=1, n_train=None, trusted_per_class=10,
                           classes=[7, 3]))
    assert data.num_classes == 2 and data.make_model().head[-1].out_features == 2
    for split, full in ((data.test, base.test), (data.trusted, base.trusted)):
        assert set(split.labels.tolist()) == {0, 1}
    n7, n3 = ((base.test.labels == c).sum() for c in (7, 3))
    assert (data.test.labels == 0).sum() == n7 and (data.test.labels == 1).sum() == n3
    assert len(data.labels) == int((np.isin(base.labels, [7, 3])).sum())
    assert (data.labels[data.poisoned] == 1).all() and len(data.poisoned) > 0
    with pytest.raises(ValueError, match="distinct labels"):
        prepare(RunSpec(data="digits", attack=None, classes=[3, 3]))
    with pytest.raises(ValueError, match="distinct labels"):
        prepare(RunSpec(data="digits", attack=None, classes=[3, 10]))
