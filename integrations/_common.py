"""What both framework adapters share: finding the guard's sampler inside a DataLoader and
the numbers they log."""

from __future__ import annotations

from typing import Any

from loguru import logger

from guard.errors import GuardError
from guard.guarded import GuardedDataset


def sampler_chain(loader: Any) -> list[Any]:
    """The samplers a DataLoader-like object draws from, outermost first (DataLoader.sampler,
    its batch sampler and whatever those wrap: Lightning's and accelerate's wrappers keep the
    original as ``.sampler``/``.batch_sampler``/``.dataset``)."""
    out, todo, seen = [], [loader], set()
    while todo:
        obj = todo.pop(0)
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if obj is not loader:
            out.append(obj)
        for attr in ("sampler", "batch_sampler", "base_dataloader"):
            todo.append(getattr(obj, attr, None))
        inner = getattr(obj, "dataset", None)           # DistributedSamplerWrapper keeps a _DatasetSamplerWrapper
        if inner is not None and hasattr(inner, "_sampler"):
            todo.append(inner._sampler)
    return out


def check_loader(guarded: GuardedDataset, loader: Any, where: str) -> None:
    """Fail clearly unless ``loader`` samples with ``guarded.sampler`` directly. Unless
    ``GuardConfig.num_workers`` was set, the guard's own passes then load with as many workers as
    ``loader`` does (a scan reads the same data as training)."""
    chain = sampler_chain(loader)
    if guarded.config.num_workers is None:
        guarded.extractor.num_workers = max((x.num_workers or 0 for x in (loader, *chain) if hasattr(x, "num_workers")),
                                            default=0)
    if guarded.sampler not in chain:
        raise GuardError(f"the {where} does not sample with the guard's sampler, so quarantined samples would "
                         "still be trained on; build it as DataLoader(gds, batch_size=..., sampler=gds.sampler)")
    # accelerate (HF Trainer on several processes) shards the batches of each process again
    resharded = [type(s).__name__ for s in chain if getattr(s, "num_processes", 1) > 1
                 or (type(s).__name__ == "DataLoaderDispatcher" and getattr(s, "state", None) is not None
                     and getattr(s.state, "num_processes", 1) > 1)]
    if resharded:
        raise GuardError(f"the {where} goes through accelerate's {resharded[0]} on several processes, which shards "
                         "the batches again although the guard's sampler already shards by rank (each rank would "
                         "see a fraction of its share); run the HF adapter with one process per model replica")
    wrapped = [type(s).__name__ for s in chain if "Distributed" in type(s).__name__]
    if wrapped:
        raise GuardError(f"the {where}'s sampler is wrapped in {wrapped[0]}, which assumes a constant dataset size "
                         "and shards it again; the guard's sampler already shards by rank: turn the wrapping off "
                         "(Lightning: Trainer(use_distributed_sampler=False))")


def metrics(guarded: GuardedDataset, prefix: str = "guard/") -> dict[str, float]:
    """Numbers worth a dashboard: quarantine size overall and per class, and scans run."""
    out = {f"{prefix}quarantined": float(len(guarded.quarantined)), f"{prefix}scans": float(len(guarded.report.scans))}
    for r in guarded.report.quarantine:
        key = f"{prefix}quarantined_class_{r.label}"
        out[key] = out.get(key, 0.0) + 1.0
    return out


def warn_if_never_scans(guarded: GuardedDataset, epochs: float | None) -> None:
    """A run shorter than the warm-up would never scan: say so at the start, not after training."""
    warmup = guarded.config.warmup_epochs
    if epochs is not None and 0 < epochs <= warmup:
        logger.warning("guard: training runs {} epochs but the first scan is due when epoch {} starts "
                       "(GuardConfig.warmup_epochs): nothing will be scanned; lower warmup_epochs", epochs, warmup)
