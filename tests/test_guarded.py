"""GuardedDataset end to end on small real-valued data: drop-in behaviour, decisions, quarantine."""

import copy
import json
import random
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from guard import GuardConfig, GuardedDataset, GuardReport, GuardWarning
from guard.sampler import GuardSampler
from tests.conftest import Blobs, mlp, train


@pytest.fixture(scope="module")
def poisoned():
    ds = Blobs(600, poison=0.08, seed=0)
    model = train(mlp(), ds, epochs=25)
    return ds, model


def test_drop_in_items_and_length(poisoned):
    ds, model = poisoned
    gds = GuardedDataset(ds, model, GuardConfig(remedy="none"))
    assert len(gds) == len(ds)
    x, y = gds[5]
    assert torch.equal(x, ds[5][0]) and y == ds[5][1]


def test_finds_the_separate_cluster_and_spares_clean_classes(poisoned):
    ds, model = poisoned
    gds = GuardedDataset(ds, model, GuardConfig(remedy="none"), trusted=Blobs(150, seed=7))
    scan = gds.scan()
    q = gds.quarantined
    assert q.dtype == np.int64 and np.all(np.diff(q) > 0)
    tp = np.intersect1d(q, ds.poisoned).size
    assert tp >= 0.95 * len(ds.poisoned)
    assert len(q) - tp <= 0.02 * (len(ds) - len(ds.poisoned))
    verdicts = {c.cls: c.verdict for c in scan.classes}
    assert verdicts[0] == "separate cluster"
    assert all(verdicts[c] != "separate cluster" for c in (1, 2))
    assert all(r.reason.startswith("separate cluster") for r in gds.report.quarantine)


def test_clean_data_drops_nothing():
    ds = Blobs(600, seed=0)
    model = train(mlp(), ds, epochs=25)
    gds = GuardedDataset(ds, model, GuardConfig(remedy="none"), trusted=Blobs(150, seed=7))
    gds.scan()
    assert len(gds.quarantined) == 0


def test_trust_free_mode_drops_nothing_on_clean_data():
    # detection quality in trust-free mode is asserted on real CIFAR-10 (test_e2e_cifar.py)
    ds = Blobs(600, seed=0)
    model = train(mlp(), ds, epochs=25)
    gds = GuardedDataset(ds, model, GuardConfig(remedy="none", trust_free_per_class=60))
    scan = gds.scan()
    assert scan.calibration == "trust-free" and len(gds.quarantined) == 0


def test_poison_left_behind_is_found_like_the_quarantined(poisoned):
    # two poisoned samples escaped an earlier scan: too few to stand out by themselves, but the
    # quarantined samples teach a probe what they look like
    ds, model = poisoned
    gds = GuardedDataset(ds, model, GuardConfig(remedy="none"), trusted=Blobs(150, seed=7))
    left, caught = ds.poisoned[:2], ds.poisoned[2:]
    kept = np.setdiff1d(np.arange(len(ds)), caught)
    res = gds.scanner.run(ds, gds.trusted, kept, {0: caught})
    v = next(v for v in res.classes if v.cls == 0)
    assert v.verdict == "like quarantined"
    assert np.isin(left, res.flagged).all()
    assert len(np.setdiff1d(res.flagged, left)) <= 2


def test_a_cluster_found_again_in_a_class_with_quarantined_samples_is_cut_at_follow_z(poisoned):
    # a first catch took 5 of the 48 poisoned samples; the 43 left still form a separate cluster. The
    # class's prior odds of poison are lower now, so its new cut is the follow-up's (benign taken: 9 at
    # flag_z, 2 at follow_z), or the class's highest trusted sample where higher (follow_beyond_trusted),
    # and every poisoned sample left is still taken
    ds, model = poisoned
    # 200 trusted a class: the model's route, its gate held against a half of them (guard.gate), acts on
    # a cluster of 18 % of the class
    trusted = Blobs(600, seed=7)
    gds = GuardedDataset(ds, model, GuardConfig(remedy="none"), trusted=trusted)
    gds.quarantine(ds.poisoned[:5])
    scan = gds.scan()
    v = next(v for v in scan.classes if v.cls == 0)
    assert v.verdict == "separate cluster" and v.n_quarantined_before == 5
    top = float(np.array(scan.reference_scores)[trusted.y == 0].max())
    assert v.threshold == pytest.approx(max(gds.config.thresholds.follow_z, top), abs=1e-3)   # scores: 3 decimals
    q = gds.quarantined
    assert np.isin(ds.poisoned, q).all()
    assert len(np.setdiff1d(q, ds.poisoned)) <= 3


def _first_catch(gds, ds, poisoned: int, benign: int, by_hand: bool) -> tuple[np.ndarray, np.ndarray]:
    """Quarantine ``poisoned`` + ``benign`` samples of class 0, as an earlier scan's catch (in the
    guard's state, as a checkpoint of it holds them) or by hand."""
    benign0 = np.setdiff1d(np.flatnonzero(ds.y == 0), ds.poisoned)[:benign]
    gds.quarantine(np.concatenate([ds.poisoned[:poisoned], benign0]))
    if not by_hand:
        state = gds.state_dict()
        for r in state["report"]["quarantine"]:
            r.update(scan=1, reason="separate cluster in class 0 (guard rule)")
        gds.load_state_dict(state)
    return ds.poisoned[:poisoned], benign0


