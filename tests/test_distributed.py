"""Two real processes on torch.distributed (gloo, CPU): sharded sampler and scan, identical decisions.

Floating-point rule: a rank scores its shard in batches of other sizes than a single process
does, and the suspect sums are added in another order, so scores may differ in the last bits.
Quarantines are compared exactly, except samples whose score lies within 1e-3 of their
threshold (none here); across ranks they must be bit-identical (every rank decides from the
same gathered scores).
"""

import hashlib
import json
import os
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from guard import GuardConfig, GuardedDataset, GuardError
from tests.conftest import Blobs, mlp, train


def _setup(rank: int, world: int, folder: str, timeout: float = 60.0) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout))


def _worker(rank: int, world: int, folder: str) -> None:
    _setup(rank, world, folder)
    try:
        ds = Blobs(600, poison=0.08, seed=0)
        model = torch.nn.parallel.DistributedDataParallel(train(mlp(), ds, epochs=25))
        gds = GuardedDataset(ds, model, GuardConfig(remedy="none"), trusted=Blobs(150, seed=7))
        before = list(iter(gds.sampler))           # epoch 0: before any scan
        gds.scan()
        after = gds.sampler.indices(1).tolist()
        q = gds.quarantined
        digest = hashlib.sha256(q.tobytes()).hexdigest()
        scores = {int(r.index): [r.score, r.threshold] for r in gds.report.quarantine}
        Path(folder, f"rank{rank}.json").write_text(json.dumps(
            {"before": before, "after": after, "quarantined": q.tolist(), "hash": digest, "scores": scores}))
    finally:
        dist.destroy_process_group()


def _training_worker(rank: int, world: int, folder: str) -> None:
    """A plain DDP loop (what torchrun runs): the guard's sampler, scheduled scans, default remedy."""
    _setup(rank, world, folder)
    try:
        ds = Blobs(600, poison=0.08, seed=0)
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(mlp())
        gds = GuardedDataset(ds, model, GuardConfig(warmup_epochs=10, scan_every=5), trusted=Blobs(150, seed=7))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        loader = torch.utils.data.DataLoader(gds, batch_size=32, sampler=gds.sampler)
        steps = []
        for epoch in range(20):
            gds.sampler.set_epoch(epoch)
            n = 0
            for x, y in loader:
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                n += 1
            steps.append(n)
        trig = torch.from_numpy(ds.x[ds.poisoned])
        asr = float((model.module(trig).argmax(1) == 0).float().mean())
        Path(folder, f"rank{rank}.json").write_text(json.dumps(
            {"quarantined": gds.quarantined.tolist(), "steps": steps, "asr": asr,
             "poisoned": ds.poisoned.tolist(), "scans": len(gds.report.scans),
             "weights": float(sum(p.double().sum() for p in model.parameters()))}))
    finally:
        dist.destroy_process_group()


def _failing_worker(rank: int, world: int, folder: str) -> None:
    _setup(rank, world, folder, timeout=20.0)
    ds = Blobs(600, poison=0.08, seed=0)
    model = train(mlp(), ds, epochs=5)
    gds = GuardedDataset(ds, model, GuardConfig(remedy="none"), trusted=Blobs(150, seed=7))
    if rank == 1:                                  # this rank dies in the middle of its shard
        stream = gds.extractor.stream

        def broken(dataset, layers, indices=None, desc="scan", stop_early=False):
            for i, b in enumerate(stream(dataset, layers, indices, desc, stop_early)):
                if desc == "scan/train" and i == 1:
                    raise RuntimeError("simulated crash on rank 1")
                yield b
        gds.extractor.stream = broken
    try:
        gds.scan()
        outcome = "no error"
    except GuardError as e:
        outcome = f"GuardError: {e}"
    except RuntimeError as e:
        outcome = f"RuntimeError: {e}"
    Path(folder, f"rank{rank}.json").write_text(json.dumps(
        {"outcome": outcome, "quarantined": len(gds.quarantined), "scans": len(gds.report.scans)}))


def _spawn(fn, tmp_path) -> list[dict]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(fn, args=(2, str(tmp_path)), nprocs=2, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def test_two_ranks_shard_the_data_and_reach_the_single_process_quarantine(tmp_path):
    r0, r1 = _spawn(_worker, tmp_path)
    assert sorted(r0["before"] + r1["before"]) == list(range(600))         # shards cover the data once
    assert not set(r0["before"]) & set(r1["before"])
    assert r0["hash"] == r1["hash"] and r0["quarantined"]                  # identical on both ranks
    kept = sorted(set(range(600)) - set(r0["quarantined"]))
    assert sorted(set(r0["after"] + r1["after"])) == kept                   # later epochs: the kept set

    ds = Blobs(600, poison=0.08, seed=0)
    single = GuardedDataset(ds, train(mlp(), ds, epochs=25), GuardConfig(remedy="none"), trusted=Blobs(150, seed=7))
    single.scan()
    a, b = set(single.quarantined.tolist()), set(r0["quarantined"])
    near = {int(r.index) for r in single.report.quarantine if abs(r.score - r.threshold) < 1e-3}
    near |= {int(i) for i, (s, t) in r0["scores"].items() if abs(s - t) < 1e-3}
    assert a ^ b <= near, sorted(a ^ b)
    np.testing.assert_allclose([r.score for r in single.report.quarantine if r.index in b],
                               [r0["scores"][str(r.index)][0] for r in single.report.quarantine if r.index in b],
                               rtol=1e-3, atol=1e-3)


def test_a_rank_that_fails_mid_scan_fails_every_rank_and_applies_nothing(tmp_path):
    r0, r1 = _spawn(_failing_worker, tmp_path)
    assert r1["outcome"].startswith("RuntimeError: simulated crash")
    assert r0["outcome"].startswith("GuardError: rank 0 of 2: the scan's gather")
    assert r0["quarantined"] == r1["quarantined"] == 0 and r0["scans"] == r1["scans"] == 0


def test_a_plain_ddp_training_loop_with_scheduled_scans_and_unlearning(tmp_path):
    r0, r1 = _spawn(_training_worker, tmp_path)
    assert r0["quarantined"] == r1["quarantined"] and r0["scans"] == r1["scans"] == 2
    assert r0["steps"] == r1["steps"]                                  # ranks stay in lock-step
    assert r0["weights"] == r1["weights"]                             # replicas identical after unlearning
    q, p = set(r0["quarantined"]), set(r0["poisoned"])
    assert len(q & p) >= 0.95 * len(p) and len(q - p) <= 0.02 * (600 - len(p))
    assert r0["asr"] <= 0.05                                           # the learned trigger is unlearned
