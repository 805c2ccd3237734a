"""The unlearning sweep (guard.sweep): poison a scan left behind is exposed by unlearning, and a
class whose poison was all caught keeps its samples."""

import numpy as np
import pytest
import torch

from guard import GuardConfig, GuardedDataset
from guard.remedy import Unlearning, allowed_fit, fit_share, unlearn
from guard.sweep import Sweep, sweep_class
from tests.conftest import Blobs, mlp, train


def test_a_clean_class_passes_the_sweep_at_the_promised_rate():
    # exchangeable falls: the count beyond every trusted sample is Beta-binomial, so p < bar at most
    # a bar's share of the time, whatever the distribution (here a skewed one)
    rng = np.random.default_rng(0)
    passed = sum(sweep_class(0, np.arange(500), rng.exponential(1.0, 500), rng.exponential(1.0, 50), 0.02).p < 0.02
                 for _ in range(300))
    assert passed <= 15                      # 6 expected at most; binomial(300, 0.02) stays under 15


def test_a_class_with_leftover_poison_loses_exactly_the_samples_beyond_the_trusted_extreme():
    rng = np.random.default_rng(1)
    fall = rng.normal(0, 1, 1000)
    fall[:150] += 8.0                        # 150 leftover poisoned samples lose far more margin
    ref = rng.normal(0, 1, 100)
    r = sweep_class(3, np.arange(1000) + 10_000, fall, ref, 1e-4)
    assert r.p < 1e-4 and r.cls == 3          # 15 % beyond 100 trusted: (1 - 0.15)^100 ~ 1e-7
    assert set(range(10_000, 10_150)) <= set(r.taken.tolist())
    assert len(r.taken) - 150 <= 30          # clean samples beyond the trusted maximum: ~1 % of 850
    assert (r.score > r.threshold).all()
    # nothing to find: the same class without its poison keeps every sample
    assert len(sweep_class(3, np.arange(850), fall[150:], ref, 1e-4).taken) == 0


@pytest.fixture(scope="module")
def poisoned():
    """The poisoned data and a model that learned its trigger (a fresh copy per call: unlearning changes it)."""
    ds = Blobs(600, poison=0.1, seed=0)
    state = train(mlp(), ds, epochs=25).state_dict()

    def fresh():
        model = mlp()
        model.load_state_dict(state)
        return model
    return ds, fresh


def _sweep_after_unlearning(ds, model, quarantined):
    """Unlearn what ``quarantined`` taught, as the guard does, with a Sweep around it."""
    trusted = Blobs(300, seed=7)                                                     # 100 a class
    gds = GuardedDataset(ds, model, GuardConfig(remedy="none"), trusted=trusted)    # for its feed and config
    kept = np.setdiff1d(np.arange(len(ds)), quarantined)
    sweep = Sweep(model, gds.feed, ds, kept, ds.y[kept], trusted, trusted.y, [0])
    check = quarantined[::5]
    job = Unlearning(ds, kept, np.setdiff1d(quarantined, check), check, fit_share(model, ds, check, gds.feed),
                     allowed_fit(0.0, len(check), gds.config.thresholds), seed=0)
    unlearn(model, job, gds.feed, gds.config)
    (result,) = sweep.after(gds.config.thresholds.max_false_alarm / 3)
    return result


def test_unlearning_exposes_the_poison_a_scan_left(poisoned):
    ds, fresh = poisoned
    model = fresh()
    trig = torch.from_numpy(ds.x[ds.poisoned])
    assert (model(trig).argmax(1) == 0).float().mean() > 0.9          # the trigger is learned
    caught, left = ds.poisoned[::2], ds.poisoned[1::2]                # a scan that took half of it
    r = _sweep_after_unlearning(ds, model, caught)
    taken = set(r.taken.tolist())
    clean0 = set(np.flatnonzero(ds.y == 0).tolist()) - set(ds.poisoned.tolist())
    assert r.p < 1e-4
    assert len(taken & set(left.tolist())) >= 0.9 * len(left)
    assert len(taken & clean0) <= 0.03 * len(clean0)


def test_a_class_whose_poison_was_all_caught_keeps_its_samples(poisoned):
    ds, fresh = poisoned
    model = fresh()
    r = _sweep_after_unlearning(ds, model, ds.poisoned)
    assert len(r.taken) == 0 and r.p >= 1e-4


def test_the_guard_reports_its_sweep_and_quarantines_what_it_exposed(poisoned):
    ds, fresh = poisoned
    model = fresh()
    gds = GuardedDataset(ds, model, GuardConfig(thresholds={"unlearn_sweep": True}), trusted=Blobs(300, seed=7))
    gds.quarantine(ds.poisoned[::2], reason="known bad")
    scan = gds.scan()
    assert scan.remedy == "unlearn"
    assert [s.cls for s in scan.sweep] == [0] and scan.sweep[0].n_ref == 100
    assert set(ds.poisoned.tolist()) <= set(gds.quarantined.tolist())   # the scan or the sweep took the rest
    assert scan.total_quarantined == len(gds.quarantined)
    exposed = [r for r in gds.report.quarantine if r.reason.startswith("exposed by unlearning")]
    assert len(exposed) == scan.sweep[0].taken
    if exposed:
        assert "exposed by unlearning" in gds.report.summary()


def test_the_sweep_is_off_by_default(poisoned):
    """Without ``unlearn_sweep`` an unlearning measures no margins and takes nothing beyond what the scan took."""
    ds, fresh = poisoned
    model = fresh()
    gds = GuardedDataset(ds, model, GuardConfig(), trusted=Blobs(300, seed=7))
    gds.quarantine(ds.poisoned[::2], reason="known bad")
    scan = gds.scan()
    assert scan.remedy == "unlearn" and scan.remedy_steps > 0
    assert scan.sweep == []
    assert not any(r.reason.startswith("exposed by unlearning") for r in gds.report.quarantine)
