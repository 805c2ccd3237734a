"""Two real processes on torch.distributed (gloo, CPU): sharded sampler and scan, identical decisions.

Floating-point rule: a rank scores its shard in batches of other sizes than a single process
does, and the suspect sums are added in another order, so scores may differ in the last bits.
Quarantines are compared exactly, except samples whose score lies within 1e-3 of their
threshold (none here); across ranks they must be bit-identical (every rank decides from the
same gathered scores).
"""

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from guard import GuardConfig, GuardedDataset, GuardError
from guard.datasets import load_cifar10
from guard.experiment import RunSpec, prepare
from guard.models import CifarResNet18
from tests.conftest import Blobs, mlp, train


def _setup(rank: int, world: int, folder: str, timeout: float = 60.0) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout))


@contextlib.contextmanager
def _group(rank: int, world: int, folder: str, timeout: float = 60.0) -> Iterator[None]:
    """A worker's process group: left together when the block ends (see ``_leave``), torn down
    and the error raised when it fails."""
    _setup(rank, world, folder, timeout)
    try:
        yield
    except BaseException:
        dist.destroy_process_group()
        raise
    _leave()


def _leave(together: bool = True) -> None:
    """End a worker whose results are written: meet the peer, then exit at once. Tearing gloo down
    at interpreter exit aborts now and then ('terminate called without an active exception', in 3 of
    11 runs of these tests before), which has nothing to do with what they test."""
    if together:
        dist.barrier()
    os._exit(0)


def _worker(rank: int, world: int, folder: str) -> None:
    with _group(rank, world, folder):
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


def _training_worker(rank: int, world: int, folder: str) -> None:
    """A plain DDP loop (what torchrun runs): the guard's sampler, scheduled scans, default remedy."""
    with _group(rank, world, folder):
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


def _failing_worker(rank: int, world: int, folder: str) -> None:
    _setup(rank, world, folder, timeout=20.0)
    ds = Blobs(600, poison=0.08, seed=0)
    model = train(mlp(), ds, epochs=5)
    gds = GuardedDataset(ds, model, GuardConfig(remedy="none"), trusted=Blobs(150, seed=7))
    if rank == 1:                                  # this rank dies in the middle of its shard
        stream = gds.extractor.stream

        def broken(dataset, layers, indices=None, desc="scan", *args, **kwargs):
            for i, b in enumerate(stream(dataset, layers, indices, desc, *args, **kwargs)):
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
    _leave(together=False)                          # the group is broken: no barrier


def _state_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for t in model.state_dict().values():
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _batchnorm_worker(rank: int, world: int, folder: str, order: str, archive: str) -> None:
    """A BatchNorm CNN on real CIFAR-10 trained through DDP, the guard handed the DDP wrapper
    (``order="wrapper"``) or the module inside it before wrapping (``order="module"``)."""
    with _group(rank, world, folder, timeout=300.0):
        data = prepare(RunSpec(data="cifar10", attack="badnets", rate=0.2, n_train=3000, trusted_per_class=40,
                               archive=archive))
        torch.manual_seed(0)
        model = CifarResNet18(width=16)
        cfg = GuardConfig(warmup_epochs=2, scan_every=1, progress=False, batch_size=250)
        if order == "wrapper":
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            gds = GuardedDataset(data.train, ddp, cfg, trusted=data.trusted, scan_dataset=data.scan)
        else:
            gds = GuardedDataset(data.train, model, cfg, trusted=data.trusted, scan_dataset=data.scan)
            ddp = torch.nn.parallel.DistributedDataParallel(model)
        # at lr 0.05 the eval-mode model of some environments predicted class 0 for most images at the scans,
        # so the trigger was fitted no better than chance and nothing was unlearned: the test lost its remedy
        opt = torch.optim.SGD(ddp.parameters(), lr=0.02, momentum=0.9)
        loader = torch.utils.data.DataLoader(gds, batch_size=32, sampler=gds.sampler)
        scans = []
        for epoch in range(4):
            gds.sampler.set_epoch(epoch)
            before = _state_hash(model)
            gds.scan_if_due()                        # a due scan runs here, before the epoch's batches
            if len(gds.report.scans) > len(scans):
                s = gds.report.scans[-1]
                scans.append({"before": before, "after": _state_hash(model), "new": s.new_quarantined,
                              "remedy": s.remedy, "steps": s.remedy_steps})
            for x, y in loader:
                opt.zero_grad()
                torch.nn.functional.cross_entropy(ddp(x), y).backward()
                opt.step()
        Path(folder, f"rank{rank}.json").write_text(json.dumps(
            {"quarantined": gds.quarantined.tolist(), "scans": scans, "poisoned": data.poisoned.tolist(),
             "weights": hashlib.sha256(b"".join(p.detach().numpy().tobytes()
                                                for p in model.parameters())).hexdigest()}))


