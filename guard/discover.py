"""Step 1a: choose the layers a scan reads, from what one traced forward pass shows.

No class names are consulted, so a model the guard has never seen (its own block classes,
functional activations, blocks in a ``ModuleList``) is read the same way as a torchvision one.
One forward pass of a few samples is traced with hooks on every submodule, recording for each
call its output shape, the tensors it took and returned, and how many *weight layers* (modules
holding a matrix or a kernel: convolutions, linear layers, embeddings, attention) ran inside it.

1. **Units.** Start from the model's children and split a unit into the modules it calls while it
   is a *chain*: every call after the first takes the output of an earlier one and the unit
   returns one of those outputs unmodified (``nn.Sequential``, a stage looping over a
   ``ModuleList``, a transformer encoder). A unit wired otherwise -- a residual block, or any
   block with functional operations between its modules -- is kept whole: its output is the
   boundary a layer-wise analysis reads. The units with the most weight layers are split first,
   all of similar size together, until there are ``TARGET_LAYERS``.
2. **Segments.** Units without weight layers (activations, norms, pooling, dropout) join the
   unit before them. A segment is read at its first unit's output; when that unit is a single
   layer (a conv, a linear), after the norms and activations that follow it (before pooling).
3. **Spread.** At most ``MAX_LAYERS`` segments, evenly over depth, always keeping the earliest
   and the head (the last segment).

Only if that gives fewer than ``MIN_LAYERS`` while the model has more weight layers are opaque
units opened as well (their inner modules still hold the features, though off the main path);
if even then too few remain, :func:`discover` raises a :class:`~guard.errors.GuardError` that
lists the modules it saw and shows ``GuardConfig(layers=[...])``. It never falls back silently.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from loguru import logger
from torch import nn

from guard.errors import GuardError, GuardWarning
from guard.hooks import PEAK, first_tensor, scan_mode, unwrap_model

TARGET_LAYERS = 10
"""Units are split until there are this many segments (or nothing splits further)."""
MAX_LAYERS = 12
"""At most this many layers (before ``:peak`` views), spread evenly over depth."""
MIN_LAYERS = 4
"""Fewer than this, on a model with more weight layers, is an error: a layer-wise analysis
needs the early, middle and late features, not the head alone."""


@dataclass
class Call:
    """One call of a module in the traced forward pass."""

    name: str
    start: int                  # order in which calls began
    inp: int | None             # id of the first input tensor
    out: int | None             # id of the returned tensor (see hooks.first_tensor)
    version: int                # its in-place version counter when returned
    shape: tuple[int, ...] | None
    weights: int = 0            # weight layers that ran inside (itself included)
    end: int = 0                # order in which calls ended
    done: int = 0               # weight layers of the whole model that had run when it returned


@dataclass
class Discovery:
    """What :func:`discover` chose and why."""

    layers: list[str]                               # layer names (with ``:peak`` views) in forward order
    depth: dict[str, float]                         # weight layers run before a layer's output / all of them
    candidates: list[str]                           # every module called once with a batch-shaped output
    opened: list[str] = field(default_factory=list)  # opaque units that had to be opened

    def describe(self) -> str:
        names = [n for n in self.layers if not n.endswith(PEAK)]
        return ", ".join(f"{n} ({self.depth[n]:.2f})" for n in names)


def _has_matrix(module: nn.Module) -> bool:
    return any(p.dim() >= 2 for p in module.parameters())


def _own_matrix(module: nn.Module) -> bool:
    return any(p.dim() >= 2 for p in module.parameters(recurse=False))


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    return first_tensor(list(args) + list(kwargs.values()))


class _Trace:
    """Hooks on every module of ``model`` recording :class:`Call` s for one forward pass."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.calls: dict[str, list[Call]] = {}
        self._keep: list[Any] = []           # holds traced tensors alive so their ids stay unique
        self._open: dict[int, list[tuple[Call, int]]] = {}
        self._ticks = 0
        self._weights = 0

    def _pre(self, name: str):
        def hook(module, args, kwargs):
            t = _first_input(args, kwargs)
            self._keep.append(t)
            call = Call(name, self._ticks, None if t is None else id(t), None, 0, None)
            self._ticks += 1
            self._open.setdefault(id(module), []).append((call, self._weights))
        return hook

    def _post(self, name: str):
        def hook(module, args, kwargs, out):
            call, before = self._open[id(module)].pop()
            if _own_matrix(module):
                self._weights += 1
            inside = self._weights - before
            if inside == 0 and _has_matrix(module):       # fused kernels: its layers ran, unhooked
                self._weights += 1
                inside = 1
            t = first_tensor(out)
            self._keep.append(t)
            if t is not None:
                call.out, call.shape = id(t), tuple(t.shape)
                call.version = 0 if t.is_inference() else t._version
            call.weights, call.end, call.done = inside, self._ticks, self._weights
            self._ticks += 1
            self.calls.setdefault(name, []).append(call)
        return hook

    def run(self, call: Callable[[], Any]) -> None:
        handles = []
        try:
            for name, m in self.model.named_modules():
                handles.append(m.register_forward_pre_hook(self._pre(name), with_kwargs=True))
                handles.append(m.register_forward_hook(self._post(name), with_kwargs=True))
            call()
        finally:
            for h in handles:
                h.remove()