@pytest.mark.parametrize("benign,by_hand,back", [(3, False, True), (12, False, False), (3, True, False)])
def test_a_class_found_separate_again_gives_back_what_its_new_probe_calls_benign(poisoned, benign, by_hand, back):
    # an earlier catch took 5 poisoned samples and some benign ones; the 43 poisoned left make class 0
    # separate again. Its new probe puts the 5 above follow_z and the benign ones below flag_z: they go
    # back, unless the probe does not recognise the earlier catch (more of it below flag_z than above
    # follow_z) or a person quarantined them
    ds, model = poisoned
    gds = GuardedDataset(ds, model, GuardConfig(remedy="none"), trusted=Blobs(600, seed=7))   # as above
    caught, benign0 = _first_catch(gds, ds, 5, benign, by_hand)
    scan = gds.scan()
    v = next(v for v in scan.classes if v.cls == 0)
    assert v.verdict == "separate cluster"
    assert sorted(scan.released) == (sorted(benign0.tolist()) if back else [])
    assert v.n_released == len(scan.released)
    assert np.isin(ds.poisoned, gds.quarantined).all()                     # every poisoned sample stays out
    assert np.isin(scan.released, gds.kept_indices()).all()
    assert scan.total_quarantined == len(gds.quarantined)


def test_cap_keeps_the_most_suspicious_and_warns(poisoned):
    ds, model = poisoned
    gds = GuardedDataset(ds, model, GuardConfig(remedy="none", thresholds={"class_drop_cap": 0.1, "class_drop_warn": 0.05}),
                         trusted=Blobs(150, seed=7))
    scan = gds.scan()
    n0 = int((ds.y == 0).sum())
    assert len(gds.quarantined) == int(0.1 * n0)
    assert any("class_drop_cap" in w for w in scan.warnings)
    assert next(c for c in scan.classes if c.cls == 0).capped


def test_a_sampled_scan_that_acts_on_nothing_stands_for_the_scan():
    ds = Blobs(600, seed=0)
    model = train(mlp(), ds, epochs=25)
    gds = GuardedDataset(ds, model, GuardConfig(remedy="none", scan_sample_per_class=60), trusted=Blobs(150, seed=7))
    first, second = gds.scan(), gds.scan()
    assert (first.n_sampled, first.n_scanned) == (0, 600)          # the first scan reads the labels: whole
    assert second.n_sampled == second.n_scanned == 180 and len(gds.quarantined) == 0
    assert second.passes["scan/train"] == 180 and first.passes["scan/train"] == 600
    assert first.sample_acted_on == second.sample_acted_on == []


def test_by_default_scans_after_the_first_score_512_a_class_and_classes_of_at_most_512_are_scanned_whole():
    big = Blobs(1800, seed=0)                      # 600 a class
    model = train(mlp(), big, epochs=5)
    gds = GuardedDataset(big, model, GuardConfig(remedy="none"), trusted=Blobs(150, seed=7))
    first, second = gds.scan(), gds.scan()
    assert (first.n_sampled, first.n_scanned) == (0, 1800)
    assert second.n_sampled == second.n_scanned == 3 * 512 and second.passes["scan/train"] == 3 * 512
    small = GuardedDataset(Blobs(1500, seed=0), model, GuardConfig(remedy="none"), trusted=Blobs(150, seed=7))
    small.scan()
    assert small.scan().n_sampled == 0 and small.report.scans[-1].n_scanned == 1500     # 500 a class: whole


def test_a_sampled_scan_that_acts_is_redone_whole_and_applies_what_a_whole_scan_applies(poisoned):
    # the first scan sees an untrained model (nothing learned, nothing taken); the trigger is learned before the
    # second, whose sample of 60 a class finds the cluster
    ds, trained = poisoned
    runs = []
    for sample in (None, 60):
        model = mlp()
        gds = GuardedDataset(ds, model, GuardConfig(remedy="none", scan_sample_per_class=sample),
                             trusted=Blobs(150, seed=7))
        first = gds.scan()
        model.load_state_dict(trained.state_dict())
        runs.append((first, gds.scan(), gds.quarantined, [r.score for r in gds.report.quarantine]))
    third = gds.scan()              # a follow-up of the quarantine that flags nothing: the sample stands
    (w1, w2, whole, w_scores), (s1, s2, sampled, s_scores) = runs
    assert third.n_sampled == third.n_scanned == 180 and third.new_quarantined == 0
    assert next(c for c in third.classes if c.cls == 0).verdict == "like quarantined"
    assert w1.new_quarantined == s1.new_quarantined == 0 and s1.n_sampled == 0
    assert len(np.intersect1d(whole, ds.poisoned)) == len(ds.poisoned)
    assert np.array_equal(whole, sampled) and w_scores == s_scores
    assert s2.n_sampled == 180 and s2.n_scanned == w2.n_scanned == len(ds)
    assert s2.sample_acted_on == [0] and third.sample_acted_on == [] and w2.sample_acted_on == []
    # the rescan forwards only what the sample did not: the sample's rows and the trusted pass are read again
    assert s2.passes["sample scan/train"] == 180 and s2.passes["scan/train"] == len(ds) - 180
    assert s2.passes["scan/train (kept)"] == 180 and w2.passes["scan/train"] == len(ds)
    assert s2.passes["sample scan/trusted"] == s2.passes["scan/trusted (kept)"] == 150 and "scan/trusted" not in s2.passes
    # the sample stops at the stage that finds class 0 separate: the rescan alone looks for its catch elsewhere
    assert "scan/elsewhere (kept)" in s2.passes and not any(k.startswith("sample scan/elsewhere") for k in s2.passes)
    assert "sample" in s2.seconds_by_step


def test_paper_rule_is_selectable(poisoned):
    ds, model = poisoned
    gds = GuardedDataset(ds, model, GuardConfig(remedy="none", critical_rule="paper"), trusted=Blobs(150, seed=7))
    scan = gds.scan()
    assert scan.rule == "paper" and scan.new_quarantined == scan.paper_flagged


