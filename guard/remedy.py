"""Step 6: make the final model clean after poison is found.

Dropping poison stops the backdoor from being learned further, but a backdoor learned during
warm-up stays. ``unlearn`` trains briefly on a mix of kept samples (their labels, cross-entropy)
and quarantined samples pushed *away* from the label they carry (``-log(1 - p_label)``, a
bounded loss, unlike gradient ascent).

Whether it worked is judged on *held-out* quarantined samples (``check``, 1 in ``check_share`` of
the more suspicious half, never unlearned on): the unlearned samples themselves are soon memorised
and say nothing about the trigger on new images. The goal is the model that never learned the
trigger, which still predicts that label for some images of other classes (an 8-epoch CIFAR-10
model sends 3-4 % of other images to any one class): pushing the check samples below that
*chance* rate would teach an anti-trigger and cost accuracy for nothing. So unlearning runs at
least ``unlearn_steps`` steps (fewer leave the check samples unlearned before the trigger itself
is) and stops, at most ``unlearn_max_factor`` times as many, once the check samples are fitted
no more than benign images of other classes are predicted as their label, plus ``fit_se``
binomial standard errors (``allowed_fit``; the numbers are :class:`~guard.thresholds.Thresholds`),
or once ``unlearn_patience`` checks in a row have not lowered their fit by more than its binomial
standard error (early stopping, as Lightning's ``EarlyStopping`` with its default patience of 3, with
the check's own noise as ``min_delta``): what the away loss still has not
moved is fitted through the images' content, not a trigger. Quarantined images that keep their true
label (a false alarm, or an attack's *cover* images, which carry the trigger under their own label)
stay fitted as well as their class is, and would otherwise hold every unlearning to its cap.
It *starts* only where the fit is above that and more than chance explains (:func:`fit_excess_p`
below ``max_false_alarm``), over all check samples or those of one class (:func:`taught_class`, corrected
for the classes): right after a catch, at any later scan where a suppressed backdoor creeps back, and where
a class caught after an unlearning teaches what the earlier catch's check samples no longer show, but not
on the one or two check samples that chance fits now and then. The check
reads the model that would be kept: kept samples first re-estimate the BatchNorm statistics
(:func:`recalibrate_bn`), which the unlearning batches, half of them triggered, had set otherwise.
``restart`` reloads the weights the model had when it was wrapped. Unlearning steps and checks run
under the guard's autocast (``amp``: bf16 where the hardware computes it natively), like scans.

In a model with BatchNorm, a step's batch is half triggered, and a trigger can drive deep features far
out: normalised by that batch's own statistics, the triggered half sets the scale the step learns under,
and a model unlearned that way can fail under the clean statistics it is kept with (torchvision
``resnet18`` at 64 px: trusted-set accuracy 42 -> 14 %). So each BatchNorm layer normalises the whole batch by its
kept half's statistics (:func:`kept_statistics`), as the kept model will see triggered images. Those
images are then far out and their gradients large, so every step's gradient is clipped to the norm of
the first batch's as a plain train-mode step would have it, each batch normalised by itself
(``thresholds.unlearn_kept_statistics``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import scipy.stats
import torch
from loguru import logger
from torch import nn
from torch.utils.data import Dataset, default_collate

from guard.batches import Feed, autocast
from guard.config import GuardConfig
from guard.hooks import replaced_forwards, scan_mode, train_alone, unfrozen_norms
from guard.thresholds import Thresholds


def _batch(dataset: Dataset, idx: np.ndarray) -> Any:
    return default_collate([dataset[int(i)] for i in idx])


def _cat(a: Any, b: Any) -> Any:
    """Concatenate two model inputs (tensors or dicts of tensors) along the batch dimension, so
    batch-norm layers see one ordinary mixed batch."""
    if isinstance(a, dict):
        return {k: torch.cat([a[k], b[k]]) for k in a}
    return torch.cat([a, b])


def away_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean ``-log(1 - p_label)``, computed as ``logsumexp(all) - logsumexp(all but label)`` so that
    even a saturated prediction (p_label = 1 - 1e-9) still gets a gradient."""
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return (torch.logsumexp(logits, 1) - torch.logsumexp(others, 1)).mean()


