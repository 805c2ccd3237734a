"""What a scan costs: which passes run the model, what is kept instead, and no per-batch host waits."""

import os

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils.data import TensorDataset

from guard import GuardConfig, detect
from guard.calibrate import Calibration
from guard.extract import Batch
import guard.keep
from guard.keep import KeptFeatures, available_bytes, keep_budget
from guard.models import SmallCNN
from guard.reference import Reference
from guard.score import DeviceScores

_SYNCS = {"__bool__", "cpu", "numpy", "item", "tolist", "__float__", "__int__", "nonzero", "__index__"}


class _Syncs(TorchFunctionMode):
    """Records calls that make the host wait for the device (on an accelerator)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _SYNCS:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def _calibration(dims, C, rng):
    ref = Reference(dims, C)
    labels = torch.arange(40) % C
    ref.update([torch.randn(40, d, generator=rng) + 1.0 for d in dims], labels)
    mean = np.full((C, len(dims)), 0.6)
    std = np.full((C, len(dims)), 0.05)
    return Calibration(ref, None, None, labels.numpy(), np.zeros((40, len(dims))), np.zeros((40, len(dims))),
                       mean, std, "trusted")


def test_device_scores_mask_path_is_sync_free_and_equal_to_the_selection_path():
    rng = torch.Generator().manual_seed(0)
    dims, C, n = [6, 9, 4], 3, 96
    cal = _calibration(dims, C, rng)
    batches = [Batch(np.arange(s, s + 32), torch.arange(s, s + 32) % C,
                     [torch.randn(32, d, generator=rng) + 1.0 for d in dims], torch.randn(32, C, generator=rng))
               for s in range(0, n, 32)]
    select = DeviceScores(cal, n, 3.0, torch.device("cpu"))
    mask = DeviceScores(cal, n, 3.0, torch.device("cpu"))
    mask.select = False                     # the accelerator path, run on the CPU
    for b in batches:           # rows as a slice, and as row numbers (a rescan's order): the same result
        select.add(slice(int(b.positions[0]), int(b.positions[-1]) + 1), b, b.logits.argmax(1))
    with _Syncs() as syncs:
        for b in batches:
            mask.add(torch.from_numpy(b.positions), b, b.logits.argmax(1))
    assert syncs.calls == []                # nothing per batch waits for the device
    a, b = select.result(), mask.result()
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert all(torch.equal(x, y) for x, y in zip(a[2], b[2]))
    assert any(float(x.abs().sum()) > 0 for x in a[2])    # some samples were out of spread: the sums were tested


def test_kept_features_hold_everything_or_nothing():
    feats = [torch.randn(4, 3).bfloat16().float(), torch.randn(4, 5)]
    store = KeptFeatures(8, budget=8 * (3 * 2 + 5 * 4))
    store.add(feats, (True, False))
    store.add(feats, (True, False))
    assert store.complete and store.nbytes == 8 * (3 * 2 + 5 * 4)       # bf16 values kept in 2 bytes, exactly
    got = store.rows(np.array([1, 6]), [0, 1])
    assert torch.equal(got[0], feats[0][[1, 2]]) and torch.equal(got[1], feats[1][[1, 2]])
    small = KeptFeatures(8, budget=100)
    small.add(feats, (True, False))
    assert not small.complete and small.nbytes == 0


@pytest.fixture(scope="module")
def poisoned():
    """A small CNN that has learned a 3x3 white corner patch sending class 1 to class 0."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(600, 3, 16, 16, generator=g) * 0.5
    y = torch.arange(600) % 3
    x[y == 1, 1] += 0.4
    x[y == 2, 2] += 0.4
    poison = np.flatnonzero(y.numpy() == 1)[:60]
    x[poison, :, -3:, -3:] = 1.0
    y[poison] = 0
    torch.manual_seed(0)
    model = SmallCNN(num_classes=3, in_channels=3, width=8)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(8):
        for i in torch.randperm(600, generator=g).split(50):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i]), y[i]).backward()
            opt.step()
    trusted_x = torch.rand(300, 3, 16, 16, generator=g) * 0.5      # 100 a class: the model's route can act
    trusted_y = torch.arange(300) % 3                               # on a 23 % cluster (guard.gate)
    trusted_x[trusted_y == 1, 1] += 0.4
    trusted_x[trusted_y == 2, 2] += 0.4
    return model.eval(), TensorDataset(x, y), TensorDataset(trusted_x, trusted_y), poison