def test_restore_report_state_and_files(poisoned, tmp_path):
    ds, model = poisoned
    gds = GuardedDataset(ds, model, GuardConfig(remedy="none"), trusted=Blobs(150, seed=7))
    gds.scan()
    q = gds.quarantined
    gds.restore(q[:3])
    assert np.array_equal(gds.quarantined, q[3:])
    assert set(q[:3]) <= set(gds.sampler.indices())
    gds.scan()                                        # restored samples are not quarantined again
    assert not set(q[:3]) & set(gds.quarantined)
    with pytest.raises(ValueError, match="not quarantined"):
        gds.restore([q[0]])
    other = GuardedDataset(ds, model, GuardConfig(remedy="none"), trusted=Blobs(150, seed=7))
    other.load_state_dict(json.loads(json.dumps(gds.state_dict())))
    assert np.array_equal(other.quarantined, gds.quarantined)
    assert len(other.report.scans) == 2 and len(other.report.restores) == 1
    gds.save(tmp_path)
    report = GuardReport.load_json(tmp_path / "report.json")
    assert len(report.quarantine) == len(gds.quarantined)
    assert (tmp_path / "quarantine.csv").read_text().count("\n") == len(gds.quarantined) + 1
    rows = (tmp_path / "samples.csv").read_text().splitlines()
    assert len(rows) == len(ds) + 1 and sum(",restored," in r for r in rows) == 3
    assert "quarantined" in report.summary()


def test_scan_and_remedy_leave_training_state_untouched():
    ds = Blobs(600, poison=0.08, seed=0)
    model = train(mlp(), ds, epochs=25)
    model.train()
    gds = GuardedDataset(ds, model, GuardConfig(), trusted=Blobs(150, seed=7))
    torch.manual_seed(11)
    np.random.seed(11)
    random.seed(11)
    assert gds.scan().remedy == "unlearn"
    after = (torch.rand(1).item(), np.random.rand(), random.random())
    torch.manual_seed(11)
    np.random.seed(11)
    random.seed(11)
    assert after == (torch.rand(1).item(), np.random.rand(), random.random())
    assert model.training and torch.is_grad_enabled()


class _Jittered(Dataset):
    """Blobs with a random jitter drawn from the global torch RNG per item, as torchvision's random
    transforms draw theirs."""

    def __init__(self, ds: Dataset):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        x, y = self.ds[i]
        return x + 0.3 * torch.randn_like(x), y


def test_a_run_whose_scans_take_nothing_trains_exactly_as_without_the_guard():
    # the promise behind "nothing changes until something is quarantined": scans read the model in eval
    # mode and leave the RNGs, BatchNorm statistics and gradients as they were, so the training that
    # follows draws the same augmentations and reaches the same weights, bit for bit
    ds = _Jittered(Blobs(600, seed=0))

    def fresh():
        torch.manual_seed(3)
        return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.BatchNorm1d(64), torch.nn.ReLU(),
                                   torch.nn.Dropout(0.2), torch.nn.Linear(64, 3))

    def fit(model, loader, epochs=5):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        model.train()
        for epoch in range(epochs):
            for x, y in loader:
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
        return model

    cfg = GuardConfig(warmup_epochs=1, scan_every=1, seed=5)
    guarded = fresh()
    with pytest.warns(GuardWarning, match="different data for the same index"):     # no scan_dataset
        gds = GuardedDataset(ds, guarded, cfg, trusted=Blobs(150, seed=7))
    fit(guarded, DataLoader(gds, batch_size=32, sampler=gds.sampler))
    plain = fresh()
    order = GuardSampler(lambda: np.arange(len(ds)), len(ds), seed=cfg.seed)     # the guard's order, no guard
    fit(plain, DataLoader(ds, batch_size=32, sampler=order))
    assert len(gds.report.scans) == 4 and len(gds.quarantined) == 0
    a, b = guarded.state_dict(), plain.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


class _Interrupt(torch.nn.Module):
    """Raises KeyboardInterrupt (a user's Ctrl-C) on its ``at``-th forward call."""

    def __init__(self, at: int):
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return x


@pytest.mark.parametrize("at", [2, 40], ids=["calibrating", "scoring"])
def test_an_interrupted_scan_leaves_no_trace(poisoned, at):
    ds, trained = poisoned
    model = torch.nn.Sequential(_Interrupt(at), *trained)
    model.train()
    gds = GuardedDataset(ds, model, GuardConfig(remedy="none", batch_size=16), trusted=Blobs(150, seed=7))
    with pytest.raises(KeyboardInterrupt):
        gds.scan()
    assert model.training and all(m.training for m in model.modules()) and torch.is_grad_enabled()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert len(gds.quarantined) == 0 and not gds.report.scans and gds.last_result is None
    model[0].at = -1
    assert len(gds.scan().classes) == 3 and len(gds.quarantined) > 0     # a later scan runs normally


