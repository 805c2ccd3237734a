import io
import multiprocessing as mp
import os
import tarfile

import numpy as np
from PIL import Image

from guard.datasets import CIFAR10_CLASSES, load_cifar10


def _archive(path, per_class=4):
    """A CIFAR-10-shaped JPEG archive of ``per_class`` random 32 px images per class and split."""
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "test"):
            for cls in CIFAR10_CLASSES:
                for k in range(per_class):
                    buf = io.BytesIO()
                    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
                    info = tarfile.TarInfo(f"cifar10/{split}/{cls}/{k:04d}.jpg")
                    info.size = buf.tell()
                    buf.seek(0)
                    tar.addfile(info, buf)


def _load(archive, cache, barrier, results):
    os.environ["GUARD_CACHE_DIR"] = cache
    try:
        barrier.wait(timeout=60)
        out = load_cifar10(archive)
        results.put(("ok", int(out["train"].images.sum() % 1_000_003), len(out["test"].labels)))
    except Exception as e:  # noqa: BLE001 - reported to the parent
        results.put(("error", repr(e), 0))


def test_processes_decoding_the_archive_at_once_all_get_it_and_leave_one_cache(tmp_path):
    """DDP ranks or parallel runs may each find no cache and decode at once: every one of them must get
    the arrays (each writes its own temporary file), and one cache file is left, no temporary ones."""
    archive, cache = tmp_path / "cifar10-jpg.tar.gz", tmp_path / "cache"
    _archive(archive, per_class=200)
    ctx = mp.get_context("spawn")
    n = 6
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_load, args=(str(archive), str(cache), barrier, results)) for _ in range(n)]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in range(n)]
    for p in procs:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
    assert all(g[0] == "ok" for g in got), got
    assert len({g[1:] for g in got}) == 1 and got[0][2] == 2000
    left = sorted(f.name for f in cache.iterdir())
    assert len(left) == 1 and left[0].endswith(".npz") and ".tmp" not in left[0], left