def test_kept_features_replace_passes_with_the_same_result(poisoned):
    model, train, trusted, poison = poisoned
    kept = detect(model, train, trusted, GuardConfig(progress=False))
    passes = detect(model, train, trusted, GuardConfig(progress=False, keep_mb=0))
    a, b = kept.scans[-1], passes.scans[-1]
    assert [r.index for r in kept.quarantine] == [r.index for r in passes.quarantine]
    assert len(np.intersect1d([r.index for r in kept.quarantine], poison)) >= 50       # it found the poison
    assert "scan/trusted-calibrate" not in a.passes and "scan/trusted-calibrate" in b.passes
    assert a.passes["scan/confirm (kept)"] == b.passes["scan/confirm"]                # read, not forwarded
    forwarded = lambda s: sum(v for k, v in s.passes.items() if not k.endswith("(kept)"))  # noqa: E731
    assert forwarded(a) == len(train) + len(trusted)                                     # one pass each
    assert set(a.seconds_by_part) == {"load", "forward", "hooks", "transfer", "analysis"}
    assert sum(a.seconds_by_part.values()) == pytest.approx(a.seconds_by_step["calibrate"] + sum(
        v for k, v in a.seconds_by_step.items() if k != "calibrate"), rel=0.5)


class _Reads(torch.utils.data.Dataset):
    """A dataset that counts how often each of its items is read."""

    def __init__(self, inner) -> None:
        self.inner, self.reads = inner, np.zeros(len(inner), dtype=int)

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i):
        self.reads[i] += 1
        return self.inner[i]


def test_a_scan_reads_each_sample_once_and_tests_the_images_from_that_read(poisoned):
    from guard import GuardedDataset

    model, train, trusted, poison = poisoned
    results = {}
    # 7 MB, shared by the passes, in float32 (bf16 features, where the CPU computes bf16, take half):
    # the reference's features and views (3.2 MB) and the training samples' features (3.2 MB) fit, the
    # training images' views (2.3 MB) do not
    for keep_mb in (512, 7, 0):
        data, ref = _Reads(train), _Reads(trusted)
        cfg = GuardConfig(progress=False, remedy="none", keep_mb=keep_mb, amp=False)
        gds = GuardedDataset(data, model, cfg, trusted=ref)
        data.reads[:], ref.reads[:] = 0, 0                      # the wrapper's own checks read some items
        report = gds.scan(0)
        results[keep_mb] = (report, np.sort(np.asarray(list(gds.quarantined))), data.reads.copy(), ref.reads.copy())
    (kept, taken, train_reads, ref_reads) = results[512]
    assert (train_reads == 1).all() and (ref_reads == 1).all()    # features and images from one read each
    assert len(np.intersect1d(taken, poison)) >= 50
    assert kept.trusted_mismatch_p is not None                     # the image tests ran (their p's are in it)
    split, none = results[7], results[0]
    assert "scan/direction (kept)" in split[0].passes and split[2].sum() > len(train)   # features kept, images read
    assert none[2].sum() > split[2].sum() and none[3].sum() > len(trusted)             # without a budget: both again
    for again, taken_again, _, _ in (split, none):
        assert np.array_equal(taken, taken_again)
        assert (kept.trusted_mismatch_p, kept.trusted_mismatch_at) == (again.trusted_mismatch_p, again.trusted_mismatch_at)
        assert [c.direction_p for c in kept.classes] == [c.direction_p for c in again.classes]


def test_the_keep_budget_is_keep_mb_or_a_quarter_of_the_memory_available(monkeypatch):
    assert keep_budget(3) == 3 * 2**20 and keep_budget(0) == 0
    free = available_bytes()                      # Linux: MemAvailable, at most the machine's memory
    assert free is not None and 0 < free <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for free, budget in ((64 * 2**30, 16 * 2**30), (2**30, 512 * 2**20), (None, 512 * 2**20)):
        monkeypatch.setattr(guard.keep, "available_bytes", lambda free=free: free)
        assert keep_budget(None) == budget