class DictItems(Dataset):
    """HF-style items: {'features': ..., 'labels': ...}."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return {"features": x, "labels": y}


class KwargModel(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, features):
        return self.net(features)


def test_dict_items_and_custom_unpack(poisoned):
    ds, model = poisoned
    km = KwargModel(model)
    gds = GuardedDataset(DictItems(ds), km, GuardConfig(remedy="none"), trusted=DictItems(Blobs(150, seed=7)))
    gds.scan()
    assert np.intersect1d(gds.quarantined, ds.poisoned).size >= 0.95 * len(ds.poisoned)
    gds2 = GuardedDataset(DictItems(ds), model, GuardConfig(remedy="none"), trusted=DictItems(Blobs(150, seed=7)),
                          unpack=lambda b: (b["features"], b["labels"]))
    gds2.scan()
    assert np.array_equal(gds.quarantined, gds2.quarantined)
    batch = next(iter(DataLoader(gds, batch_size=4, sampler=gds.sampler)))
    assert set(batch) == {"features", "labels"}


@pytest.mark.parametrize("amp", [True, False], ids=["bf16", "fp32"])
def test_unlearning_removes_the_learned_trigger(amp):
    ds = Blobs(600, poison=0.08, seed=0)
    model = train(mlp(), ds, epochs=25)
    trig = torch.from_numpy(ds.x[ds.poisoned])
    assert (model(trig).argmax(1) == 0).float().mean() > 0.9
    gds = GuardedDataset(ds, model, GuardConfig(amp=amp), trusted=Blobs(150, seed=7))
    scan = gds.scan()
    assert scan.remedy == "unlearn" and scan.remedy_fit_after <= 0.05
    train(model, torch.utils.data.Subset(ds, gds.kept_indices().tolist()), epochs=3)   # training goes on
    model.eval()
    clean = Blobs(300, seed=3)
    assert (model(trig).argmax(1) == 0).float().mean() <= 0.05
    acc = (model(torch.from_numpy(clean.x)).argmax(1).numpy() == clean.y).mean()
    assert acc >= 0.95


def test_a_relapsed_backdoor_is_unlearned_again_and_a_dormant_one_left_alone():
    ds = Blobs(600, poison=0.08, seed=0)
    model = train(mlp(), ds, epochs=25)
    gds = GuardedDataset(ds, model, GuardConfig(), trusted=Blobs(150, seed=7))
    first = gds.scan()
    assert first.remedy == "unlearn"
    quiet = gds.scan()                       # nothing new, and the model no longer fits them
    assert quiet.new_quarantined == 0 and quiet.remedy is None and quiet.remedy_fit_before <= 0.05
    train(model, ds, epochs=10)              # the poison is learned again (e.g. the user trained on ds)
    relapse = gds.scan()
    assert relapse.remedy == "unlearn"
    assert relapse.remedy_fit_before > 0.5 and relapse.remedy_fit_after <= 0.05


def test_chance_fit_is_the_rate_other_classes_are_predicted_as_the_label():
    from guard.remedy import allowed_fit, chance_fit
    from guard.thresholds import Thresholds
    labels = np.repeat(np.arange(4), 100)
    pred = labels.copy()
    pred[100:110] = 0                        # 10 of the 300 non-class-0 samples predicted as class 0
    pred[0:50] = 1                           # class-0 samples predicted elsewhere do not count
    assert chance_fit(pred, labels, np.zeros(7, int)) == pytest.approx(10 / 300)
    assert chance_fit(pred, labels, np.array([0, 0, 3])) == pytest.approx((2 * 10 / 300 + 0) / 3)
    t = Thresholds()
    assert allowed_fit(0.04, 400, t) == pytest.approx(0.04 + 2 * np.sqrt(0.04 * 0.96 / 400))
    assert allowed_fit(0.04, 50, t) > allowed_fit(0.04, 400, t) > 0.04               # fewer checks, wider
    assert allowed_fit(0.0, 5, t) == allowed_fit(0.001, 10**6, t) == 0.01            # never below the floor


def test_the_check_set_is_large_enough_to_start_unlearning():
    """The held-out check set is 1 in ``check_share`` of the more suspicious half, but never fewer than
    ``check_min`` (or the whole half where it is smaller): one or two check samples cannot show a fit
    beyond chance, so a learned backdoor with a small quarantine would never be unlearned."""
    from guard.remedy import fit_excess_p, split_check
    from guard.thresholds import Thresholds
    t = Thresholds()
    for n in (12, 30, 51, 80):
        for seed in range(5):
            idx = np.arange(1000, 1000 + n)
            scores = -np.arange(n, dtype=float)                # the first half is the more suspicious
            unlearn, check = split_check(idx, scores, seed, t)
            assert len(check) >= min(t.check_min, n // 2) and set(check) <= set(idx[:n // 2])
            assert len(np.intersect1d(unlearn, check)) == 0 and len(unlearn) + len(check) == n
            assert fit_excess_p(len(check), len(check), 0.03, t) < t.max_false_alarm    # all fitted: it starts
    big = np.arange(2000)
    _, check = split_check(big, -big.astype(float), 0, t)
    assert t.check_min <= len(check) < 1000 // t.check_share * 1.3 and check.max() < 1000   # 1 in 5 of the top half


def test_unlearning_starts_only_on_a_fit_chance_does_not_explain():
    from guard.remedy import allowed_fit, fit_excess_p
    from guard.thresholds import Thresholds
    t = Thresholds()
    # zoo 0:17's later scans: 1 or 2 of 34 check samples fitted at a chance rate of 0.5 % passed
    # allowed_fit (1.8-2.7 %) and set off 80-130 unlearning steps; chance explains them
    assert 1 / 34 > allowed_fit(0.005, 34, t) and fit_excess_p(1, 34, 0.005, t) > 0.2
    assert fit_excess_p(2, 34, 0.005, t) > t.max_false_alarm
    assert fit_excess_p(34, 34, 0.03, t) < 1e-40                      # a learned backdoor: all fitted
    assert fit_excess_p(10, 34, 0.03, t) < t.max_false_alarm < fit_excess_p(4, 34, 0.03, t)
    assert fit_excess_p(1, 34, 0.0, t) == pytest.approx(1 - 0.99 ** 34)  # the floor: chance is never 0
    assert fit_excess_p(0, 34, 0.03, t) == 1.0 and fit_excess_p(0, 0, 0.03, t) == 1.0


def test_unlearning_starts_where_one_class_s_check_samples_are_taught_though_the_pooled_ones_are_not():
    """All-to-all BadNets 10 % seed 2: classes caught after the first unlearning hold few of the check
    samples, and the first catch's, unlearned, outnumber them; the pooled fit reads chance while the
    later classes' poison stays learned (67-91 % attack success). The start test per class finds it."""
    from guard.remedy import fit_excess_p, taught_class
    from guard.thresholds import Thresholds
    t = Thresholds()
    ref_lab = np.repeat(np.arange(10), 100)
    ref_pred = ref_lab.copy()
    ref_pred[::25] = (ref_lab[::25] + 1) % 10            # 4 % of each class predicted as the next: chance 0.44 %
    carried = np.repeat(np.arange(10), [60, 60, 60, 60, 60, 60, 60, 60, 12, 60])
    pred = (carried + 3) % 10                            # unlearned: nothing fitted ...
    pred[carried == 8] = np.r_[np.full(9, 8), np.zeros(3, int)]     # ... but 9 of class 8's 12
    pooled = int((pred == carried).sum())
    chance = float(np.mean([(ref_pred[ref_lab != c] == c).mean() for c in carried]))
    assert fit_excess_p(pooled, len(carried), chance, t) > t.max_false_alarm     # the pooled test: no start
    cls, p = taught_class(pred, carried, ref_pred, ref_lab, t)
    assert cls == 8 and p < t.max_false_alarm and p == pytest.approx(10 * fit_excess_p(9, 12, 0.01, t))
    # one or two fitted in a class are what chance fits now and then: no start
    pred[carried == 8] = np.r_[np.full(2, 8), np.zeros(10, int)]
    assert taught_class(pred, carried, ref_pred, ref_lab, t)[1] >= t.max_false_alarm
    pred[carried == 8] = 0
    assert taught_class(pred, carried, ref_pred, ref_lab, t) == (None, 1.0)