def _sync_batchnorm_worker(rank: int, world: int, folder: str) -> None:
    """A model with SyncBatchNorm layers (``convert_sync_batchnorm``, as DDP recipes do) on two ranks: the
    guard's unlearning and BatchNorm re-estimation run on rank 0 alone, where a synchronising forward
    would wait for ranks that run none. Trained before the process group starts and handed to the
    guard bare: on CPU, SyncBatchNorm cannot train under a process group, nor DDP wrap it."""
    ds = Blobs(600, poison=0.08, seed=0)
    torch.manual_seed(0)
    nn = torch.nn
    model = train(nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 3)), ds, epochs=25)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    with _group(rank, world, folder):
        gds = GuardedDataset(ds, model, GuardConfig(), trusted=Blobs(150, seed=7))
        gds.scan()
        s = gds.report.scans[-1]
        bn = model[1]
        test = Blobs(300, seed=3)
        triggered = torch.from_numpy(test.x[test.y != 0]).clone()
        triggered[:, -4:] = 8.0                       # the trigger, on unseen samples of other classes
        model.eval()
        with torch.no_grad():
            asr = float((model(triggered).argmax(1) == 0).float().mean())
        Path(folder, f"rank{rank}.json").write_text(json.dumps(
            {"quarantined": gds.quarantined.tolist(), "poisoned": ds.poisoned.tolist(), "remedy": s.remedy,
             "steps": s.remedy_steps, "bn_samples": s.remedy_bn_samples, "state": _state_hash(model),
             "accuracy": [s.remedy_accuracy_before, s.remedy_accuracy_after, s.remedy_accuracy_p],
             "sync": type(bn).__name__, "own_forward": "forward" in bn.__dict__, "asr": asr}))


def _disagreeing_worker(rank: int, world: int, folder: str) -> None:
    with _group(rank, world, folder, timeout=60.0):
        ds = Blobs(600, poison=0.08, seed=0)
        layers = ["1", "3", "4"] if rank == 0 else ["1", "4"]           # rank 1 was configured differently
        gds = GuardedDataset(ds, train(mlp(), ds, epochs=5), GuardConfig(remedy="none", layers=layers),
                             trusted=Blobs(150, seed=7))
        try:
            gds.scan()
            outcome = "no error"
        except GuardError as e:
            outcome = f"GuardError: {e}"
        Path(folder, f"rank{rank}.json").write_text(json.dumps(
            {"outcome": outcome, "quarantined": len(gds.quarantined), "scans": len(gds.report.scans)}))


def _trust_free_images_worker(rank: int, world: int, folder: str, archive: str) -> None:
    """A trust-free scan of Blended CIFAR-10 on two ranks, the model untrained: only the images, each
    class held against the other classes' (``Scanner.images_across``), can find the poison."""
    with _group(rank, world, folder, timeout=300.0):
        data = prepare(RunSpec(data="cifar10", attack="blended", rate=0.1, n_train=2000, archive=archive))
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(CifarResNet18(width=8))
        gds = GuardedDataset(data.train, model, GuardConfig(remedy="none", progress=False), scan_dataset=data.scan)
        gds.scan()
        c = next(c for c in gds.report.scans[-1].classes if c.cls == data.attack.target)
        Path(folder, f"rank{rank}.json").write_text(json.dumps(
            {"quarantined": gds.quarantined.tolist(), "poisoned": data.poisoned.tolist(),
             "layers": c.critical_layers, "reason": c.reason}))


def _sampled_worker(rank: int, world: int, folder: str) -> None:
    """Sampled scans: the first whole (an untrained model, nothing taken), the next two sampled after the trigger
    is learned; each rank records what every scan scored and took."""
    with _group(rank, world, folder):
        ds = Blobs(600, poison=0.08, seed=0)
        net = mlp()
        gds = GuardedDataset(ds, torch.nn.parallel.DistributedDataParallel(net),
                             GuardConfig(remedy="none", scan_sample_per_class=60), trusted=Blobs(150, seed=7))
        scans = [gds.scan()]
        net.load_state_dict(train(mlp(), ds, epochs=25).state_dict())
        scans += [gds.scan(), gds.scan()]
        Path(folder, f"rank{rank}.json").write_text(json.dumps({
            "scans": [[s.n_sampled, s.n_scanned, s.new_quarantined] for s in scans],
            "quarantined": gds.quarantined.tolist()}))