class _Plan:
    """Units -> segments over one :class:`_Trace` (see the module docstring)."""

    def __init__(self, model: nn.Module, trace: _Trace) -> None:
        self.modules = dict(model.named_modules())
        self.calls = trace.calls
        root = self.calls.get("")
        if not root or root[0].shape is None:
            raise GuardError(f"model {type(model).__name__} returned no tensor from its forward; the guard needs "
                             "(batch, classes) logits, a tuple or dict holding them, or an HF ModelOutput")
        self.batch = root[0].shape[0]
        self.total = root[0].weights

    def once(self, name: str) -> Call | None:
        calls = self.calls.get(name, [])
        return calls[0] if len(calls) == 1 else None

    def usable(self, name: str) -> bool:
        c = self.once(name)
        return c is not None and c.shape is not None and len(c.shape) >= 2 and c.shape[0] == self.batch

    def kids(self, name: str) -> list[str]:
        """The nearest descendants of ``name`` that were called, in calling order."""
        def below(parent: str) -> list[str]:
            return [f"{parent}.{n}" if parent else n for n, _ in self.modules[parent].named_children()]

        out, stack = [], below(name)
        while stack:
            child = stack.pop(0)
            if child in self.calls:
                out.append(child)
            elif child in self.modules:            # not called itself (a ModuleList): look inside
                stack[:0] = below(child)
        return sorted(out, key=lambda n: self.calls[n][0].start)

    def is_chain(self, name: str) -> bool:
        """``name`` returns the output of a call inside it unmodified, and every call before that
        one (after the first) takes an earlier call's output: its children's outputs are its path.
        Calls after it (a pooler, a side output) do not matter."""
        me = self.once(name)
        if me is None:
            return False
        inner = sorted((c for k in self.kids(name) for c in self.calls[k]), key=lambda c: c.start)
        if not inner or any(c.start < me.start or c.end > me.end for c in inner):   # shared with others
            return False
        last = [i for i, c in enumerate(inner) if c.out == me.out and c.version == me.version]
        if not last:
            return False
        produced = {c.out for c in inner[:last[-1]]}
        return all(c.inp in produced for c in inner[1:last[-1] + 1])

    def split(self, units: list[str], opaque: bool) -> list[str] | None:
        """Split the largest splittable units (all within half the largest's weight); None if none."""
        def ok(u: str) -> bool:
            parts = [k for k in self.kids(u) if self.usable(k)]
            return (self.weights(u) >= 2 and len(parts) >= 2
                    and sum(self.weights(k) for k in parts) >= 2 and (opaque or self.is_chain(u)))
        can = [u for u in units if ok(u)]
        if not can:
            return None
        top = max(self.weights(u) for u in can)
        chosen = [u for u in can if self.weights(u) * 2 >= top] if not opaque else [max(can, key=self.weights)]
        out = []
        for u in units:
            out.extend([k for k in self.kids(u) if self.usable(k)] if u in chosen else [u])
        return out

    def weights(self, name: str) -> int:
        c = self.once(name)
        return 0 if c is None else c.weights

    def segments(self, units: list[str]) -> list[str]:
        """Weightless units join the one before. A segment is read at its first unit's output, or,
        when that is a single layer (a conv, a linear), after the norms and activations that follow
        it (the last output of the same shape)."""
        groups: list[list[str]] = []
        for u in units:
            if self.weights(u) > 0 or not groups:
                groups.append([u])
            else:
                groups[-1].append(u)
        if groups and self.weights(groups[0][0]) == 0:
            groups = groups[1:]                      # weightless preprocessing before the first layer

        def shape(n: str) -> tuple[int, ...]:
            return self.once(n).shape  # type: ignore[union-attr,return-value]

        def read(g: list[str]) -> str:
            if next(self.modules[g[0]].children(), None) is not None:
                return g[0]
            return [n for n in g if len(shape(n)) == len(shape(g[0])) and np.prod(shape(n)) == np.prod(shape(g[0]))][-1]
        return [read(g) for g in groups]

    def depth(self, name: str) -> float:
        """Share of the model's weight layers that have run when ``name`` returns."""
        return self.once(name).done / max(self.total, 1)  # type: ignore[union-attr]