def test_the_follow_up_gate_asks_what_the_unlearnings_start_asks():
    """A follow-up runs only where held-out quarantined samples are fitted beyond chance by the
    unlearning's start test (binomial p below ``max_false_alarm``, ``follow_gate_p``), not merely above
    chance plus ``fit_se`` errors (the unlearning's stop; ``follow_gate_p=False``): a trigger the model
    still half knows with no poison left (a few more check samples fitted than chance) takes no look-alikes."""
    from guard.remedy import allowed_fit, fit_excess_p, not_taught
    from guard.thresholds import Thresholds
    start, stop = Thresholds(), Thresholds(follow_gate_p=False)
    # zoo 2:5 seed 1's later scans: 6 of 35 check samples fitted where chance is 6 %
    assert 6 / 35 > allowed_fit(0.06, 35, stop) and fit_excess_p(6, 35, 0.06, stop) > start.max_false_alarm
    assert not_taught(6, 35, 0.06, stop) == ""
    assert "p = 0.017" in not_taught(6, 35, 0.06, start) and "max_false_alarm=0.001" in not_taught(6, 35, 0.06, start)
    # a third of the poison left behind, taught again: 14 of 38 where chance is 10 %: both follow up
    assert not_taught(14, 38, 0.10, stop) == not_taught(14, 38, 0.10, start) == ""
    # at chance, neither does, and the reason says so
    for t in (stop, start):
        assert "no more than chance (14.0%)" in not_taught(4, 35, 0.06, t)


def test_unlearning_stops_at_the_chance_rate_and_records_it():
    ds = Blobs(600, poison=0.08, seed=0)
    model = train(mlp(), ds, epochs=25)
    trusted = Blobs(150, seed=7)
    gds = GuardedDataset(ds, model, GuardConfig(), trusted=trusted)
    x, y = torch.from_numpy(trusted.x), torch.from_numpy(trusted.y)
    model.eval()
    with torch.no_grad():
        before = float((model(x).argmax(1) == y).float().mean())
    scan = gds.scan()
    assert scan.remedy == "unlearn" and scan.remedy_fit_allowed is not None
    assert scan.remedy_fit_after <= scan.remedy_fit_allowed < 0.5
    assert gds.config.unlearn_steps <= scan.remedy_steps <= 3 * gds.config.unlearn_steps
    assert scan.remedy_stopped == "chance"
    # what it cost, read on the trusted samples (all 150 here) before and after, with the kept model's statistics
    model.eval()
    with torch.no_grad():
        after = float((model(x).argmax(1) == y).float().mean())
    assert scan.remedy_accuracy_before == pytest.approx(before) and scan.remedy_accuracy_after == pytest.approx(after)
    assert 0.0 <= scan.remedy_accuracy_p <= 1.0


def test_accuracy_change_is_an_exact_one_sided_mcnemar_test():
    from guard.remedy import accuracy_change
    labels = np.zeros(40, np.int64)
    before = np.r_[np.zeros(30), np.ones(10)].astype(np.int64)      # 30 right
    after = before.copy()
    after[:8] = 1                                                   # 8 right -> wrong
    after[30:32] = 0                                                # 2 wrong -> right
    acc_before, acc_after, p = accuracy_change(before, after, labels)
    assert (acc_before, acc_after) == (0.75, 0.6)
    assert p == pytest.approx(56 / 1024)                            # P(at least 8 of 10 discordant go one way)
    assert accuracy_change(before, before, labels)[2] == 1.0        # nothing changed: no evidence of a loss
    assert np.isnan(accuracy_change(before[:0], before[:0], labels[:0])[0])