def _spawn(fn, tmp_path, *args) -> list[dict]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(fn, args=(2, str(tmp_path), *args), nprocs=2, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.cifar
@pytest.mark.parametrize("order", ["wrapper", "module"])
def test_a_batchnorm_cnn_under_ddp_gets_one_quarantine_and_one_model_whichever_object_the_guard_holds(
        order, cifar_archive, tmp_path):
    load_cifar10(cifar_archive)                      # decoded once here; the ranks read the cache
    r0, r1 = _spawn(_batchnorm_worker, tmp_path, order, cifar_archive)
    assert len(r0["scans"]) == len(r1["scans"]) == 2
    assert r0["scans"][0]["new"] > 0             # the second scan follows a quarantine (it used to crash)
    # the cause: each rank's BatchNorm statistics follow its own batches, so before a scan the ranks
    # hold different models; the guard scans rank 0's (and applies rank 0's decision)
    assert r0["scans"][0]["before"] != r1["scans"][0]["before"]
    assert [s["after"] for s in r0["scans"]] == [s["after"] for s in r1["scans"]]   # weights and buffers
    assert r0["scans"] == [{**s, "before": r0["scans"][i]["before"]} for i, s in enumerate(r1["scans"])]
    assert r0["quarantined"] == r1["quarantined"] and r0["weights"] == r1["weights"]
    assert any(s["new"] > 0 and s["remedy"] == "unlearn" and s["steps"] > 0 for s in r0["scans"])
    q, p = set(r0["quarantined"]), set(r0["poisoned"])
    assert len(q & p) >= 0.9 * len(p)


def test_sync_batchnorm_layers_unlearn_and_re_estimate_on_rank_0_alone(tmp_path):
    r0, r1 = _spawn(_sync_batchnorm_worker, tmp_path)
    assert r0["remedy"] == "unlearn" and r0["steps"] > 0 and r0["bn_samples"] > 0
    assert r0["state"] == r1["state"] and r0["quarantined"] == r1["quarantined"]   # rank 0's model everywhere
    assert r0["accuracy"] == r1["accuracy"] and None not in r0["accuracy"]         # rank 0's read-out too
    assert r0["sync"] == "SyncBatchNorm" and not r0["own_forward"]                 # the user's layers handed back
    q, p = set(r0["quarantined"]), set(r0["poisoned"])
    assert len(q & p) >= 0.95 * len(p)
    assert r0["asr"] <= 0.05


def test_ranks_that_scan_different_things_fail_together_and_apply_nothing(tmp_path):
    r0, r1 = _spawn(_disagreeing_worker, tmp_path)
    for r in (r0, r1):
        said = "the ranks do not scan the same thing (layers: rank 0 ['1', '3', '4'], rank 1 ['1', '4'])"
        assert said in r["outcome"]
        assert r["quarantined"] == 0 and r["scans"] == 0


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


def test_sampled_scans_under_ddp_score_the_same_sample_and_rescan_together(tmp_path):
    r0, r1 = _spawn(_sampled_worker, tmp_path)
    assert r0 == r1
    (s1, s2, s3), poisoned = r0["scans"], Blobs(600, poison=0.08, seed=0).poisoned
    assert s1 == [0, 600, 0] and s2[:2] == [180, 600] and s2[2] > 0     # the sample acted: rescanned whole
    assert s3[0] == s3[1] == 180                                        # nothing left to act on: the sample stood
    assert set(poisoned.tolist()) <= set(r0["quarantined"])


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


@pytest.mark.cifar
def test_a_trust_free_scan_under_ddp_finds_blended_poison_in_the_images_on_both_ranks(cifar_archive, tmp_path):
    load_cifar10(cifar_archive)
    r0, r1 = _spawn(_trust_free_images_worker, tmp_path, cifar_archive)
    assert r0 == r1                                                   # one decision, every rank
    assert r0["layers"] == ["<input>"] and "other classes" in r0["reason"]
    q, p = set(r0["quarantined"]), set(r0["poisoned"])
    assert len(q & p) >= 0.95 * len(p) and len(q - p) <= 0.01 * (2000 - len(p))
