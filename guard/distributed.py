"""torch.distributed helpers for sharded scans: every rank scores its share of the kept samples,
then the per-sample scores and the suspect sums are combined so each rank holds the whole.

Every rank applies the same decision by construction, not by computing the same floats: before a
scan the ranks check that they scan the same thing (:func:`agree`) and take rank 0's parameters
and buffers (:func:`broadcast_model`; BatchNorm running statistics differ between ranks, since
each updates them from its own batches); after it, rank 0's result is applied everywhere
(:func:`broadcast_object`), and the model the guard changed on rank 0 is copied to the others.

A collective that fails (a peer crashed, or the process group's timeout passed) raises a
:class:`~guard.errors.GuardError` on every surviving rank; the scan then applies nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from guard.errors import GuardError


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(n: int, rank: int | None = None) -> slice:
    """Positions ``0..n-1`` that ``rank`` (default: this one) handles (strided, so every class is
    spread over the ranks). A slice, so indexing with it makes a view, not an N-sized copy."""
    own, size = world()
    return slice(own if rank is None else rank, n, size)


def _collective(what: str, fn, *args) -> None:
    try:
        fn(*args)
    except (RuntimeError, dist.DistBackendError) as e:     # type: ignore[attr-defined]
        rank, size = world()
        raise GuardError(f"rank {rank} of {size}: the scan's {what} failed ({str(e).splitlines()[0]}); a peer "
                         "failed or timed out, so no rank applies this scan (raise the process group's timeout "
                         "if scans are slow)") from None


def gather_rows(local: np.ndarray, n: int) -> np.ndarray:
    """The (n, ...) array whose rows ``shard(n)`` of each rank are that rank's ``local``."""
    size = world()[1]
    if size == 1:
        return local
    parts: list[np.ndarray | None] = [None] * size
    _collective("gather of per-sample scores", dist.all_gather_object, parts, local)
    out = np.empty((n, *local.shape[1:]), dtype=local.dtype)
    for r, part in enumerate(parts):
        out[shard(n, r)] = part
    return out


def sum_tensors(tensors: list[torch.Tensor]) -> None:
    """In-place sum over ranks (the suspect centroids' sums)."""
    if world()[1] == 1:
        return
    for t in tensors:
        _collective("sum of suspect centroids", dist.all_reduce, t)


def broadcast_object(obj: Any, what: str) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if world()[1] == 1:
        return obj
    box = [obj]
    _collective(what, dist.broadcast_object_list, box, 0)
    return box[0]


def broadcast_model(model: nn.Module) -> None:
    """Copy rank 0's parameters and buffers into every rank's ``model`` (in place)."""
    if world()[1] == 1:
        return
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            _collective("broadcast of the model from rank 0", dist.broadcast, t.data, 0)


def agree(facts: dict[str, Any]) -> None:
    """Raise a :class:`GuardError` on every rank unless every rank holds the same ``facts``."""
    rank, size = world()
    if size == 1:
        return
    parts: list[Any] = [None] * size
    _collective("check that the ranks agree", dist.all_gather_object, parts, facts)
    differ = [k for k in facts if any(p[k] != parts[0][k] for p in parts)]
    if differ:
        said = "; ".join(f"{k}: " + ", ".join(f"rank {r} {p[k]!r}" for r, p in enumerate(parts)) for k in differ)
        raise GuardError(f"rank {rank} of {size}: the ranks do not scan the same thing ({said}), so no rank applies "
                         "this scan. Give every rank the same dataset, GuardConfig and guard state (a quarantine "
                         "or restore made on one rank only, or a state_dict loaded on one rank, causes this)")