def test_kept_statistics_normalise_the_batch_by_its_kept_rows_alone():
    from guard.remedy import kept_statistics
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3).train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0), bn.bias.uniform_(-1.0, 1.0)
    kept = torch.randn(6, 3, 4, 4)
    batch = torch.cat([torch.randn(4, 3, 4, 4) * 50 + 100, kept])          # 4 triggered rows, far out
    stats = bn.running_mean.clone(), bn.running_var.clone()
    with kept_statistics([bn], 4):
        out = bn(batch)
    assert "forward" not in bn.__dict__                                    # the layer's own forward is back
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    alone = torch.nn.functional.batch_norm(kept, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    assert torch.allclose(out[4:], alone, atol=1e-5)                       # kept rows: as in a kept-only batch
    assert out[:4].abs().mean() > 10 * out[4:].abs().mean()                # triggered rows stay far out
    out.sum().backward()                                                   # the gradient runs through them
    assert bn.weight.grad is not None and torch.isfinite(bn.weight.grad).all()


@pytest.mark.parametrize("shape,affine", [((7, 3, 4, 5), True), ((9, 4), True), ((6, 3, 5), False)])
def test_kept_statistics_have_the_gradient_of_their_definition(shape, affine):
    """The fused kept-half BatchNorm against its definition in plain ops, in float64: the same output and,
    by gradcheck, the exact Jacobian through the kept rows' statistics, input, weight and bias alike."""
    from guard.remedy import kept_statistics
    torch.manual_seed(0)
    bn = getattr(torch.nn, f"BatchNorm{2 if len(shape) == 4 else 1}d")(shape[1], affine=affine).double().train()
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 2.0), bn.bias.uniform_(-1.0, 1.0)
    x = (torch.randn(*shape, dtype=torch.float64) * 3 + 1).requires_grad_()

    def defined(x):
        dims, view = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
        kept = x[3:]
        y = (x - kept.mean(dims).view(view)) / torch.sqrt(kept.var(dims, unbiased=False).view(view) + bn.eps)
        return y * bn.weight.view(view) + bn.bias.view(view) if affine else y

    def fused(x):
        with kept_statistics([bn], 3):
            return bn(x)

    assert torch.allclose(fused(x), defined(x), atol=1e-10)
    assert torch.autograd.gradcheck(fused, (x,))
    params = [x, bn.weight, bn.bias] if affine else [x]
    g = torch.randn(shape, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(fused(x), params, g), torch.autograd.grad(defined(x), params, g)):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("kept_statistics", [True, False])
def test_unlearning_a_batchnorm_model_holds_under_clean_statistics(kept_statistics):
    """A BatchNorm MLP whose trigger sets the scale of its half-triggered unlearning batches (seed 1 of the
    Blobs backdoor): unlearned with each batch normalised by itself, the model kept with clean statistics
    still fits the trigger (99.5 % attack success, accuracy 91 %); normalised by the kept half, it does
    not, and keeps its accuracy."""
    ds = Blobs(600, poison=0.08, seed=1)
    torch.manual_seed(1)
    model = train(torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.BatchNorm1d(64), torch.nn.ReLU(),
                                      torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64), torch.nn.ReLU(),
                                      torch.nn.Linear(64, 3)), ds, epochs=25, seed=1)
    cfg = GuardConfig(thresholds={"unlearn_kept_statistics": kept_statistics})
    scan = GuardedDataset(ds, model, cfg, trusted=Blobs(150, seed=7)).scan()
    assert scan.remedy == "unlearn"
    test = Blobs(300, seed=3)
    triggered = torch.from_numpy(test.x[test.y != 0]).clone()
    triggered[:, -4:] = 8.0
    model.eval()
    with torch.no_grad():
        asr = float((model(triggered).argmax(1) == 0).float().mean())
        acc = float((model(torch.from_numpy(test.x)).argmax(1) == torch.from_numpy(test.y)).float().mean())
    if kept_statistics:
        assert scan.remedy_stopped == "chance" and asr <= 0.05 and acc >= 0.95, (asr, acc)
    else:                                     # the mixed-batch unlearning this replaces, kept as the contrast
        assert asr >= 0.5, (asr, acc)


@pytest.mark.parametrize("seed", [0, 1])
def test_unlearning_stops_where_only_correctly_labelled_images_stay_fitted(seed):
    """A quarantine that holds correctly labelled images (a false alarm, an attack's cover images) keeps
    its held-out check above chance however long unlearning runs: those images are fitted through what
    they show. The trigger is unlearned all the same, and unlearning stops once the check stops falling
    (``unlearn_patience``), not at the cap, leaving the correctly labelled images classified as their class."""
    from guard.remedy import Unlearning, allowed_fit, fit_share, predictions, unlearn
    ds = Blobs(600, poison=0.08, seed=seed)
    clean = np.random.default_rng(seed).choice(np.setdiff1d(np.flatnonzero(ds.y != 0), ds.poisoned), 48, replace=False)
    model = train(mlp(), ds, epochs=25)
    gds = GuardedDataset(ds, model, GuardConfig(remedy="none"), trusted=Blobs(150, seed=7))   # for its feed
    quarantined = np.sort(np.concatenate([ds.poisoned, clean]))
    check = quarantined[::4]
    job = Unlearning(ds, np.setdiff1d(np.arange(len(ds)), quarantined), np.setdiff1d(quarantined, check), check,
                     fit_share(model, ds, check, gds.feed), allowed_fit(0.0, len(check), gds.config.thresholds), seed=0)
    done = unlearn(model, job, gds.feed, gds.config)
    pred, lab = predictions(model, ds, check, gds.feed)
    poison = np.isin(check, ds.poisoned)
    assert job.fit_before == 1.0 and done.fit > job.allowed
    assert done.stopped == "no progress" and done.steps < 3 * gds.config.unlearn_steps
    assert (pred == lab)[poison].mean() == 0.0                   # the trigger is unlearned
    assert (pred == lab)[~poison].mean() >= 0.7                  # the clean images keep their class


@pytest.mark.parametrize("unlearn_batch", [64, 24])
def test_unlearning_steps_take_the_configured_batch(unlearn_batch):
    ds = Blobs(600, poison=0.08, seed=0)
    model = train(mlp(), ds, epochs=25)
    sizes = []
    handle = model.register_forward_hook(lambda m, i, o: sizes.append(len(o)) if m.training else None)
    gds = GuardedDataset(ds, model, GuardConfig(unlearn_batch=unlearn_batch), trusted=Blobs(150, seed=7))
    scan = gds.scan()
    handle.remove()
    assert scan.remedy == "unlearn" and len(sizes) == scan.remedy_steps
    assert set(sizes) == {unlearn_batch}     # half quarantined, half kept (the default: 32 + 32)