def test_a_scan_keeps_no_more_than_its_budget_in_all_its_passes(poisoned):
    """The reference's and the training samples' kept features and views share one budget: given less
    than the two passes keep together (each would fit alone), a scan keeps less and finds the same."""
    from guard import GuardedDataset

    model, train, trusted, poison = poisoned

    def scan(keep_mb):
        gds = GuardedDataset(train, model, GuardConfig(progress=False, remedy="none", keep_mb=keep_mb), trusted=trusted)
        return gds.scan(0).memory_bytes, sorted(gds.quarantined)

    nothing, taken = scan(0)
    everything, _ = scan(None)
    kept = everything - nothing                   # the reference's and the scoring pass's features and views
    assert kept > 0
    for budget in (kept - 1, kept // 2):
        memory, taken_again = scan(budget / 2**20)
        assert 0 <= memory - nothing <= budget and taken_again == taken


def test_a_scan_holds_numpys_and_scipys_blas_to_one_thread_and_gives_it_back(poisoned):
    """Their pools' idle threads spin and starve torch's, which the analysis alternates with."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from guard import GuardedDataset

    model, train, trusted, _ = poisoned
    blas = lambda: {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"}  # noqa: E731
    seen = []
    handle = model.register_forward_hook(lambda *_: seen.append(blas()))
    try:
        with threadpool_limits(limits=2, user_api="blas"):
            gds = GuardedDataset(train, model, GuardConfig(progress=False, remedy="none"), trusted=trusted)
            seen.clear()                                   # the wrapper's own checks ran a forward
            gds.scan(0)
            after = blas()
    finally:
        handle.remove()
    assert seen and all(s == {1} for s in seen), seen     # every forward of the scan, and its analysis between
    assert after == {2}


def test_the_guards_passes_load_with_the_train_loaders_workers_unless_told(poisoned):
    from torch.utils.data import DataLoader

    from guard import GuardedDataset
    from guard.integrations._common import check_loader

    model, train, trusted, _ = poisoned
    gds = GuardedDataset(train, model, GuardConfig(progress=False), trusted=trusted)
    assert gds.extractor.num_workers == 0
    check_loader(gds, DataLoader(gds, batch_size=50, sampler=gds.sampler, num_workers=2), "train DataLoader")
    assert gds.extractor.num_workers == 2                  # the Lightning / HF callbacks call this each epoch
    fixed = GuardedDataset(train, model, GuardConfig(progress=False, num_workers=0), trusted=trusted)
    check_loader(fixed, DataLoader(fixed, batch_size=50, sampler=fixed.sampler, num_workers=2), "train DataLoader")
    assert fixed.extractor.num_workers == 0                 # set by the user: kept


def test_unlearning_waits_for_the_device_per_check_not_per_step(poisoned):
    """The accelerator path run on the CPU: unlearning steps and the BatchNorm re-estimation never
    read a device value back (the kept-batch accuracy is read once, at the end; the cumulative
    BatchNorm average takes its factor from the batch count, not from the device's counter), so three
    times the steps make the host wait no more often."""
    from guard.batches import BatchAdapter, Feed
    from guard.remedy import Unlearning, unlearn

    model, train, _, poison = poisoned
    kept = np.setdiff1d(np.arange(len(train)), poison)
    job = Unlearning(train, kept, poison[:40], poison[40:], fit_before=1.0, allowed=1.0, seed=0)  # first check stops
    feed = Feed(BatchAdapter(), torch.device("cpu"))
    calls, states = {}, {}
    for steps in (10, 30):
        m = SmallCNN(num_classes=3, in_channels=3, width=8)
        m.load_state_dict(model.state_dict())
        with _Syncs() as syncs:
            done = unlearn(m, job, feed, GuardConfig(unlearn_steps=steps, unlearn_batch=16))
        assert (done.steps, done.stopped) == (steps, "chance") and done.settled > 0
        calls[steps], states[steps] = sorted(syncs.calls), m.state_dict()
    assert calls[10] == calls[30] and len(calls[10]) <= 8, calls         # was 149 with per-step reads
    assert not all(torch.equal(states[10][k], states[30][k]) for k in states[10])   # the steps did run


def test_the_guards_autocast_is_bf16_on_a_cpu_only_where_bf16_runs_natively():
    """On a CPU without AVX512-BF16 or AMX, bf16 is emulated and a forward under bf16 autocast ran 10-25x
    slower than float32 (an AVX2 EPYC: scans of the main recipe 126 s against 20 s). The guard's autocast
    is bf16 there only where torch reads the instructions, float32 elsewhere, and never slower than
    float32 by more than timing noise on the machine that runs this test."""
    import time

    from guard.batches import autocast, cpu_bf16

    flags = [getattr(torch.cpu, n, lambda: False)() for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    assert cpu_bf16() == any(flags)
    cpu = torch.device("cpu")
    model = SmallCNN(in_channels=3, width=16).eval().to(memory_format=torch.channels_last)
    x = torch.randn(64, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), autocast(cpu, True):
        assert (model(x).dtype == torch.bfloat16) == cpu_bf16()
    with autocast(cpu, True, training=True):
        assert torch.is_autocast_enabled("cpu") == cpu_bf16()      # unlearning steps follow the same rule

    def once(amp: bool) -> float:
        with torch.no_grad(), autocast(cpu, amp):
            t = time.perf_counter()
            model(x)
            return time.perf_counter() - t

    once(True), once(False)
    rounds = [(once(True), once(False)) for _ in range(7)]          # interleaved; the fastest of each is
    fastest = np.min(rounds, axis=0)                                # what other load on the machine left alone
    assert fastest[0] < 3.0 * fastest[1], f"{fastest[0]:.3f} s under the guard's autocast, {fastest[1]:.3f} s in float32"


def test_a_class_scored_in_blocks_gets_the_bits_of_one_block():
    """Stages that score a whole class turn its features into float64 a block of rows at a time
    (``guard.scan.BLOCK_ROWS``): every row in exactly one block, blocks in order and at least half the
    block size, and a probe's scores bit for bit those of the class scored at once."""
    from guard.probe import Probe
    from guard.reference import unit
    from guard.scan import BLOCK_ROWS, _blocks

    for n in (0, 1, BLOCK_ROWS - 1, BLOCK_ROWS, BLOCK_ROWS + 1, 4 * BLOCK_ROWS - 3, 4_900):
        blocks = _blocks(n)
        assert np.array_equal(np.arange(n)[[i for b in blocks for i in range(b.start, b.stop)]], np.arange(n))
        sizes = [b.stop - b.start for b in blocks]
        assert all(s <= BLOCK_ROWS for s in sizes)
        assert n <= BLOCK_ROWS or min(sizes) >= BLOCK_ROWS // 2, (n, sizes)
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(2_000, 3 * 32 * 32, generator=g)
    w = torch.randn(raw.shape[1], dtype=torch.float64, generator=g)
    probe = Probe([0], [w], [0.1], [2.0], 0.3, 1.5)
    whole = probe.z([unit(raw).double()])
    blocked = np.concatenate([probe.z([unit(raw[b]).double()]) for b in _blocks(len(raw))])
    assert np.array_equal(whole, blocked)


def test_a_trust_free_scan_forwards_each_sample_once_and_decides_as_with_nothing_kept(poisoned):
    """Without a trusted set, the loss cue's pass over its pool keeps what it read: the reference and the
    scoring pass read the pool's samples back, so each training sample is read from the data once and
    forwarded once, and the scan takes what a scan that keeps nothing (every pass forwarded) takes, with
    the same scores."""
    from guard import GuardedDataset

    model, train, _, poison = poisoned
    results = {}
    for keep_mb in (512, 0):
        data = _Reads(train)
        gds = GuardedDataset(data, model, GuardConfig(progress=False, remedy="none", keep_mb=keep_mb, amp=False,
                                                      trust_free_per_class=60))
        data.reads[:] = 0
        report = gds.scan(0)
        results[keep_mb] = (report, np.sort(np.asarray(list(gds.quarantined))), data.reads.copy(),
                            np.array([r["score"] for r in gds.table()]))
    (kept, taken, reads, scores), (none, taken_none, reads_none, scores_none) = results[512], results[0]
    pool = kept.passes["scan/trust-free-pool"]
    assert pool == none.passes["scan/trust-free-pool"] == 360
    assert kept.passes["scan/train"] == len(train) - pool and kept.passes["scan/train (kept)"] == pool
    assert kept.passes["scan/trust-free (kept)"] == none.passes["scan/trust-free"] > 0
    assert "scan/trust-free" not in kept.passes
    assert (reads == 1).all() and reads_none.sum() > len(train) + pool
    assert len(np.intersect1d(taken, poison)) >= 50
    assert np.array_equal(taken, taken_none)
    assert np.allclose(scores, scores_none, rtol=1e-5, atol=1e-6)
    assert [c.direction_p for c in kept.classes] == [c.direction_p for c in none.classes]
    # the pool's kept features count against the same budget: given less, the scan keeps less and finds the same
    held = kept.memory_bytes - none.memory_bytes
    assert held > 0
    for budget in (held - 1, held // 2):
        gds = GuardedDataset(train, model, GuardConfig(progress=False, remedy="none", keep_mb=budget / 2**20,
                                                       amp=False, trust_free_per_class=60))
        report = gds.scan(0)
        assert 0 <= report.memory_bytes - none.memory_bytes <= budget
        assert np.array_equal(np.sort(np.asarray(list(gds.quarantined))), taken)
