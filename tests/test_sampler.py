"""Step 5: the sampler protocol, the schedule, and DataLoader integration."""

import numpy as np
import torch
from torch.utils.data import DataLoader

from guard import GuardConfig, GuardedDataset
from tests.conftest import Blobs, mlp


def _gds(**cfg):
    return GuardedDataset(Blobs(120), mlp(), GuardConfig(**{"remedy": "none", **cfg}))


def test_an_unpadded_epoch_yields_every_kept_index_once_in_a_seeded_order():
    gds = _gds(warmup_epochs=100, pad_epochs=False)
    gds.quarantine([3, 7, 50])                        # quarantine by hand for the protocol test
    e0 = list(gds.sampler)
    e1 = list(gds.sampler)
    assert sorted(e0) == sorted(e1) == sorted(set(range(120)) - {3, 7, 50})
    assert e0 != e1                                   # reshuffled each epoch
    gds.sampler.set_epoch(0)
    assert list(gds.sampler) == e0                    # order depends only on (seed, epoch)
    assert len(gds.sampler) == 117 and len(gds) == 120


def test_epochs_keep_the_full_length_with_kept_indices_only_by_default():
    gds = _gds(warmup_epochs=100)
    gds.quarantine(range(0, 120, 4))                     # 30 quarantined
    e0 = list(gds.sampler)
    assert len(e0) == len(gds.sampler) + 0 == 120      # the full length, every epoch
    kept = set(range(120)) - set(range(0, 120, 4))
    assert set(e0) == kept                              # every kept index, and nothing else
    counts = np.bincount(e0, minlength=120)
    assert counts[sorted(kept)].min() == 1 and counts.max() == 2   # top-up draws each kept index at most once more


def test_state_dict_round_trip_resumes_the_order():
    a = _gds(warmup_epochs=100)
    next(iter(a.sampler)), next(iter(a.sampler))
    b = _gds(warmup_epochs=100)
    b.sampler.load_state_dict(a.sampler.state_dict())
    assert list(a.sampler) == list(b.sampler)


def test_schedule_warmup_then_every_k_epochs_and_set_epoch():
    gds = _gds(warmup_epochs=2, scan_every=3)
    loader = DataLoader(gds, batch_size=32, sampler=gds.sampler)
    for _ in range(9):
        for _ in loader:
            pass
    assert [s.epoch for s in gds.report.scans] == [2, 5, 8]
    gds.sampler.set_epoch(5)                          # re-running a scanned epoch does not rescan
    list(gds.sampler)
    assert len(gds.report.scans) == 3
    gds.sampler.set_epoch(11)
    len(gds.sampler)                                  # asking for the length never scans ...
    assert len(gds.report.scans) == 3
    gds.scan_if_due()                                 # ... this does, as does the epoch's iteration
    list(gds.sampler)
    assert [s.epoch for s in gds.report.scans] == [2, 5, 8, 11]


def test_scans_that_find_nothing_back_off_and_a_scan_that_acts_brings_the_next_one_back():
    gds = _gds(warmup_epochs=2, scan_every=1, scan_backoff=4)
    for _ in range(20):
        list(gds.sampler)
    assert all(s.new_quarantined == 0 and not s.released for s in gds.report.scans)
    assert [s.epoch for s in gds.report.scans] == [2, 4, 8, 12, 16]  # gaps 2, 4, then at most 4 x scan_every

    ds = Blobs(300, poison=0.1, seed=0)
    model = mlp()
    from tests.conftest import train
    train(model, ds, epochs=25)
    gds = GuardedDataset(ds, model, GuardConfig(warmup_epochs=1, scan_every=1, scan_backoff=4, remedy="none"),
                         trusted=Blobs(120, seed=9))
    for _ in range(4):
        list(gds.sampler)
    first, second = gds.report.scans[:2]
    assert first.epoch == 1 and first.new_quarantined > 0
    assert second.epoch == 2                                          # right after a scan that acted
    state = gds.state_dict()
    assert state["acted_epochs"] == [s.epoch for s in gds.report.scans if s.new_quarantined or s.released]
    again = GuardedDataset(ds, model, GuardConfig(warmup_epochs=1, scan_every=1, scan_backoff=4, remedy="none"),
                           trusted=Blobs(120, seed=9))
    again.load_state_dict(state)
    assert [e for e in range(4, 12) if again.schedule.due(e)] == [e for e in range(4, 12) if gds.schedule.due(e)]


def test_max_scans_and_forced_scan():
    gds = _gds(warmup_epochs=0, scan_every=1, max_scans=2)
    for _ in range(4):
        list(gds.sampler)
    assert len(gds.report.scans) == 2
    gds.scan()
    assert len(gds.report.scans) == 3


def test_workers_and_persistent_workers_see_the_new_quarantine():
    ds = Blobs(300, poison=0.1, seed=0)
    model = mlp()
    from tests.conftest import train
    train(model, ds, epochs=25)
    gds = GuardedDataset(ds, model, GuardConfig(warmup_epochs=1, scan_every=1, max_scans=1, remedy="none",
                                                      pad_epochs=False),       # epochs shrink: counts show it
                         trusted=Blobs(120, seed=9))
    loader = DataLoader(gds, batch_size=50, sampler=gds.sampler, num_workers=2, persistent_workers=True)
    seen = []
    for _ in range(3):
        seen.append(torch.cat([y for _, y in loader]).numel())
    assert len(gds.quarantined) > 0
    assert seen[0] == 300 and seen[1] == seen[2] == 300 - len(gds.quarantined)
    assert np.intersect1d(gds.quarantined, ds.poisoned).size >= 0.95 * len(ds.poisoned)


def test_a_shortened_epoch_of_a_batchnorm_model_warns_once_how_to_keep_its_length():
    """Quarantined samples shorten the sampler's epochs, so a loader with ``drop_last=False`` ends each
    epoch with a batch of another size, possibly a few samples, which costs a BatchNorm model accuracy:
    training's first shortened epoch says so once, with both fixes; padded epochs, a model without
    BatchNorm and an epoch with nothing quarantined stay quiet."""
    import warnings

    from guard import GuardWarning

    def bn_mlp() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                                   torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))

    def said(model: torch.nn.Module, quarantined: list[int], **cfg) -> list[str]:
        gds = GuardedDataset(Blobs(120), model, GuardConfig(remedy="none", warmup_epochs=100, **cfg))
        if quarantined:
            gds.quarantine(quarantined)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                list(DataLoader(gds, batch_size=32, sampler=gds.sampler))
        return [str(w.message) for w in caught if issubclass(w.category, GuardWarning)]

    told = said(bn_mlp(), [3, 7, 50], pad_epochs=False)
    assert len(told) == 1, told
    assert "117 of the dataset's 120" in told[0] and "pad_epochs=True" in told[0] and "drop_last=True" in told[0]
    assert said(bn_mlp(), [3, 7, 50]) == []                      # the default keeps every epoch's length
    assert said(mlp(), [3, 7, 50], pad_epochs=False) == []
    assert said(bn_mlp(), [], pad_epochs=False) == []