def _bn_mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    nn = torch.nn
    return nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 3))


def test_batchnorm_statistics_are_re_estimated_on_kept_samples_only():
    from guard.batches import BatchAdapter, Feed
    from guard.remedy import recalibrate_bn
    ds = Blobs(600, poison=0.08, seed=0)
    model = _bn_mlp()
    bn = model[1]
    bn.running_mean.fill_(5.0)                # what unlearning batches would leave: far from the data's
    bn.momentum = 0.3
    model.eval()
    kept = np.arange(0, 600, 5)               # 120 samples, 3 batches of 40
    cfg = GuardConfig(unlearn_batch=40, amp=False, thresholds={"bn_samples": 1000})
    feed = Feed(BatchAdapter(), torch.device("cpu"))
    n = recalibrate_bn(model, ds, kept, feed, cfg, seed=0)
    assert n == 120
    with torch.no_grad():
        h = model[0](torch.stack([ds[int(i)][0] for i in kept]))
    assert torch.allclose(bn.running_mean, h.mean(0), atol=1e-5)          # equal batches: the mean of means
    assert bn.momentum == 0.3 and not model.training and not bn.training  # flags and momentum handed back
    off = GuardConfig(thresholds={"bn_samples": 0})
    before = bn.running_mean.clone()
    assert recalibrate_bn(model, ds, kept, feed, off, seed=0) == 0
    assert torch.equal(bn.running_mean, before)
    assert recalibrate_bn(mlp(), ds, kept, feed, cfg, seed=0) == 0


def test_unlearning_hands_back_batchnorm_statistics_of_kept_data():
    ds = Blobs(600, poison=0.08, seed=0)
    model = train(_bn_mlp(), ds, epochs=25)
    gds = GuardedDataset(ds, model, GuardConfig(thresholds={"bn_samples": 200}), trusted=Blobs(150, seed=7))
    scan = gds.scan()
    assert scan.remedy == "unlearn" and scan.remedy_steps > 0
    assert scan.remedy_bn_samples == 200
    kept = gds.kept_indices()
    with torch.no_grad():
        h = model[0](torch.stack([ds[int(i)][0] for i in kept]))
    # the running mean is now that of kept samples under the unlearned weights, not the unlearning batches'
    assert torch.allclose(model[1].running_mean, h.mean(0), atol=0.25 * float(h.std(0).mean()))
    gds_off = GuardedDataset(ds, train(_bn_mlp(), ds, epochs=25), GuardConfig(thresholds={"bn_samples": 0}),
                             trusted=Blobs(150, seed=7))
    assert gds_off.scan().remedy_bn_samples == 0


def test_unlearning_leaves_a_frozen_backbones_batchnorm_as_the_user_froze_it():
    """Fine-tuning with a frozen backbone: its parameters do not train and its BatchNorm layers stay in
    eval mode (pretrained statistics), set once or kept so by the model's own ``train()``. Unlearning
    steps only what trains and re-estimates only the statistics training moves; a frozen layer left in
    train mode (torchvision's tutorial) moves with them."""
    nn = torch.nn

    class KeepsFrozenEval(nn.Sequential):
        def train(self, mode=True):
            super().train(mode)
            self[1].eval()
            return self

    ds = Blobs(600, poison=0.08, seed=0)
    torch.manual_seed(0)
    model = train(nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 64),
                                nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 3)), ds, epochs=25)
    for eval_mode, own_train in ((True, False), (True, True), (False, False)):
        net = copy.deepcopy(model)
        if own_train:
            net = KeepsFrozenEval(*net)
        for p in [*net[0].parameters(), *net[1].parameters()]:
            p.requires_grad_(False)
        net.train()
        net[1].train(not eval_mode)
        frozen = {k: v.clone() for k, v in net[:2].state_dict().items()}
        other = net[4].running_mean.clone()
        gds = GuardedDataset(ds, net, GuardConfig(thresholds={"bn_samples": 200}), trusted=Blobs(150, seed=7))
        scan = gds.scan()
        assert scan.remedy == "unlearn" and scan.remedy_steps > 0 and scan.remedy_bn_samples == 200
        assert net.training and net[1].training is not eval_mode          # every flag handed back
        assert not torch.equal(net[4].running_mean, other)                 # a trained layer: re-estimated
        moved = [k for k, v in net[:2].state_dict().items() if not torch.equal(v, frozen[k])]
        assert moved == ([] if eval_mode else ["1.running_mean", "1.running_var", "1.num_batches_tracked"]), moved


def test_unlearning_is_judged_on_the_model_it_hands_back():
    """The stop reads the model that is kept (BatchNorm statistics re-estimated on kept samples), not
    the running statistics the half-triggered unlearning batches leave: with steps that change no
    weight (lr 0) nothing is unlearned, so no check may pass, and the fit reported is the kept model's.
    Nothing moves, so unlearning stops after ``unlearn_patience`` checks (the first at ``unlearn_steps``,
    then every ``check_every``) that do not lower the fit; with a patience longer than the cap allows,
    at the cap."""
    from guard.remedy import fit_share
    ds = Blobs(600, poison=0.08, seed=0)
    model = train(_bn_mlp(), ds, epochs=25)
    th = {"bn_samples": 200}
    for patience, steps, stopped in ((None, 60 + (3 - 1) * 10, "no progress"), (100, 3 * 60, "cap")):
        still = torch.optim.SGD(model.parameters(), lr=0.0)
        cfg = GuardConfig(thresholds=th if patience is None else {**th, "unlearn_patience": patience})
        gds = GuardedDataset(ds, model, cfg, trusted=Blobs(150, seed=7), optimizer=still)
        scan = gds.scan()
        _, check = gds._split_records()
        assert scan.remedy == "unlearn" and len(check) > 0
        assert (scan.remedy_steps, scan.remedy_stopped) == (steps, stopped)
        assert scan.remedy_fit_after > scan.remedy_fit_allowed
        assert fit_share(model, ds, check, gds.feed) == scan.remedy_fit_after
        assert scan.remedy_bn_samples == 200