def split_check(indices: np.ndarray, scores: np.ndarray, seed: int, t: Thresholds) -> tuple[np.ndarray, np.ndarray]:
    """(unlearn, check): the check set is a fixed 1 in ``check_share`` (by a hash of the index, so it
    does not move between scans) of the more suspicious half, at most ``check_max``; benign
    look-alikes sit near the threshold, and the model rightly fits them, which must not read as a
    backdoor. It holds at least ``check_min`` samples (the first of that half in the hash's order) or,
    where the half is smaller, the whole half: one or two check samples can never show a fit beyond
    chance (``fit_excess_p``), so unlearning would never start. Fewer than ``check_min`` quarantined
    samples both unlearn and check."""
    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) < t.check_min:
        return indices, indices
    top = indices[np.argsort(-np.asarray(scores), kind="stable")[:len(indices) // 2]]
    keys = (top * 2654435761 + seed) % 2**32
    chosen = top[keys % t.check_share == 0][:t.check_max]
    if len(chosen) < t.check_min:
        chosen = top[np.argsort(keys, kind="stable")[:t.check_min]]
    if len(chosen) == 0:
        return indices, indices
    return np.setdiff1d(indices, chosen), np.sort(chosen)


def eval_logits(model: nn.Module, dataset: Dataset, indices: np.ndarray, feed: Feed,
                batch_size: int = 128) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(logits, carried labels)`` of ``indices``, batch by batch, with the model in eval mode
    (:func:`~guard.hooks.scan_mode`) and under the guard's autocast."""
    with scan_mode(model):
        for start in range(0, len(indices), batch_size):
            inputs, lab = feed.adapter.split(_batch(dataset, indices[start:start + batch_size]))
            yield feed.logits(model, inputs), lab


def predictions(model: nn.Module, dataset: Dataset, indices: np.ndarray, feed: Feed) -> tuple[np.ndarray, np.ndarray]:
    """The eval-mode predicted class and the carried label of each of ``indices``. The predictions
    stay on the model's device until the pass ends (one host wait, not one per batch)."""
    preds, labels = [], [np.empty(0, np.int64)]
    for logits, lab in eval_logits(model, dataset, indices, feed):
        preds.append(logits.argmax(1))
        labels.append(lab.numpy())
    return (torch.cat(preds).cpu().numpy() if preds else np.empty(0, np.int64)), np.concatenate(labels)


def fit_share(model: nn.Module, dataset: Dataset, indices: np.ndarray, feed: Feed) -> float:
    """Share of ``indices`` the model, in eval mode, predicts as the label they carry: how much of
    what they teach the model currently knows."""
    pred, lab = predictions(model, dataset, indices, feed)
    return float((pred == lab).mean()) if len(lab) else 0.0


def chance_fit(pred: np.ndarray, labels: np.ndarray, targets: np.ndarray) -> float:
    """How often the model predicts the labels ``targets`` carry for benign images that do not belong
    there: per target label, the share of benign samples (``pred``, ``labels``) of the other classes
    predicted as it, averaged over ``targets``. What unlearned samples are still fitted by chance."""
    rates = {int(c): float((pred[labels != c] == c).mean()) if (labels != c).any() else 0.0
             for c in np.unique(targets)}
    return float(np.mean([rates[int(c)] for c in targets])) if len(targets) else 0.0


def allowed_fit(chance: float, n: int, t: Thresholds) -> float:
    """The fit of ``n`` check samples that still counts as unlearned: the chance rate plus ``fit_se``
    binomial standard errors of it, never below ``fit_floor`` (so a model that predicts the label
    for no other image must fit none of the check samples)."""
    return max(t.fit_floor, chance + t.fit_se * float(np.sqrt(chance * (1.0 - chance) / max(n, 1))))


def fit_excess_p(fitted: int, n: int, chance: float, t: Thresholds) -> float:
    """One-sided binomial p of ``fitted`` or more of ``n`` check samples predicted as their label by a
    model that fits them only by chance (the chance rate, never below ``fit_floor``). Unlearning starts
    only below ``max_false_alarm``: a few check samples fitted by chance, noise at every scan, must not
    set off steps that cost clean accuracy (late in training there is no time to win it back)."""
    return float(scipy.stats.binom.sf(fitted - 1, n, max(chance, t.fit_floor))) if n else 1.0


def start_p(fitted: int, n: int, chance: float, t: Thresholds) -> float:
    """The unlearning's start test on ``fitted`` of ``n`` held-out quarantined samples predicted as their label:
    :func:`fit_excess_p` where their fit is above :func:`allowed_fit`, else 1.0 (within what chance allows).
    Unlearning starts below ``max_false_alarm``."""
    return fit_excess_p(fitted, n, chance, t) if n and fitted / n > allowed_fit(chance, n, t) else 1.0


def taught_class(pred: np.ndarray, carried: np.ndarray, ref_pred: np.ndarray, ref_lab: np.ndarray,
                 t: Thresholds) -> tuple[int | None, float]:
    """The class whose held-out quarantined samples (``pred``: the model's predictions; ``carried``: the labels
    they carry) the model fits furthest beyond that label's own chance rate, by the unlearning's start test
    (:func:`start_p`), and its p corrected for the classes that hold check samples (Bonferroni): ``(class, p)``,
    or ``(None, 1.0)`` where no class is fitted above its allowed fit.
    The pooled test of all check samples misses a class caught after an unlearning: the earlier catch's
    check samples, unlearned, outnumber it, and what its poison taught is never unlearned."""
    classes = np.unique(carried)
    best: tuple[int | None, float] = (None, 1.0)
    for c in classes:
        mine = carried == c
        n, fitted = int(mine.sum()), int((pred[mine] == c).sum())
        p = min(1.0, len(classes) * start_p(fitted, n, chance_fit(ref_pred, ref_lab, np.array([c])), t))
        if p < best[1]:
            best = (int(c), p)
    return best


def not_taught(fitted: int, n: int, chance: float, t: Thresholds) -> str:
    """Why ``fitted`` of ``n`` held-out quarantined samples predicted as their label do not show that
    poison left behind still teaches what they carry (empty where they do): a fit no more than
    :func:`allowed_fit` (chance plus ``fit_se`` errors: the unlearning's stop) or, with
    ``follow_gate_p`` (the default), one whose :func:`fit_excess_p` is not below ``max_false_alarm`` (the
    unlearning's start)."""
    fit, allowed = fitted / max(n, 1), allowed_fit(chance, n, t)
    said = f"the model predicts {fit:.1%} of its {n} held-out quarantined samples as their label"
    if fit <= allowed:
        return f"{said}, no more than chance ({allowed:.1%})"
    if t.follow_gate_p and (p := fit_excess_p(fitted, n, chance, t)) >= t.max_false_alarm:
        return f"{said}, above chance ({allowed:.1%}) but with p = {p:.2g}, not below max_false_alarm={t.max_false_alarm:g}"
    return ""


def accuracy_change(before: np.ndarray, after: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    """``(accuracy before, accuracy after, p)`` of the same samples' predictions ``before`` and ``after``
    a change of the model, with ``p`` the one-sided exact McNemar test that the change lowered it: of
    the samples whose correctness changed, the binomial chance (one half each way) that at least as
    many went from right to wrong. NaN for no samples."""
    if len(labels) == 0:
        return float("nan"), float("nan"), float("nan")
    was, now = before == labels, after == labels
    lost, won = int((was & ~now).sum()), int((~was & now).sum())
    p = float(scipy.stats.binom.sf(lost - 1, lost + won, 0.5)) if lost + won else 1.0
    return float(was.mean()), float(now.mean()), p


class _KeptNorm(torch.autograd.Function):
    """BatchNorm of a whole batch ``x`` by the (biased) per-channel statistics of its rows ``first`` onwards,
    with the gradient through those statistics as in train mode; no running statistics are touched. Built
    on the fused kernels BatchNorm itself runs (the statistics of the kept rows as train mode computes them,
    then the whole batch normalised by them as eval mode does), so a step costs about what a plain
    train-mode step costs (the same arithmetic in elementwise ops costs 2.5 times as much on a CPU). The backward is eval
    mode's (the direct path through the normalisation, and the weight and bias gradients ``sum g x_hat``
    and ``sum g`` over every row) plus, on the kept rows alone, the path through their statistics:
    ``-invstd * w / m * (sum g + x_hat * sum g x_hat)``, ``m`` the kept elements per channel."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, first: int,
                eps: float) -> torch.Tensor:
        # the kernels take reduced-precision input with float parameters and give float statistics then
        dtype = weight.dtype if weight is not None else (x.dtype if x.dtype in (torch.float32, torch.float64)
                                                         else torch.float32)
        one = torch.ones(x.shape[1], dtype=dtype, device=x.device)
        with torch.no_grad():
            _, mean, invstd = torch.native_batch_norm(x[first:], one, torch.zeros_like(one), None, None, True, 0.0, eps)
            var = invstd.pow(-2) - eps
            y = torch.native_batch_norm(x, weight, bias, mean, var, False, 0.0, eps)[0]
        ctx.save_for_backward(x, weight if weight is not None else one, mean, var, invstd)
        ctx.first, ctx.eps, ctx.affine = first, eps, (weight is not None, bias is not None)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, mean, var, invstd = ctx.saved_tensors
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(grad, x, weight, mean, var, None, None, False, ctx.eps,
                                                               [True, True, True])
        kept = x[ctx.first:]
        shape = [1, -1] + [1] * (x.dim() - 2)
        coef = -invstd * weight.float() * (kept.shape[1] / kept.numel())
        slope = coef * invstd * gw.float()                      # the kept rows' correction is slope * x + offset
        offset = coef * (gb.float() - mean * invstd * gw.float())
        gx[ctx.first:] += torch.addcmul(offset.view(shape), kept, slope.view(shape))
        return gx, gw if ctx.affine[0] else None, gb if ctx.affine[1] else None, None, None


def _kept_forward(first: int) -> Callable[[nn.modules.batchnorm._BatchNorm, torch.Tensor], torch.Tensor]:
    """A BatchNorm forward that normalises every row of the batch by the (biased) statistics of rows
    ``first`` onwards, per channel, with the gradient through them as in train mode (:class:`_KeptNorm`);
    running statistics are left alone."""
    def forward(m: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
        return _KeptNorm.apply(x, m.weight, m.bias, first, m.eps)
    return forward


@contextlib.contextmanager
def kept_statistics(norms: list[nn.modules.batchnorm._BatchNorm], first: int) -> Iterator[None]:
    """Within it, each of ``norms`` (in train mode) normalises a batch by the statistics of its rows
    ``first`` onwards (the kept half of an unlearning batch) instead of the whole batch's. Each layer's
    own ``forward`` attribute (:func:`~guard.hooks.train_alone` sets one on ``SyncBatchNorm``) is restored."""
    with replaced_forwards(norms, _kept_forward(first).__get__):
        yield


def _mixed_loss(model: nn.Module, feed: Feed, cfg: GuardConfig, q_inputs: Any, q_labels: torch.Tensor, k_inputs: Any,
                k_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, kept logits)`` of one unlearning batch, quarantined rows first, run as one batch under the
    guard's training autocast: cross-entropy on the kept half plus :func:`away_loss` on the quarantined
    half (labels on the model's device)."""
    with autocast(feed.device, cfg.amp, training=True):
        inputs = feed.adapter.move(_cat(q_inputs, k_inputs), feed.device, feed.channels_last)
        logits = feed.adapter.forward(model, inputs)
    n = len(q_labels)
    loss = nn.functional.cross_entropy(logits[n:].float(), k_labels) + away_loss(logits[:n].float(), q_labels)
    return loss, logits[n:]


def _self_normalised_norm(model: nn.Module, params: list[nn.Parameter], norms: list[nn.modules.batchnorm._BatchNorm],
                          feed: Feed, cfg: GuardConfig, *batch: Any) -> torch.Tensor:
    """The gradient norm of one unlearning ``batch`` (:func:`_mixed_loss`'s arguments) with ``norms``
    normalising it by its own statistics (the scale of a plain train-mode step), on the device. The
    parameters' gradients and the running statistics are put back as they were."""
    saved = [p.grad for p in params]
    stats = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             if m.track_running_stats else None for m in norms]
    try:
        for p in params:
            p.grad = None
        _mixed_loss(model, feed, cfg, *batch)[0].backward()
        return _grad_norm(params).detach()
    finally:
        for p, g in zip(params, saved):
            p.grad = g
        for m, st in zip(norms, stats):
            if st is not None:
                m.running_mean.copy_(st[0]), m.running_var.copy_(st[1]), m.num_batches_tracked.copy_(st[2])


def _grad_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """The norm of all of ``params``' gradients together, on the device (0 where none has one)."""
    norms = [p.grad.norm() for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros((), device=params[0].device)


def _clip(params: list[nn.Parameter], bound: torch.Tensor) -> None:
    """Scale the gradients down to a norm of at most ``bound`` on the device (``clip_grad_norm_`` reads
    its bound back to the host)."""
    coef = (bound / (_grad_norm(params) + 1e-6)).clamp(max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(coef)


class Unlearned(NamedTuple):
    """What :func:`unlearn` did: the check samples' fit after, the steps, the kept samples that
    re-estimated the returned model's BatchNorm statistics (0: none, or steps ran after the last check),
    and why it stopped: ``"chance"`` (fitted no more than chance allows), ``"no progress"``
    (``unlearn_patience`` checks without a fit lower by more than its standard error), ``"cap"``
    (``unlearn_max_factor x unlearn_steps``) or ``"nothing to unlearn"`` (no quarantined, kept or
    trainable parameters)."""

    fit: float
    steps: int
    settled: int
    stopped: str


@dataclass(frozen=True)
class Unlearning:
    """One unlearning job: what the ``quarantined`` samples of ``dataset`` taught is unlearned while
    ``kept`` samples keep the task; ``check`` (held out from them) measures it. ``fit_before``: the
    check samples' ``fit_share`` now; ``allowed``: the fit at which they count as unlearned."""

    dataset: Dataset
    kept: np.ndarray
    quarantined: np.ndarray
    check: np.ndarray
    fit_before: float
    allowed: float
    seed: int


def unlearn(model: nn.Module, job: Unlearning, feed: Feed, cfg: GuardConfig,
            optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None) -> Unlearned:
    """Run ``job``. ``optimizer`` builds the optimizer of the steps from the parameters (default
    ``SGD(lr=cfg.unlearn_lr, momentum=cfg.unlearn_momentum)``). Each step mixes ``cfg.unlearn_batch``
    samples, half quarantined and half kept (with BatchNorm, normalised by the kept half, see the
    module's docstring). Each check first re-estimates the BatchNorm statistics on
    kept samples (:func:`recalibrate_bn`), so it judges the model that would be kept. It stops at chance,
    after ``unlearn_patience`` checks that do not lower the fit beyond its standard error, or at the cap
    (:class:`Unlearned`; where its ``settled`` is 0, call :func:`recalibrate_bn`)."""
    dataset, kept, quarantined, check = job.dataset, job.kept, job.quarantined, job.check
    adapter, device = feed.adapter, feed.device
    params = [p for p in model.parameters() if p.requires_grad]
    if not params or len(quarantined) == 0 or len(kept) == 0:
        return Unlearned(float("nan"), 0, 0, "nothing to unlearn")
    opt = (optimizer or (lambda p: torch.optim.SGD(p, lr=cfg.unlearn_lr, momentum=cfg.unlearn_momentum)))(params)
    t = cfg.thresholds
    rng = np.random.default_rng(job.seed)
    half = cfg.unlearn_batch // 2             # unlearn_batch >= 2
    last, settled, stopped = job.fit_before, 0, "cap"
    best, stale = job.fit_before, 0           # the lowest check so far, and the checks since
    accs: list[torch.Tensor] = []          # kept-half accuracy per step, on the device
    norms = unfrozen_norms(model)
    kept_stats = t.unlearn_kept_statistics and bool(norms)
    bound: torch.Tensor | None = None
    try:
        # train mode throughout: fit_share's scan_mode hands it back after each check
        with train_alone(model), torch.enable_grad():
            for step in range(t.unlearn_max_factor * cfg.unlearn_steps):
                q_inputs, q_labels = adapter.split(_batch(dataset, rng.choice(quarantined, min(half, len(quarantined)),
                                                                              replace=False)))
                k_inputs, k_labels = adapter.split(_batch(dataset, rng.choice(kept, half, replace=len(kept) < half)))
                q_labels, k_labels = q_labels.to(device), k_labels.to(device)
                batch = (q_inputs, q_labels, k_inputs, k_labels)
                with kept_statistics(norms if kept_stats else [], len(q_labels)):
                    loss, k_logits = _mixed_loss(model, feed, cfg, *batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if kept_stats:
                    if bound is None:             # the first batch once more, as a batch normalised by itself
                        bound = _self_normalised_norm(model, params, norms, feed, cfg, *batch)
                    _clip(params, bound)
                opt.step()
                settled = 0                       # the weights moved since the kept samples last set the statistics
                accs.append((k_logits.argmax(1) == k_labels).float().mean().detach())   # read once, at the end
                # stop once the held-out quarantined samples are fitted no more than by chance
                if step + 1 >= cfg.unlearn_steps and (step + 1) % t.check_every == 0:
                    settled = recalibrate_bn(model, dataset, kept, feed, cfg, job.seed)
                    last = fit_share(model, dataset, check, feed)
                    # a new low counts once it is beyond the check's own binomial noise around the best
                    lower = last < best - float(np.sqrt(best * (1.0 - best) / max(len(check), 1)))
                    best, stale = (last, 0) if lower else (best, stale + 1)
                    if last <= job.allowed:
                        stopped = "chance"
                        break
                    if stale >= t.unlearn_patience:
                        stopped = "no progress"
                        break
    finally:
        opt.zero_grad(set_to_none=True)
    acc = torch.stack(accs).cpu().numpy() if accs else np.full(1, np.nan)   # one host wait, not one per step
    logger.info("unlearn: {} steps (stopped: {}), held-out quarantined samples predicted as their label {:.1%} -> "
                "{:.1%} (by chance: up to {:.1%}), kept batch accuracy {:.1%} -> {:.1%}", step + 1, stopped, job.fit_before,
                last, job.allowed, acc[:4].mean(), acc[-4:].mean())
    return Unlearned(last, step + 1, settled, stopped)


def recalibrate_bn(model: nn.Module, dataset: Dataset, kept: np.ndarray, feed: Feed, cfg: GuardConfig,
                   seed: int) -> int:
    """Re-estimate every BatchNorm layer's running statistics on ``thresholds.bn_samples`` kept samples
    (the model's current weights, train-mode forwards without gradients, a cumulative average over
    batches of ``unlearn_batch``; as ``torch.optim.swa_utils.update_bn`` does, through the guard's
    input adapter and autocast). After unlearning the running statistics are those of the unlearning
    batches, half of them quarantined (triggered) samples, which the model's clean accuracy pays for
    until training has replaced them; kept samples give it back at once. Each layer's momentum and
    every module's train/eval flag are restored; the layers the user froze (:func:`~guard.hooks.frozen_norms`)
    are left as they are. Returns the samples used (0: no BatchNorm to re-estimate, or off)."""
    norms = [m for m in unfrozen_norms(model) if m.track_running_stats]
    n = min(cfg.thresholds.bn_samples, len(kept))
    if not norms or n == 0:
        return 0
    idx = np.random.default_rng(seed).choice(kept, n, replace=False)
    momenta = [m.momentum for m in norms]
    try:
        for m in norms:
            m.reset_running_stats()
        with train_alone(model), torch.no_grad():
            for k, start in enumerate(range(0, n, cfg.unlearn_batch)):
                for m in norms:                   # cumulative average over the batches: the factor that
                    m.momentum = 1.0 / (k + 1)    # momentum=None takes, without reading a device counter
                inputs, _ = feed.adapter.split(_batch(dataset, idx[start:start + cfg.unlearn_batch]))
                with autocast(feed.device, cfg.amp, training=True):
                    feed.adapter.forward(model, feed.adapter.move(inputs, feed.device, feed.channels_last))
    finally:
        for m, mom in zip(norms, momenta):
            m.momentum = mom
    return n


def restart(model: nn.Module, initial_state: dict[str, torch.Tensor]) -> None:
    """Reload the weights the model had when the guard wrapped it."""
    model.load_state_dict(initial_state)
    logger.info("restart: model weights reset to their initial values; training continues on the kept data")