def discover(model: nn.Module, example: Any) -> Discovery:
    """Choose the layers of ``model`` a scan reads (see the module docstring).

    ``example``: a small batch of inputs (a tensor, a tuple of positional inputs, or a dict of
    keyword inputs), or a callable that runs the model's forward on one. Runs one forward pass in
    eval mode without gradients; the model's modes, grad mode and RNG states are restored.
    """
    inner = unwrap_model(model)
    if len(list(inner.modules())) <= 1:
        raise GuardError(f"model {type(inner).__name__} has no submodules to hook: build it from nn.Module "
                         "layers (nn.Conv2d, nn.Linear, nn.Sequential, ...) instead of functional calls on "
                         "bare nn.Parameters, so each layer's output can be read")
    if callable(example) and not isinstance(example, (torch.Tensor, Mapping)):
        call = example
    elif isinstance(example, Mapping):
        call = lambda: model(**example)  # noqa: E731
    elif isinstance(example, (tuple, list)):
        call = lambda: model(*example)  # noqa: E731
    else:
        call = lambda: model(example)  # noqa: E731
    trace = _Trace(inner)
    with scan_mode(model):
        trace.run(call)
    plan = _Plan(inner, trace)
    candidates = [n for n in trace.calls if n and plan.usable(n)]
    if not candidates:
        raise GuardError(f"model {type(inner).__name__} has no hookable layers: no submodule returned a tensor "
                         "(batch, ...) exactly once per forward; pass GuardConfig(layers=[...]) with module "
                         "names from model.named_modules()")
    units = [k for k in plan.kids("") if plan.usable(k)]
    opened: list[str] = []
    need = max(1, min(MIN_LAYERS, plan.total))
    while len(plan.segments(units)) < TARGET_LAYERS:
        nxt = plan.split(units, opaque=False)
        if nxt is None and len(plan.segments(units)) < need:
            nxt = plan.split(units, opaque=True)          # last resort: open the largest block
            opened += [u for u in units if u not in nxt] if nxt is not None else []
        if nxt is None:
            break
        units = nxt
    segs = plan.segments(units)
    if len(segs) < need:
        raise GuardError(_too_few(type(inner).__name__, segs, candidates, plan))
    if len(segs) > MAX_LAYERS:
        body = segs[:-1]
        keep = np.unique(np.linspace(0, len(body) - 1, MAX_LAYERS - 1).round().astype(int))
        segs = [body[i] for i in keep] + segs[-1:]
    if opened:
        warnings.warn(f"layer discovery opened {opened} (blocks whose inner modules may be off the main path) to "
                      f"reach {len(segs)} layers: {segs}; name the layers with GuardConfig(layers=[...]) if these "
                      "are not the ones", GuardWarning, stacklevel=2)
    layers = [v for n in segs for v in ([n, n + PEAK] if len(plan.once(n).shape) == 3 else [n])]  # type: ignore
    depth = {n: plan.depth(n) for n in segs}
    found = Discovery(layers, depth, candidates, opened)
    logger.debug("discovered {} layers over depth: {}", len(segs), found.describe())
    return found


def _too_few(model: str, segs: list[str], candidates: list[str], plan: _Plan) -> str:
    weighted = [n for n in candidates if plan.weights(n) > 0]
    pick = [weighted[i] for i in np.unique(np.linspace(0, len(weighted) - 1, min(8, len(weighted)))
                                           .round().astype(int))] if weighted else candidates[-8:]
    shown = candidates if len(candidates) <= 40 else candidates[:20] + ["..."] + candidates[-20:]
    shared = [n for n, calls in plan.calls.items() if n and len(calls) > 1 and plan.modules[n] is not None
              and _has_matrix(plan.modules[n])][:12]
    return (f"layer discovery found only {len(segs)} layer(s) {segs} in {model} ({plan.total} weight layers ran): "
            f"a layer-wise scan needs at least {MIN_LAYERS} spread over depth. Modules called once per forward "
            f"with a (batch, ...) output: {shown}"
            + (f"; called more than once (shared weights, not one layer): {shared}" if shared else "")
            + (f". Name layers early to late, e.g. GuardConfig(layers={pick})" if len(pick) >= MIN_LAYERS else
               ". Give the model's repeated or functional parts modules of their own (one module per use, called "
               "once per forward) so their outputs can be read, then let the guard discover them or name them "
               "with GuardConfig(layers=[...])"))


def discover_layers(model: nn.Module, example: Any) -> list[str]:
    """The layer names :func:`discover` chooses (``GuardConfig(layers=None)`` uses these)."""
    return discover(model, example).layers