def test_restart_remedy_restores_initial_weights():
    ds = Blobs(600, poison=0.08, seed=0)
    model = mlp()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    gds = GuardedDataset(ds, model, GuardConfig(remedy="restart"), trusted=Blobs(150, seed=7))
    train(model, ds, epochs=25)
    gds.scan()
    assert len(gds.quarantined) > 0
    assert all(torch.equal(v, init[k]) for k, v in model.state_dict().items())


def test_same_seed_and_data_give_the_same_quarantine(poisoned):
    ds, model = poisoned
    runs = []
    for _ in range(2):
        gds = GuardedDataset(ds, model, GuardConfig(remedy="none"), trusted=Blobs(150, seed=7))
        gds.scan()
        runs.append((gds.quarantined, [r.score for r in gds.report.quarantine]))
    assert len(runs[0][0]) and np.array_equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]


def test_unlearning_follows_the_users_optimizer_and_learning_rate():
    """A fine-tuning user (AdamW at lr 2e-5) gets unlearning steps of that size, not SGD at 0.01; without
    the optimizer the fixed rate is used and a GuardWarning says how to hand it over."""
    ds = Blobs(600, poison=0.08, seed=0)
    changes = {}
    for name, make in (("default", lambda m: None),
                       ("adamw", lambda m: torch.optim.AdamW(m.parameters(), lr=2e-5, weight_decay=0.01))):
        model = train(mlp(), ds, epochs=25)
        before = [p.detach().clone() for p in model.parameters()]
        gds = GuardedDataset(ds, model, GuardConfig(), trusted=Blobs(150, seed=7), optimizer=make(model))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scan = gds.scan()
        told = [w for w in caught if issubclass(w.category, GuardWarning) and "optimizer=opt" in str(w.message)]
        assert len(told) == (name == "default"), [str(w.message) for w in caught]
        assert scan.remedy == "unlearn" and scan.remedy_steps > 0
        changes[name] = (max(float((p.detach() - b).abs().max()) for p, b in zip(model.parameters(), before)),
                         scan.remedy_steps, scan.remedy_fit_after)
    fast = torch.optim.SGD(mlp().parameters(), lr=0.5, momentum=0.9)   # a large rate is capped at unlearn_lr
    gds = GuardedDataset(ds, mlp(), GuardConfig(unlearn_lr=0.02), optimizer=fast)
    assert gds._unlearner(list(mlp().parameters())).param_groups[0]["lr"] == 0.02
    step, steps, _ = changes["adamw"]
    assert step <= 3 * steps * 2e-5                       # Adam moves a weight by about lr per step at most
    assert changes["default"][0] > 20 * step, changes      # SGD(lr=0.01, momentum 0.9) moves it far more


def test_unlearning_hands_its_gradient_scale_to_an_adaptive_optimizer():
    """After unlearning, the user's Adam keeps at least the unlearning's estimate of each parameter's
    squared gradient (bias-corrected), so its next clean steps do not undo the unlearning; SGD, which
    keeps no such estimate, is left as it was, and so is Adam with ``hold_moments=False``."""
    from guard.guarded import second_moments
    ds = Blobs(600, poison=0.08, seed=0)
    for name in ("adamw", "sgd", "adamw, not held"):
        model = train(mlp(), ds, epochs=25)
        opt = (torch.optim.AdamW(model.parameters(), lr=1e-3) if name.startswith("adamw")
               else torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9))
        for x, y in torch.utils.data.DataLoader(ds, batch_size=64):     # the user's optimizer has state
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        params = list(model.parameters())
        key = "exp_avg_sq" if name.startswith("adamw") else "momentum_buffer"
        before = [opt.state[p][key].clone() for p in params]
        cfg = GuardConfig(thresholds={"hold_moments": name != "adamw, not held"})
        gds = GuardedDataset(ds, model, cfg, trusted=Blobs(150, seed=7), optimizer=opt)
        made = []
        plain = gds._unlearner
        gds._unlearner = lambda ps: made.append(plain(ps)) or made[-1]
        scan = gds.scan()
        assert scan.remedy == "unlearn" and scan.remedy_steps > 0 and len(made) == 1
        if name != "adamw":
            assert scan.remedy_scale_raised == 0
            assert all(torch.equal(opt.state[p][key], b) for p, b in zip(params, before))
            continue
        assert scan.remedy_scale_raised == len(params)
        floors, now = second_moments(made[0], params), second_moments(opt, params)
        assert all(bool((n >= f * (1 - 1e-6) - 1e-30).all()) for n, f in zip(now, floors))   # float32 rounding
        assert all(bool((opt.state[p][key] >= b).all()) for p, b in zip(params, before))
        assert any(bool((opt.state[p][key] > b).any()) for p, b in zip(params, before))


def test_a_compiled_model_is_scanned_through_its_original_module(poisoned):
    ds, model = poisoned
    cfg = GuardConfig(remedy="none")
    plain = GuardedDataset(ds, model, cfg, trusted=Blobs(150, seed=7))
    plain.scan()
    compiled = GuardedDataset(ds, torch.compile(model, backend="eager"), cfg, trusted=Blobs(150, seed=7))
    assert compiled.layers == plain.layers == ["1", "3", "4"]
    compiled.scan()
    assert np.array_equal(compiled.quarantined, plain.quarantined) and len(plain.quarantined)
