"""One scan: named stages over one per-scan state; the decision itself is :func:`guard.decide.decide`.

    calibrate -> score -> locate -> confirm -> direction -> follow up -> elsewhere -> mismatch -> result

Every model pass goes through :meth:`Passes.stream`, which counts the samples each pass forwards
(``ScanResult.passes``) and adds up where its time goes (``ScanResult.seconds_by_part``). The
reference's and the scoring pass's features are kept within ``GuardConfig.keep_mb``
(:mod:`guard.calibrate`, :mod:`guard.keep`); stages that read kept features count them as
``<pass> (kept)`` and run no model, and so does a rescan that reads a sampled scan's (:class:`Reuse`). The
passes, in order:

=========================  ========================  =================================================
pass                       samples                   what for
=========================  ========================  =================================================
scan/trust-free-pool       2 x trust_free_per_class  trust-free only: the loss cue picks the reference; on
                                                     a single process kept, read back by the next two
scan/{source}              reference                 class sums and spread (benign reference); kept
scan/{source}-calibrate    reference                 only where its features were not kept
scan/train                 every kept sample         cosines at every layer on the model's device; kept
scan/reference-layers      reference of candidates   only where the reference was not kept
scan/screen                <= screen_per_class       candidates: is there a separate cluster?
scan/confirm               classes that separate     the probe's (or discriminant's) z of every sample
scan/direction             <= screen_per_class       trusted: the rest of the classes' main direction
scan/direction-confirm     classes that separate     ... the probe's z of every sample of those
scan/check                 held-out quarantined      follow-up gate: still fitted above chance?
scan/quarantined           <= screen_per_class       follow-up: the quarantined side of its probe
scan/follow-screen         <= screen_per_class       follow-up: the kept side of its probe
scan/quarantined-centroid  quarantined               follow-up fall-back: their centroid
scan/follow-up(-centroid)  classes followed up       look-alikes of what was quarantined
scan/elsewhere             <= screen_per_class       trusted, after a catch: the other classes along its probe
scan/elsewhere-confirm     classes that separate     ... the probe's z of every sample of those
=========================  ========================  =================================================

The input views of the direction stage (:mod:`guard.inputs`) are computed from the images as the
reference and scoring passes load them, and kept with the features (in what those leave of
``keep_mb``), so a scan reads each sample once; past the budget they are read again, without the
model. Either way they are not a pass, and their time is part of ``analysis``. With or without a
trusted set, the direction stage also holds each class's fine input view against the other classes' images
(:meth:`Scanner.images_across`): that test needs no trusted sample, so it stands where a trusted set
is too small for the trusted tests' bound. With ``mirror_images`` the classes it does not act on are held
against their own mirror images as well (:meth:`Scanner.mirror_images`, :mod:`guard.mirror`).

The scan changes nothing outside its state; :class:`~guard.GuardedDataset` applies its result.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from loguru import logger
from threadpoolctl import threadpool_limits
from torch.utils.data import Dataset

from guard.calibrate import (Calibration, Stream, calibrate, class_fit, hard_half, is_logits, pool_loss,
                             trust_free_indices, trust_free_pool)
from guard.cluster import Centroids, RefFeats, Zscore
from guard.config import GuardConfig
from guard.decide import ClassStats, Verdict, beyond_reference_p, binomial_p, decide, flag_cut, give_back, take
from guard.direction import DirectionTest, across_views, most_significant, project
from guard.distributed import gather_rows, shard, sum_tensors, world
from guard.elsewhere import along_catches
from guard.errors import GuardError
from guard.extract import Batch, Extractor
from guard.gate import GateTest, split_follow, split_gate
from guard.hooks import scan_mode
from guard.inputs import InputViews, fine_shape, read_views
from guard.keep import KeptFeatures, keep_budget
from guard.locate import excess_share, guard_layers, paper_window
from guard.mirror import MIRROR, MirrorSteps, Symmetry, mirror_steps, mirrored, symmetry
from guard.mismatch import Mismatch, mismatch
from guard.probe import Probe, self_train
from guard.reference import Reference, unit, unit_
from guard.report import ClassReport
from guard.score import DeviceScores
from guard.thresholds import Thresholds


class Passes:
    """The scan's only route to the model: streams features, counts what each pass forwards and
    adds up where its time goes (:meth:`~guard.extract.Extractor.stream`'s parts)."""

    def __init__(self, extractor: Extractor) -> None:
        self.extractor, self.samples, self.seconds = extractor, {}, {}

    def stream(self, dataset: Dataset, names: Sequence[str], indices: np.ndarray | None, desc: str,
               stop_early: bool = False, host: bool = True,
               views: Callable[[], bool] | None = None) -> Iterator[Batch]:
        for b in self.extractor.stream(dataset, names, indices, desc, stop_early, self.seconds, host, views):
            self.samples[desc] = self.samples.get(desc, 0) + len(b.labels)
            yield b

    def count_kept(self, desc: str, n: int) -> None:
        """``n`` samples of pass ``desc`` read from kept features instead of the model (``desc (kept)``)."""
        self.samples[f"{desc} (kept)"] = self.samples.get(f"{desc} (kept)", 0) + n

    def split(self, total: float) -> dict[str, float]:
        """The scan's ``total`` seconds split into the model passes' parts and ``analysis`` (the rest:
        scoring, deciding, fitting probes on the host)."""
        parts = {k: round(self.seconds.get(k, 0.0), 4) for k in ("load", "forward", "hooks", "transfer")}
        return {**parts, "analysis": round(max(total - sum(parts.values()), 0.0), 4)}


@dataclass
class ScanState:
    """What the stages of one scan share; rows are positions in ``kept``."""

    kept: np.ndarray
    cal: Calibration
    passes: Passes
    labels: np.ndarray                  # (N,) labels read during the scan
    raw: np.ndarray                     # (N, L) cosine to the class reference
    suspects: Reference                 # per class: sums of out-of-spread samples' unit features
    train_fit: np.ndarray               # (C,) share of each class's training samples predicted as it (nan: unknown)
    out_of_spread: np.ndarray = None    # (N, L) bool (set by locate)
    suspicion: np.ndarray = None        # (N,) higher = more suspicious
    threshold: np.ndarray = None        # (N,) the threshold each sample's suspicion was held to
    ref_susp: np.ndarray = None         # the reference samples' suspicion on the same scale
    ref_scored: set[int] = field(default_factory=set)   # classes whose ref_susp is on the score flagging them
    classes: dict[int, ClassReport] = field(default_factory=dict)
    windows: dict[int, list[int]] = field(default_factory=dict)   # candidates -> layer window
    n_tested: int = 0                   # classes with at least min_class samples (the multiple-test count)
    flagged: list[np.ndarray] = field(default_factory=list)
    paper_flagged: list[np.ndarray] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    predicted: np.ndarray | None = None   # (N,) the class the model predicts (None: no class scores)
    store: KeptFeatures | None = None   # the scoring pass's features, when they fit (guard.keep)
    kept_views: KeptFeatures | None = None   # the scoring pass's raw input views, when they fit too (guard.inputs)
    releasable: dict[int, np.ndarray] = field(default_factory=dict)   # class -> quarantined indices it may give back
    released: list[np.ndarray] = field(default_factory=list)
    probes: dict[int, Probe] = field(default_factory=dict)   # class -> this scan's probe at the probe layers
    probe_only: set[int] = field(default_factory=set)   # follow-ups fitted for guard.elsewhere, taking nothing
    input_probes: dict[int, tuple[int, Probe]] = field(default_factory=dict)   # class -> (input view, its probe)
    input_views: InputViews | None = None   # the direction stage's views (the coarse view's whitening)
    layer_p: dict[int, dict[int, float]] = field(default_factory=dict)   # class -> direction p per layer position
    layer_names: list[str] = field(default_factory=list)   # the direction stage's layers, then input views
    last_views: dict[int, tuple[np.ndarray, list[torch.Tensor] | None]] = field(default_factory=dict)   # Scanner._views
    mismatch: Mismatch | None = None    # the classes not acted on, combined (guard.mismatch)
    symmetry: Symmetry | None = None    # mirror_images="auto": the trusted (or trust-free, training) images against their mirrors
    read_back_bytes: int = 0            # what the scoring pass read back from (Reuse.nbytes), held while it ran

    def rows_of(self, classes) -> np.ndarray:
        return np.flatnonzero(np.isin(self.labels, list(classes)))

    def warn(self, msg: str) -> None:
        logger.warning(msg)
        self.warnings.append(msg)

    def score_reference(self, c: int, rows: np.ndarray, z: np.ndarray) -> None:
        """Class ``c``'s reference samples ``rows`` on the score that flags the class in this scan."""
        self.ref_susp[rows] = z
        self.ref_scored.add(c)


_ACTED = (Verdict.SEPARATE, Verdict.LIKE_QUARANTINED)   # the verdicts under which a scan acts on a class


@dataclass
class Reuse:
    """What a scan read that a rescan of more samples by the same model may read again instead of running the
    model (:meth:`Scanner.run_sample`; within a trust-free scan, its pool's pass, :meth:`Scanner._read_pool`):
    the trusted calibration (trust-free, the reference is drawn from the
    samples scanned, so it is not reused), and the scoring pass's features, views and predictions of the samples
    ``indices`` where they were kept (a single process: ranks score shards). Each sample's numbers are those the
    model gave it; only the batches they were computed in differ."""

    cal: Calibration | None
    indices: np.ndarray                 # the dataset indices of the rows below
    labels: np.ndarray
    predicted: np.ndarray | None        # None: the model's outputs are not class scores
    store: KeptFeatures | None          # None: nothing of the scoring pass was kept
    views: KeptFeatures | None

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes for k in (self.store, self.views) if k is not None)


@dataclass
class ScanResult:
    scanned: np.ndarray          # dataset indices scanned (the kept ones)
    suspicion: np.ndarray        # (len(scanned),) higher = more suspicious
    threshold: np.ndarray        # (len(scanned),) per-sample threshold (its class's)
    labels: np.ndarray           # (len(scanned),) labels read during the scan
    flagged: np.ndarray          # dataset indices to quarantine (active rule)
    paper_flagged: np.ndarray    # dataset indices the paper's rule flags (baseline, for comparison)
    classes: list[ClassReport]
    calibration_source: str
    seconds: dict[str, float]
    warnings: list[str]
    memory_bytes: int = 0
    reference_suspicion: np.ndarray | None = None   # the benign reference samples' suspicion, same scale
    passes: dict[str, int] = field(default_factory=dict)   # samples forwarded per model pass
    seconds_by_part: dict[str, float] = field(default_factory=dict)   # Passes.split
    predicted: np.ndarray | None = None              # (len(scanned),) the model's predicted class at the scan
    reference_predicted: np.ndarray | None = None    # the same for the trusted reference samples (None: trust-free)
    reference_labels: np.ndarray | None = None
    released: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))   # indices given back
    mismatch_p: float | None = None              # guard.mismatch: the classes not acted on, combined
    mismatch_at: str | None = None               # ... at this layer or input view
    mirror_symmetry_p: float | None = None       # mirror_images="auto": the symmetry check's p (guard.mirror)


@contextmanager
def _timed(seconds: dict[str, float], name: str) -> Iterator[None]:
    t = time.monotonic()
    yield
    seconds[name] = seconds.get(name, 0.0) + time.monotonic() - t


def _units(batches: Iterator[Batch], n_layers: int, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """Unit features (float64 unless ``dtype``) of every batch, concatenated per layer."""
    chunks = [[unit(f.to(dtype)) for f in b.feats] for b in batches]
    return [torch.cat([ch[k] for ch in chunks]) if chunks else torch.zeros(0, dtype=torch.float64)
            for k in range(n_layers)]


def _seed(test: DirectionTest, th: Thresholds) -> np.ndarray:
    """A probe's first calls from a test's count beyond the trusted samples: the samples beyond are suspects
    (above ``screen_z``), those within ``benign_z`` trusted sd benign (0), the rest in between (``benign_z``)."""
    return np.where(test.beyond, th.screen_z + 1.0, np.where(test.z < th.benign_z, 0.0, th.benign_z))


def _view_units(views: InputViews | None, raw: list[torch.Tensor]) -> list[torch.Tensor]:
    """:meth:`InputViews.units` of ``raw``; without ``views``, the fine view's alone (it needs no fitting)."""
    return views.units(raw) if views is not None else [unit(raw[0])]


def _view_unit(views: InputViews | None, raw: list[torch.Tensor], k: int) -> torch.Tensor:
    """View ``k`` of :func:`_view_units` alone."""
    return views.view(raw, k) if views is not None else unit(raw[0])


BLOCK_ROWS = 512
"""The most rows a stage that scores a whole class turns into float64 features at once. A class of 2,000
images is 50 MB in the fine view: memory the process has not used before costs its first writes, and on
some hosts (virtual machines that take freed memory back) those cost far more than the arithmetic."""


def _blocks(n: int) -> list[slice]:
    """Rows ``0..n-1`` in consecutive blocks of at most :data:`BLOCK_ROWS` and at least half that (one block
    where ``n`` is smaller): a matrix product gives a row the same bits in any block of that size."""
    edges = np.linspace(0, n, -(-n // BLOCK_ROWS) + 1).round().astype(int).tolist() if n else []
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]


def _flat(parts: list[np.ndarray]) -> np.ndarray:
    return (np.unique(np.concatenate(parts)) if parts else np.empty(0, np.int64)).astype(np.int64)


class Scanner:
    """Runs scans of ``model`` over a dataset; holds no quarantine state."""

    def __init__(self, model: torch.nn.Module, layers: Sequence[str], extractor: Extractor,
                 config: GuardConfig, trusted_random: bool = False) -> None:
        """``trusted_random``: the trusted set returns different data for the same index (a random transform the
        guard could not switch off), so whether its images are mirror-symmetric cannot be read."""
        self.model, self.layers, self.extractor, self.cfg = model, list(layers), extractor, config
        self.trusted_random = trusted_random
        self.th = config.thresholds
        self.C = extractor.num_classes
        self._symmetry: dict[int, Symmetry | None] = {}              # id(trusted set) -> guard.mirror.symmetry

    def run(self, train: Dataset, trusted: Dataset | None, kept: np.ndarray,
            prior: dict[int, np.ndarray] | None = None, check: dict[int, np.ndarray] | None = None,
            releasable: dict[int, np.ndarray] | None = None, reuse: Reuse | None = None) -> ScanResult:
        """Scan the ``kept`` indices of ``train``. ``prior`` maps a class to its already quarantined
        indices: such a class is searched again for samples like them (:meth:`follow_up`), unless
        ``check`` (per class, held-out quarantined indices) shows the model no longer learns what
        they teach (:meth:`still_taught`). ``releasable`` (per class, the quarantined indices a scan
        may give back: the guard's own catches, never samples quarantined by hand): a class found
        separate again gives back those its new probe puts with its benign samples
        (:func:`~guard.decide.give_back`; ``ScanResult.released``). ``reuse``: what :meth:`run_sample` read
        with the same model, read again instead of running it (counted as ``<pass> (kept)``)."""
        return self.run_sample(train, trusted, kept, prior, check, releasable, reuse)[0]

    def run_sample(self, train: Dataset, trusted: Dataset | None, kept: np.ndarray,
                   prior: dict[int, np.ndarray] | None = None, check: dict[int, np.ndarray] | None = None,
                   releasable: dict[int, np.ndarray] | None = None, reuse: Reuse | None = None,
                   until_separate: bool = False) -> tuple[ScanResult, Reuse]:
        """:meth:`run`, and what a rescan of more samples by the same model may reuse of it (:class:`Reuse`; it
        holds the kept features' memory until dropped). ``until_separate``: stop after the stage that first finds
        a class separate (for a sample that is rescanned whole wherever it acts: the stages after it could make
        the scan act more, never less)."""
        prior = prior or {}
        passes, seconds, t0 = Passes(self.extractor), {}, time.monotonic()
        # bytes the calibration and scoring passes may keep together; what a reused scan holds counts against it
        budget = keep_budget(self.cfg.keep_mb) - (reuse.nbytes if reuse is not None else 0)
        # numpy's and scipy's BLAS run single-threaded during the scan: the analysis alternates between them
        # and torch, and their idle threads, spinning, starve torch's (a 2-core scan 8.3 -> 3.1 s; NOTES.md)
        with threadpool_limits(limits=1, user_api="blas"), scan_mode(self.model):
            with _timed(seconds, "calibrate"):
                pool = None
                if reuse is not None and reuse.cal is not None and trusted is not None:
                    cal = reuse.cal
                    passes.count_kept("scan/trusted", len(cal.labels))
                else:
                    cal, pool = self.calibrate(passes, trusted, train, kept, budget,
                                               keep_pool=reuse is None and world()[1] == 1)
            with _timed(seconds, "score"):
                read = reuse or pool                      # one of them at most: a pool is kept only without reuse
                st = self.score(passes, train, kept, cal,
                                budget - cal.kept_bytes - (pool.nbytes if pool is not None else 0), read)
                st.read_back_bytes = read.nbytes if read is not None else 0
            del pool, read
            st.seconds = seconds
            st.symmetry = self.trusted_symmetry(st, train)
            st.releasable = {c: np.sort(np.asarray(v, dtype=np.int64)) for c, v in (releasable or {}).items() if len(v)}
            self.check_classes(st)
            self.locate(st, prior)
            if st.windows:
                with _timed(seconds, "confirm"):
                    self.confirm(train, st)
            if self.cfg.critical_rule != "paper" and not (until_separate and self._separate(st)):
                with _timed(seconds, "direction"):
                    if st.cal.source == "trusted":
                        self.direction(train, st)
                    if self.cfg.scan_inputs:
                        self.images_across(train, st)
            if not (until_separate and self._separate(st)):
                self._after_direction(train, st, prior, check)
        held = Reuse(cal if cal.source == "trusted" else None, st.kept, st.labels, st.predicted, st.store,
                     st.kept_views if st.store is not None else None)
        return self.result(st, passes.split(time.monotonic() - t0)), held

    @staticmethod
    def _separate(st: ScanState) -> set[int]:
        return {c for c, v in st.classes.items() if v.verdict == Verdict.SEPARATE}

    def _after_direction(self, train: Dataset, st: ScanState, prior: dict[int, np.ndarray],
                         check: dict[int, np.ndarray] | None) -> None:
        """The stages after the direction stage: follow-ups, another class's catch, the trusted-set check."""
        separate = self._separate(st)
        follow = {c: q for c, q in prior.items() if len(q) >= 2 and c in st.classes and c not in separate}
        if follow and check and self.th.follow_gate:
            follow = self.still_taught(train, st, follow, check)
        if follow:
            with _timed(st.seconds, "follow_up"):
                self.follow_up(train, st, follow)
        if (st.probes or st.input_probes) and st.cal.source == "trusted" and self.th.catch_elsewhere:
            with _timed(st.seconds, "elsewhere"):
                self.elsewhere(train, st)
        self.trusted_mismatch(st)

    # ---- stage 1: calibrate ---------------------------------------------------------------
    def calibrate(self, passes: Passes, trusted: Dataset | None, train: Dataset, kept: np.ndarray,
                  budget: float, keep_pool: bool = False) -> tuple[Calibration, Reuse | None]:
        """The benign reference: the trusted set, or trust-free the loss-cleaned training subset; its features
        and views kept within ``budget`` bytes. Trust-free with ``keep_pool``, the loss cue's pass over its pool
        reads every layer and the images' views and keeps them (:meth:`_read_pool`): the reference is then read
        from them, and the scoring pass reads the pool's samples from the returned :class:`Reuse`, so a trust-free
        scan forwards each sample once."""
        stream, pool = passes.stream, None
        if trusted is not None:
            source = (trusted, None, "trusted")
        elif keep_pool:
            stream, indices, pool = self._read_pool(passes, train, kept, budget)
            source = (train, indices, "trust-free")
        else:
            source = (train, trust_free_indices(passes.stream, train, kept, self.layers[-1], self.C,
                                                (self.cfg.trust_free_per_class, self.cfg.seed)), "trust-free")
        views = self._want_views(world()[1] == 1) and source[2] == "trusted"   # only the trusted tests read them
        held = pool.nbytes if pool is not None else 0
        return calibrate(stream, self.layers, source, self.C, self.th, budget - held, views), pool

    def _read_pool(self, passes: Passes, train: Dataset, kept: np.ndarray,
                   budget: float) -> tuple[Stream, np.ndarray, Reuse | None]:
        """The trust-free reference's indices (:func:`~guard.calibrate.trust_free_indices`) from one pass over
        the pool at every layer, with a stream that reads the pool's samples back from what it kept (counted
        as ``<pass> (kept)``; the model's own stream where nothing was kept), and what the scoring pass may
        read back (None: nothing). The pool keeps its features only where the pool, the reference's copy
        (counted as large as the pool) and the scoring pass's all fit in ``budget`` at its size a sample, so
        keeping it never leaves the scoring pass less to keep than it had without."""
        pool = trust_free_pool(kept, self.C, (self.cfg.trust_free_per_class, self.cfg.seed))
        share = budget * len(pool) / (2 * len(pool) + len(kept))
        store, views = KeptFeatures(len(pool), share), None
        want = self._want_views(True)
        losses, labels, logits = [], [], []
        for b in passes.stream(train, self.layers, pool, "scan/trust-free-pool",
                               views=lambda: want and not store.refused and (views is None or not views.refused)):
            losses.append(pool_loss(b, self.C))
            labels.append(b.labels.numpy())
            logits.append(b.logits)
            store.add(b.feats, b.bf16)
            views = views or KeptFeatures(len(pool), share - store.nbytes)
            if b.views is None:
                views.drop()
            else:
                views.add(b.views, (False,) * len(b.views))
        lab = np.concatenate(labels)
        indices = pool[hard_half(np.concatenate(losses), lab)]
        if not store.complete:
            return passes.stream, indices, None
        out = torch.cat(logits)
        bf16 = tuple(x.dtype == torch.bfloat16 for x in store.layers)

        def stream(dataset: Dataset, layers: Sequence[str], idx: np.ndarray, desc: str, **_) -> Iterator[Batch]:
            rows, ids = np.searchsorted(pool, idx), [self.layers.index(n) for n in layers]
            passes.count_kept(desc, len(rows))
            for at in range(0, len(rows), self.cfg.batch_size):       # the batches a pass over idx would cut
                r = rows[at:at + self.cfg.batch_size]
                yield Batch(pool[r], torch.from_numpy(lab[r].astype(np.int64)), store.rows(r, ids), out[r],
                            tuple(bf16[i] for i in ids))

        return stream, indices, Reuse(None, pool, lab, out.argmax(1).numpy(), store,
                                      views if views is not None and views.complete else None)

    # ---- stage 2: score ---------------------------------------------------------------------
    def score(self, passes: Passes, train: Dataset, kept: np.ndarray, cal: Calibration, budget: float,
              reuse: Reuse | None = None) -> ScanState:
        """Every kept sample's cosine to its class reference at every layer, and per class the sums
        of the out-of-spread samples' features (the suspect centroids), computed on the model's
        device (:class:`~guard.score.DeviceScores`). Sharded across ranks. On a single process the features,
        then the images' views, are kept in ``budget`` bytes for the later stages. The samples ``reuse`` kept
        are read from it instead of the model (:meth:`_score_batches`)."""
        mine = kept[shard(len(kept))]
        labels = np.empty(len(mine), dtype=np.int32)          # C < 2**31; 4 bytes a sample at N = 10**6
        scores, known = DeviceScores(cal, len(mine), self.th.out_z, self.extractor.device), True
        # ranks score shards, the later stages read whole classes: keep features on a single process only
        store = KeptFeatures(len(mine), budget) if world()[1] == 1 else None
        views: KeptFeatures | None = None     # the images' raw views, in what the features leave of the budget
        done = 0
        want = self._want_views(store is not None)
        for rows, b, pred in self._score_batches(passes, train, mine, reuse,
                                                 lambda: want and (views is None or not views.refused)):
            n, lab = len(b.labels), b.labels.numpy()
            missing = np.flatnonzero(np.isnan(cal.mean[lab, 0]))
            if len(missing):
                c = int(lab[missing[0]])
                raise GuardError(f"class {c} (dataset index {int(b.positions[missing[0]])}) has no samples in "
                                 f"the {cal.source} reference; add trusted samples of class {c}")
            at = None if isinstance(rows, slice) else rows
            if store is not None:
                store.add(b.feats, b.bf16, at)
                views = views or KeptFeatures(len(mine), budget - store.nbytes)
                if b.views is None:
                    views.drop()
                else:
                    views.add(b.views, (False,) * len(b.views), at)
            if b.logits is not None:
                known = known and is_logits(b.logits, self.C)     # known: the model's logits are class scores
                pred = b.logits.argmax(1) if known else None
            known = known and pred is not None
            scores.add(rows, b, pred if known else None)
            labels[rows if at is None else at.numpy()] = lab
            done += n
        if done != len(mine):
            raise GuardError(f"dataset yielded {done} samples for {len(mine)} indices; its length changed "
                             "during the scan: keep len(dataset) constant while training")
        raw, pred, sums = scores.result()
        suspects = Reference([x.shape[1] for x in sums], self.C)
        suspects.sums = sums
        raw, labels, pred = gather_rows(raw, len(kept)), gather_rows(labels, len(kept)), gather_rows(pred, len(kept))
        sum_tensors(suspects.sums)
        fit = class_fit(pred == labels, labels, self.C) if known else np.full(self.C, np.nan)
        return ScanState(kept, cal, passes, labels, raw, suspects, fit, predicted=pred if known else None,
                         store=store if store is not None and store.complete else None,
                         kept_views=views if views is not None and views.complete else None)

    def _score_batches(self, passes: Passes, train: Dataset, mine: np.ndarray, reuse: Reuse | None,
                       views: Callable[[], bool]) -> Iterator[tuple[slice | torch.Tensor, Batch, torch.Tensor | None]]:
        """``(rows, batch, predicted)`` of the scoring pass over ``mine``: rows as a slice of the model's
        pass, or as row numbers; ``predicted`` where ``batch`` has no logits. The samples ``reuse`` kept come
        from it (counted as ``scan/train (kept)``), after the model's pass over the rest."""
        if reuse is None or reuse.store is None or not len(reuse.indices):
            done = 0
            for b in passes.stream(train, self.layers, mine, "scan/train", host=False, views=views):
                yield slice(done, done + len(b.labels)), b, None
                done += len(b.labels)
            return
        order = np.argsort(reuse.indices, kind="stable")
        src = order[np.minimum(np.searchsorted(reuse.indices[order], mine), len(order) - 1)]
        held = reuse.indices[src] == mine
        rest, again = np.flatnonzero(~held), np.flatnonzero(held)
        done = 0
        for b in passes.stream(train, self.layers, mine[rest], "scan/train", host=False, views=views):
            yield torch.from_numpy(rest[done:done + len(b.labels)]), b, None
            done += len(b.labels)
        passes.count_kept("scan/train", len(again))
        layers, bf16 = range(len(self.layers)), tuple(x.dtype == torch.bfloat16 for x in reuse.store.layers)
        for at in range(0, len(again), self.cfg.batch_size):
            r, s = again[at:at + self.cfg.batch_size], src[again[at:at + self.cfg.batch_size]]
            feats = [f.to(self.extractor.device, non_blocking=True) for f in reuse.store.rows(s, layers)]
            raw = reuse.views.rows(s, range(len(reuse.views.layers))) if reuse.views is not None and views() else None
            yield (torch.from_numpy(r), Batch(mine[r], torch.from_numpy(reuse.labels[s].astype(np.int64)), feats, None,
                                              bf16, raw),
                   None if reuse.predicted is None else torch.from_numpy(reuse.predicted[s].astype(np.int64)))

    def _want_views(self, single: bool) -> bool:
        """Whether a pass computes the images' raw views for the stages that test the images
        (:mod:`guard.inputs`) to keep: with those stages on, on a single process (``single``; ranks score
        shards, and the stages read whole classes)."""
        return single and self.cfg.scan_inputs and self.cfg.critical_rule != "paper"

    def check_classes(self, st: ScanState) -> None:
        """Errors for data the decision cannot judge; a warning for classes too small to act on."""
        present = np.unique(st.labels)
        if len(present) < 2:
            raise GuardError(f"all {len(st.labels)} scanned samples have label {int(present[0])}: the guard judges "
                             "each class against its benign reference and needs data of at least 2 classes; "
                             "check the labels (or label_key) the guard reads")
        counts = np.bincount(st.labels, minlength=self.C)
        few = {int(c): int(counts[c]) for c in present if counts[c] < self.th.min_class}
        st.n_tested = len(present) - len(few)
        if few:
            st.warn(f"classes {few} have fewer than {self.th.min_class} samples in this scan: too few to tell a "
                    "cluster from chance, so they are scored but never acted on; add data or merge such classes")
        foreign = sorted(set(np.unique(st.cal.labels).tolist()) - set(present.tolist()))
        if st.cal.source == "trusted" and foreign:
            raise GuardError(f"the trusted set has classes {foreign} that the training set lacks; it must use "
                             "the training set's label mapping (same classes, same indices)")

    # ---- stage 3: locate --------------------------------------------------------------------
    def locate(self, st: ScanState, prior: dict[int, np.ndarray]) -> None:
        """Per class: out-of-spread flags, the critical layer window, the suspicion score, the paper
        rule's flags and the first step of :func:`decide` (candidates go on to :meth:`confirm`).
        z-scores are made one class at a time: only the 1-byte out-of-spread flags are kept for all N."""
        N = len(st.kept)
        st.out_of_spread = np.zeros(st.raw.shape, dtype=bool)
        st.suspicion = np.zeros(N, dtype=np.float32)
        st.threshold = np.full(N, np.inf, dtype=np.float32)
        st.ref_susp = np.zeros(len(st.cal.labels), dtype=np.float32)
        zb = st.cal.z(st.cal.loo, st.cal.labels)
        for c in np.unique(st.labels):
            self._locate_class(st, int(c), zb[st.cal.labels == c], len(prior.get(int(c), ())))

    def _locate_class(self, st: ScanState, c: int, zb: np.ndarray, n_before: int) -> None:
        th, cal = self.th, st.cal
        rows, ref = np.flatnonzero(st.labels == c), cal.labels == c
        z_c = cal.z(st.raw[rows], st.labels[rows])
        st.out_of_spread[rows] = z_c < -th.out_z
        ex, base = excess_share(z_c, zb, th.out_z)
        win = paper_window(cal.in_sample[ref].mean(0), th.paper_width)
        ref_sum = cal.in_sample[ref][:, win].sum(1)
        paper_bar = ref_sum.mean() - th.paper_k * ref_sum.std()
        p_flag = st.raw[rows][:, win].sum(1) < paper_bar
        st.paper_flagged.append(st.kept[rows[p_flag]])
        window = win if self.cfg.critical_rule == "paper" else guard_layers(ex, th.window)
        li = window[0]
        p_value = binomial_p(float(ex[li]), float(base[li]), len(rows), int(ref.sum()), th)
        st.suspicion[rows] = -z_c[:, window].mean(1)
        st.ref_susp[ref] = -zb[:, window].mean(1)
        st.threshold[rows] = th.out_z
        ref_fit = float("nan") if cal.fit is None else float(cal.fit[c])
        stats = ClassStats(len(rows), float(ex[li]), p_value, cal.source == "trusted", st.n_tested,
                           train_fit=float(st.train_fit[c]), reference_fit=ref_fit)
        verdict, reason = decide(stats, th)
        v = st.classes[c] = ClassReport(
            cls=c, n_scanned=len(rows), verdict=Verdict.CLEAN, critical_layers=[self.layers[i] for i in window],
            excess=float(ex[li]), benign_rate=float(base[li]), p_value=p_value, threshold=th.out_z,
            n_paper_flagged=int(p_flag.sum()), n_quarantined_before=n_before,
            layer_excess=[round(float(e), 4) for e in ex], reason=reason, reference_fit=ref_fit,
            train_fit=float(st.train_fit[c]))
        if self.cfg.critical_rule == "paper":
            v.verdict, v.threshold = (Verdict.PAPER if p_flag.any() else Verdict.CLEAN), float(paper_bar)
            v.reason = f"{int(p_flag.sum())} below the paper rule's bar"
            self._take(st, c, rows[p_flag], -st.raw[rows[p_flag]][:, win].sum(1))
        elif verdict == Verdict.CANDIDATE:
            st.windows[c] = window
        else:
            v.verdict = verdict

    # ---- stage 4: confirm ---------------------------------------------------------------------
    def confirm(self, train: Dataset, st: ScanState) -> None:
        """Candidate classes: a two-centroid discriminant (closer to the suspects' centroid than to the
        benign one), calibrated on the benign reference samples, then a linear probe.

        A screen of at most ``screen_per_class`` samples per candidate decides (:func:`decide`)
        whether the class holds a separate, far-out cluster; on the screen each sample is scored
        against the suspect centroid *without itself*, so scattered benign outliers do not look like
        a cluster of one. For a class that separates, the screen's confident calls seed a
        self-trained LDA probe (:mod:`guard.probe`) that draws the cluster's edge sharply, and a full
        pass scores every sample of the class with it; where the probe cannot be fitted, centroids
        re-estimated from the screen's confident calls score instead."""
        probe_ids = self._probe_layers()
        layer_ids = sorted({i for w in st.windows.values() for i in w} | set(probe_ids))
        names = [self.layers[i] for i in layer_ids]
        at = [layer_ids.index(i) for i in probe_ids]
        cent = Centroids([st.suspects.sums[i] for i in layer_ids], [st.cal.reference.sums[i] for i in layer_ids],
                         {c: np.array([li in w for li in layer_ids]) for c, w in st.windows.items()})
        ref = self._reference_feats(st, st.windows, names)
        screen_rows = self._screen_rows(st, st.windows, 1)
        z_of, ref_z = cent.reference_z(ref, self.th.screen_z, self.th.std_floor)
        cross_fit = st.cal.source == "trusted" and self.th.gate_cross_fit
        keep_at = list(range(len(layer_ids))) if cross_fit else at
        z1, lab1, screen_units, cent = self._screen(train, st, screen_rows, layer_ids, keep_at, cent, z_of)
        gates = self._gates(st, screen_units, lab1, ref, cent.use_of) if cross_fit else {}
        separated = self._decide_screened(st, z1, lab1, ref_z, ref.labels, gates)
        if not separated:
            return
        probe_units = [screen_units[keep_at.index(i)] for i in at]
        class_units = {c: [u[torch.from_numpy(lab1 == c)] for u in probe_units] for c in separated}
        probes = self._fit_probes(st, {c: (class_units[c], z1[lab1 == c]) for c in separated}, ref, at, names)
        rivals = self._rival_images(train, st, {c: (screen_rows[lab1 == c], class_units[c]) for c in probes},
                                    probes, ref)
        separated = [c for c in separated if c not in rivals]
        for c in rivals:
            del probes[c]
        if not separated:
            return
        z = cent.calibration(ref, self.th.screen_z, self.th.std_floor)
        if any(c not in probes for c in separated):
            t_z = z(cent.discriminant(ref.feats, ref.labels, loo=True), ref.labels)
            for c in separated:
                if c not in probes:
                    st.score_reference(c, ref.rows[ref.labels == c], t_z[ref.labels == c])
        rows = st.rows_of(separated)
        z_all, done = np.zeros(len(rows)), 0
        for b in self._read(st, train, rows, layer_ids, "scan/confirm"):
            bl, units = b.labels.numpy(), [unit(f.double()) for f in b.feats]
            z_all[done:done + len(bl)] = z(cent.discriminant(units, bl, normalised=True), bl)
            if probes:
                self._apply_probes(probes, [units[i] for i in at], bl, z_all[done:])
            done += len(bl)
        for c in separated:
            sel = st.labels[rows] == c
            if c in probes:
                self._give_back(st, c, lambda idx, c=c: self._probe_z(train, st, probes[c], layer_ids, at, idx))
            self._flag(st, c, rows[sel], z_all[sel], Verdict.SEPARATE)

    def _screen_rows(self, st: ScanState, classes, stream: int) -> np.ndarray:
        """Sorted rows of a random screen of at most ``screen_per_class`` samples of each of ``classes``
        (drawn from the generator ``(seed, stream)``, one stream per stage)."""
        rng = np.random.default_rng([self.cfg.seed, stream])
        n = self.th.screen_per_class
        return np.sort(np.concatenate([rng.choice(r, min(len(r), n), replace=False)
                                       for r in (np.flatnonzero(st.labels == c) for c in classes)]))

    def _screen(self, train: Dataset, st: ScanState, screen_rows: np.ndarray, layer_ids: list[int],
                keep_at: list[int], cent: Centroids, z: Zscore
                ) -> tuple[np.ndarray, np.ndarray, list[torch.Tensor], Centroids]:
        """The screen's discriminant z (leave-one-out of the suspect centroid; ``z``: the discriminant's
        benign calibration), its labels, its unit features at positions ``keep_at`` of ``layer_ids``,
        and centroids re-estimated from its confident calls."""
        th = self.th
        new = Centroids([torch.zeros_like(x) for x in cent.sus], [x.clone() for x in cent.ben], cent.use_of)
        every = self._read_units(st, train, screen_rows, layer_ids, "scan/screen")
        lab1 = st.labels[screen_rows].astype(np.int64)
        z1 = []
        for at in range(0, len(screen_rows), self.cfg.batch_size):     # the scan's batches: the same sums
            r = slice(at, at + self.cfg.batch_size)
            bl, units = lab1[r], [u[r] for u in every]
            zb = z(cent.discriminant(units, bl, own_suspect=st.out_of_spread[screen_rows[r]][:, layer_ids],
                                     normalised=True), bl)
            hi, lo, bt = torch.from_numpy(zb > th.screen_z), torch.from_numpy(zb < th.benign_z), torch.from_numpy(bl)
            for pos, u in enumerate(units):
                new.sus[pos].index_add_(0, bt[hi], u[hi])
                new.ben[pos].index_add_(0, bt[lo], u[lo])
            z1.append(zb)
        return np.concatenate(z1), lab1, [every[i] for i in keep_at], new

    def _gates(self, st: ScanState, screen_units: list[torch.Tensor], lab1: np.ndarray, ref: RefFeats,
               use_of: dict[int, np.ndarray]) -> dict[int, GateTest]:
        """Each trusted candidate's cross-fitted reference gate (:func:`guard.gate.split_gate`) over
        its window's layers (``screen_units`` and ``ref`` hold every layer the confirm stage reads);
        the halves are drawn from ``(seed, 7, class)``."""
        out = {}
        for c in st.windows:
            pos = np.flatnonzero(use_of[c]).tolist()
            mine = torch.from_numpy(lab1 == c)
            out[c] = split_gate([screen_units[k][mine] for k in pos], ref.units(c, pos),
                                np.random.default_rng([self.cfg.seed, 7, c]), self.th.out_z, self.th.std_floor)
        return out

    def _decide_screened(self, st: ScanState, z1: np.ndarray, lab1: np.ndarray, ref_z: np.ndarray,
                         ref_labels: np.ndarray, gates: dict[int, GateTest]) -> list[int]:
        """The second step of :func:`decide` for every candidate; returns those that separate.
        ``ref_z``: the benign reference samples' discriminant z (leave-one-out); ``gates``: the trusted
        candidates' cross-fitted reference gates (:mod:`guard.gate`); without one (trust-free, or
        ``gate_cross_fit`` off) a class's screen is counted beyond every reference sample
        (:func:`~guard.decide.beyond_reference_p`)."""
        separated = []
        for c in st.windows:
            z = z1[lab1 == c]
            hit = z > self.th.screen_z
            v = st.classes[c]
            v.separation = float(np.median(z[hit])) if hit.any() else 0.0
            v.screen_share = float(hit.mean())
            if c in gates:
                v.beyond_reference, v.beyond_p = gates[c].share, gates[c].p
            else:
                mine = ref_z[ref_labels == c]
                beyond = int((z > mine.max()).sum()) if len(mine) else 0
                v.beyond_reference = beyond / max(len(z), 1)
                v.beyond_p = beyond_reference_p(beyond, len(z), len(mine))
            verdict, v.reason = decide(ClassStats(v.n_scanned, v.excess, v.p_value, st.cal.source == "trusted",
                                                  st.n_tested, v.screen_share, v.separation, v.train_fit,
                                                  v.beyond_p, v.reference_fit), self.th)
            if verdict == Verdict.SEPARATE:
                separated.append(c)
            else:
                v.verdict = verdict
        return separated

    # ---- stage 4b: direction --------------------------------------------------------------------
    def direction(self, train: Dataset, st: ScanState) -> None:
        """Trusted reference only: every class not yet separate (nor unlearned by the model),
        including one that earlier scans took samples from (leftovers), is tested for a main
        direction of variation that puts more of a screen of it beyond every trusted sample than a
        clean class could (:mod:`guard.direction`), at the probe layers and, for image inputs, in
        the two input views (:mod:`guard.inputs`; ``GuardConfig.scan_inputs``). A class that passes
        (:func:`decide`) is separate: the samples beyond seed its probe (:mod:`guard.probe`), fitted
        at the probe layers or, where an input view was the most significant, in that view, and a
        pass over the class scores every sample with it. Where no probe can be fitted the class is
        left at its verdict, with the test in its reason. A class the model has not learned
        (``min_class_fit``) is tested in the input views only: they do not depend on the model."""
        th, chance = self.th, self.th.min_class_fit / max(self.C, 1)
        todo = [c for c, v in st.classes.items()
                if v.verdict != Verdict.SEPARATE and v.n_scanned >= th.min_class
                and (self.cfg.scan_inputs or not v.train_fit < chance)]
        if not todo:
            return
        probe_ids = self._probe_layers()
        names = [self.layers[i] for i in probe_ids]
        rows = self._screen_rows(st, todo, 3)
        learned = [c for c in todo if not st.classes[c].train_fit < chance]
        mrows = rows[np.isin(st.labels[rows], learned)]           # the model's features: learned classes only
        units = self._class_units(st, train, mrows, probe_ids, "scan/direction", torch.float32)
        ref = self._reference_feats(st, todo, names)
        views = self._input_views(train, st, rows, ref) if self.cfg.scan_inputs else None
        st.input_views = views[0] if views is not None else None
        st.layer_names = names + (list(InputViews.names) if views is not None else [])
        n_views = len(names) + (len(InputViews.names) if views is not None else 0)
        bar = th.max_false_alarm / max(st.n_tested, 1)
        at, seeds, in_seeds = list(range(len(names))), {}, {}
        for c in todo:
            v = st.classes[c]
            mine, theirs, offset = [], [], len(names)
            if c in learned:
                mine, theirs, offset = units(c), ref.units(c, at), 0
            if views is not None:
                sel, mask = torch.from_numpy(st.labels[rows] == c), torch.from_numpy(ref.labels == c)
                mine, theirs = mine + [u[sel] for u in views[1]], theirs + [u[mask] for u in views[2]]
            if not mine:
                continue
            test = self._test(mine, theirs, offset, n_views, bar, views is not None)
            if test is None:
                continue
            v.direction_p = test.p
            st.layer_p[c] = {offset + i: p for i, p in enumerate(test.layer_p)}
            verdict, reason = decide(ClassStats(v.n_scanned, v.excess, v.p_value, True, st.n_tested, train_fit=v.train_fit,
                                                direction_p=test.p, direction_share=test.share,
                                                direction_input=test.layer >= len(names)), th)
            if verdict == Verdict.SEPARATE:
                v.reason = f"{reason}, at {(names + list(InputViews.names))[test.layer]}"
                seed = _seed(test, th)
                k = test.layer - offset                                  # its position in mine
                if test.layer >= len(names):
                    in_seeds[c] = (test.layer - len(names), [mine[k].double()], seed, [theirs[k].double()])
                else:
                    seeds[c] = ([u.double() for u in mine[:len(names)]], seed)
        self._take_beyond(train, st, seeds, in_seeds, ref, probe_ids, rows, "scan/direction-confirm")

    def images_across(self, train: Dataset, st: ScanState) -> None:
        """Each class not yet separate: its images, read without the model, are tested against the other
        classes' images (:func:`~guard.direction.across_views`) in both input views (a smooth blend
        shows only in the coarse one), each p doubled for the two views (tripled with ``mirror``, whose
        test of the classes left, :meth:`mirror_images`, shares their bar). Trust-free it is the only
        direction test; with a trusted set it runs after :meth:`direction` (whose coarse-view whitening
        it reuses), since it needs no trusted sample (10-20 trusted a class are too few for the trusted
        tests to act on a 10 % cluster). A class that passes (:func:`decide`) is separate, in the fine
        view where it passes there (the coarse view is the last resort, as in :meth:`direction`): the
        images beyond seed a probe in that view, calibrated on the other classes' images, and every kept
        image of the class is scored with it; with a trusted set, only what lies beyond the class's
        highest trusted image on that probe is taken (:meth:`_bar`)."""
        th = self.th
        todo = {c for c, v in st.classes.items() if v.verdict != Verdict.SEPARATE and v.n_scanned >= th.min_class}
        if not todo:
            return
        rows = self._screen_rows(st, sorted(st.classes), 3)
        raw = self._train_views(st, train, rows)
        if raw is None:
            return
        views = st.input_views = st.input_views or InputViews(raw[1], st.labels[rows])
        labels = st.labels[rows]
        units = views.units(raw)
        bar = th.max_false_alarm / max(st.n_tested, 1)
        if st.cal.source != "trusted":
            st.symmetry = self.training_symmetry(st, train, raw[0], rows)
        shape = self._mirror_shape(st, train, rows)
        probes: dict[int, tuple[int, Probe]] = {}
        tests = len(units) + (shape is not None)        # the mirror test shares the images' bar with the views
        for c, (k, test) in across_views(units, labels, bar, self.cfg.seed, tests).items():
            if c not in todo:
                continue
            v = st.classes[c]
            v.direction_p = test.p
            verdict, reason = decide(ClassStats(v.n_scanned, v.excess, v.p_value, False, st.n_tested,
                                                train_fit=v.train_fit, reference_fit=v.reference_fit,
                                                direction_p=test.p, direction_share=test.share, direction_input=True), th)
            if verdict != Verdict.SEPARATE:
                continue
            v.reason = f"{reason}, at {InputViews.names[k]}"
            seed = _seed(test, th)
            mine = torch.from_numpy(labels == c)
            probe = self_train([units[k][mine].double()], [units[k][~mine].double()], seed, th, rng_seed=self.cfg.seed)
            if probe is None:
                v.reason += ("; no probe could be fitted on the images beyond, so nothing is taken (the next scan "
                             "tests the class again)")
                continue
            probes[c] = st.input_probes[c] = (k, probe)
            v.critical_layers = [InputViews.names[k]]
            if st.cal.source == "trusted":
                self._score_trusted_images(st, c, k, probe, views)
        self._flag_input_probed(train, st, probes, views)
        if shape is not None:
            left = {c for c in todo if st.classes[c].verdict != Verdict.SEPARATE}
            self.mirror_images(train, st, rows, units[0], shape, left, bar, tests)

    def _fine_shape(self, st: ScanState, train: Dataset, rows: np.ndarray) -> tuple[int, int, int] | None:
        """The shape of ``train``'s images as the fine view holds them (from a pass that computed its views, else
        one item read, once per dataset: ``Extractor.view_shapes``); None where its items are not images."""
        shapes = self.extractor.view_shapes
        if id(train) not in shapes:
            shapes[id(train)] = fine_shape(train, int(st.kept[rows[0]]), self.extractor.adapter)
        return shapes[id(train)]

    def trusted_symmetry(self, st: ScanState, train: Dataset) -> Symmetry | None:
        """With ``mirror_images="auto"``, a trusted set and image inputs: whether the trusted images show any class
        unlike its mirror images (:func:`~guard.mirror.symmetry`), read once per trusted set and reported at
        every scan (``ScanReport.mirror_symmetry_p``). None otherwise, and where the trusted images cannot show
        it: not images of the training images' shape, fewer than 4 a class, or read with a random transform (a
        random flip makes any images look symmetric)."""
        if not (self.cfg.mirror_images == "auto" and self.cfg.scan_inputs and st.cal.source == "trusted"
                and len(st.kept)):
            return None
        return self._checked_symmetry(st, id(st.cal.dataset), "trusted", 0.0, lambda: self._trusted_fine(st, train))

    def training_symmetry(self, st: ScanState, train: Dataset, fine: torch.Tensor, rows: np.ndarray
                          ) -> Symmetry | None:
        """Trust-free, with ``mirror_images="auto"``: whether the training images show any class unlike its mirror
        images in most of its images (:func:`~guard.mirror.symmetry` with ``thresholds.mirror_check_trim`` of each
        class set aside, where a poisoned minority would be), read once per training set from the first screen that
        reaches the images (``fine``: the raw fine view of ``rows``), and reported at every scan. None otherwise,
        and where the items are not images or a class has fewer than 4 screened."""
        if self.cfg.mirror_images != "auto":
            return None
        return self._checked_symmetry(st, id(train), "training", self.th.mirror_check_trim,
                                      lambda: (fine, st.labels[rows], self._fine_shape(st, train, rows)))

    def _checked_symmetry(self, st: ScanState, key: int, what: str, trim: float,
                          read: Callable[[], tuple[torch.Tensor, np.ndarray, tuple[int, int, int] | None] | None]
                          ) -> Symmetry | None:
        """:func:`~guard.mirror.symmetry` of the images ``read()`` gives (their raw fine view, labels and image shape;
        None: nothing to read), once per ``key`` (the data set), timed as the scan's step ``symmetry`` and logged."""
        if key not in self._symmetry:
            with _timed(st.seconds, "symmetry"):
                got, sym = read(), None
                if got is not None and got[2] is not None and got[0].shape[1] == int(np.prod(got[2])):
                    sym = symmetry(got[0], got[1], got[2], self.th.mirror_check_max, self.th.mirror_symmetry_p,
                                   self.cfg.seed, trim=trim)
                self._symmetry[key] = sym
            if sym is not None:
                logger.info("the mirror test is {}: the {} images against their mirror images{}, p = {:.3g} (least "
                            "symmetric class {}, {} images a class read; on where p >= {:g})",
                            "on" if sym.holds(self.th.mirror_symmetry_p) else "off", what,
                            f", {trim:.0%} that differ most set aside" if trim else "", sym.p, sym.worst, sym.read,
                            self.th.mirror_symmetry_p)
        return self._symmetry[key]

    def _trusted_fine(self, st: ScanState, train: Dataset
                      ) -> tuple[torch.Tensor, np.ndarray, tuple[int, int, int] | None] | None:
        """The trusted images' raw fine view, labels and the training images' shape, for :meth:`trusted_symmetry`;
        None where the items are not images or the trusted set reads randomly (with a warning)."""
        shape = self._fine_shape(st, train, np.zeros(1, np.int64))
        if shape is None:
            return None
        if self.trusted_random:
            st.warn("the trusted set returns different images for the same index, so whether its classes are "
                    "mirror-symmetric cannot be read: the mirror test stays off (mirror_images=True turns it on)")
            return None
        raw = self._ref_views(st, np.arange(len(st.cal.labels)))
        return None if raw is None else (raw[0], st.cal.labels, shape)

    def _mirror_shape(self, st: ScanState, train: Dataset, rows: np.ndarray) -> tuple[int, int, int] | None:
        """The shape of ``train``'s images where this scan holds the classes against their mirror images, else
        None: ``mirror_images=True``, or ``"auto"`` where :meth:`trusted_symmetry` (trust-free:
        :meth:`training_symmetry`) holds at ``thresholds.mirror_symmetry_p``."""
        asked = self.cfg.mirror_images
        on = (st.symmetry is not None and st.symmetry.holds(self.th.mirror_symmetry_p)) if asked == "auto" else asked
        return self._fine_shape(st, train, rows) if on else None

    def mirror_images(self, train: Dataset, st: ScanState, rows: np.ndarray, fine: torch.Tensor,
                      shape: tuple[int, int, int], todo: set[int], bar: float, tests: int) -> None:
        """Each class in ``todo``: its screened images (``rows``, their unit fine view ``fine``) against
        their own mirror images (:func:`~guard.mirror.mirror_test`), the p multiplied by the ``tests``
        image tests sharing ``bar``. A class below it is separate: every kept image of it
        beyond every mirror image is taken, the screened ones on the direction held out from them, the
        others on both (:meth:`~guard.mirror.MirrorTest.extend`); nothing is fitted on what is taken. What
        that leaves is tested again at the same bar, and taken from likewise, while it passes
        (:func:`~guard.mirror.mirror_steps`)."""
        if fine.shape[1] != int(np.prod(shape)):
            st.warn(f"the fine view has {fine.shape[1]} values a sample but the images are {shape}: "
                    "the mirror test is skipped")
            return
        labels = st.labels[rows]
        caught: dict[int, MirrorSteps] = {}
        for c in sorted(todo):
            mine = torch.from_numpy(labels == c)
            steps = mirror_steps(fine[mine], mirrored(fine[mine], shape), bar / tests, self.cfg.seed)
            if steps is None:
                continue
            v = st.classes[c]
            v.mirror_p = p = min(1.0, steps.first.p * tests)
            if not (steps.steps and v.n_scanned >= self.th.min_class):
                continue
            v.verdict, v.critical_layers = Verdict.SEPARATE, [MIRROR]
            v.reason = (f"{steps.first.share:.0%} of the class's images lie beyond every one of their own mirror "
                        f"images along their main direction of variation (p={p:.2g} < {bar:.2g})"
                        + (f"; {len(steps.steps)} directions in turn, each on what the ones before left"
                           if len(steps.steps) > 1 else ""))
            caught[c] = steps
        if not caught:
            return
        if len(caught) >= max(2, st.n_tested / 2):
            st.warn(f"the mirror test acted on {len(caught)} of {st.n_tested} classes ({sorted(caught)}): a trigger "
                    "planted in every class (all-to-all, or an attack's cover images), or a mark at one place that your "
                    "data carry in many classes (a watermark, a logo), which it cannot tell apart; what it takes is "
                    "quarantined, not deleted: look at it (report.to_pandas()), restore it (GuardedDataset.restore) "
                    "if it is clean, and pass mirror_images=False if your data carry such a mark")
        every = st.rows_of(caught)
        units = unit(self._train_views(st, train, every)[0])
        for c, steps in caught.items():
            at = np.flatnonzero(st.labels[every] == c)
            sel = every[at]
            beyond, z = steps.over(units[torch.from_numpy(at)], np.searchsorted(sel, rows[labels == c]))
            st.suspicion[sel], st.threshold[sel] = z, 0.0
            st.classes[c].threshold = 0.0
            self._take(st, c, sel[beyond], z[beyond])

    def _score_trusted_images(self, st: ScanState, c: int, k: int, probe: Probe, views: InputViews) -> None:
        """Class ``c``'s trusted images on its probe in input view ``k`` (a probe fitted against the other
        classes' training images, so the trusted images never entered it), so that the catch takes only
        beyond the highest of them (:meth:`_bar`). The view is read without the model, so the class's
        benign training images and its trusted ones are alike there and the bound is exact, not
        loosened by what training did to the training samples."""
        ref_rows = np.flatnonzero(st.cal.labels == c)
        theirs = self._ref_views(st, ref_rows) if len(ref_rows) else None
        if theirs is not None:
            st.score_reference(c, ref_rows, probe.z([views.units(theirs)[k].double()]))

    def _test(self, mine: list[torch.Tensor], theirs: list[torch.Tensor], offset: int, total: int, bar: float,
              inputs: bool) -> DirectionTest | None:
        """:func:`~guard.direction.direction_test` over ``mine`` (views ``offset`` on of ``total``), its p
        corrected for all ``total`` and its layer counted among them. With the input views (``inputs``)
        the coarse one, last, is the last resort: where the test without it is below ``bar`` too, that
        result stands, since a probe in the coarse view takes more benign look-alikes (:mod:`guard.inputs`)."""
        projections = project(mine, theirs, self.cfg.seed)     # the finer test below reads the same layers
        if projections is None:
            return None

        def run(k: int) -> DirectionTest:
            r = most_significant(projections[:k], len(theirs[0]))
            return replace(r, p=min(1.0, r.p * total / k), layer=r.layer + offset)

        test = run(len(mine))
        if inputs and len(mine) > 1 and test.layer == offset + len(mine) - 1:
            finer = run(len(mine) - 1)
            if finer.p < bar:
                return replace(finer, layer_p=test.layer_p)
        return test

    def _views(self, st: ScanState, dataset: Dataset, positions: np.ndarray) -> list[torch.Tensor] | None:
        """:func:`~guard.inputs.read_views` of ``dataset[positions]``; the stages that read the same
        samples of the same dataset in a row (a clean scan's direction and image stages read one screen)
        share one read: the last read of each dataset is kept until the scan ends."""
        last = st.last_views.get(id(dataset))
        if last is not None and np.array_equal(last[0], positions):
            return last[1]
        ex = self.extractor
        raw = read_views(dataset, positions, ex.adapter, ex.batch_size, ex.num_workers)
        st.last_views[id(dataset)] = (np.array(positions, copy=True), raw)
        return raw

    def _train_views(self, st: ScanState, train: Dataset, rows: np.ndarray) -> list[torch.Tensor] | None:
        """The raw input views of the kept samples at ``rows``: from the scoring pass where it kept them
        (``ScanState.kept_views``), else read again (:meth:`_views`)."""
        if st.kept_views is not None:
            return st.kept_views.rows(rows, range(len(st.kept_views.layers)))
        return self._views(st, train, st.kept[rows])

    def _ref_views(self, st: ScanState, ref_rows: np.ndarray) -> list[torch.Tensor] | None:
        """The raw input views of the reference samples at ``ref_rows``: from the calibration pass where
        it kept them (``Calibration.views``), else read again (:meth:`_views`)."""
        if st.cal.views is not None:
            idx = torch.from_numpy(np.asarray(ref_rows, dtype=np.int64))
            return [v[idx] for v in st.cal.views]
        return self._views(st, st.cal.dataset, st.cal.positions(ref_rows))

    def _input_views(self, train: Dataset, st: ScanState, rows: np.ndarray,
                     ref: RefFeats) -> tuple[InputViews, list[torch.Tensor], list[torch.Tensor]] | None:
        """The input views (:mod:`guard.inputs`), fitted on the screen ``rows``, and the unit features
        of the screen and of the reference samples ``ref.rows`` in each (read without the model, so
        not a pass: its time is part of ``analysis``); None where the inputs are not images."""
        mine = self._train_views(st, train, rows)
        if mine is None:
            return None
        theirs = self._ref_views(st, ref.rows)
        if theirs is None:
            return None
        views = InputViews(mine[1], st.labels[rows])
        return views, views.units(mine), views.units(theirs)

    def _rival_images(self, train: Dataset, st: ScanState, screens: dict[int, tuple[np.ndarray, list[torch.Tensor]]],
                      probes: dict[int, Probe], ref: RefFeats) -> set[int]:
        """First catches whose probe was fitted at the layers (``probes``; ``screens``: per class, the rows of
        the screen it was fitted on and their unit features at its layers), with a trusted set and image
        inputs (``Thresholds.images_rival``): the class's screen is also tested in the images' fine view
        (:mod:`guard.inputs`) against its trusted images, by the direction stage's test and bar. Where it
        passes, a probe is fitted there too, and the samples both probes put beyond their bars (each the
        class's highest trusted sample on that probe, at least ``flag_z``) are the catch they agree on. The
        class is taken with the fine view's probe where that catch's median lies further beyond its bar, in
        that probe's trusted standard deviations, than at the layers. Why: which layers a probe reads, and
        so how far its trusted samples reach, is chosen with the trusted samples (the cluster rule, the
        layers' direction test, the probe's own layer choice), and 50 of them can happen to sit tight
        there; the fine view is one view, chosen by nothing, so its highest trusted image bounds the
        benign share it takes (:meth:`_bar`). Returns the classes taken in the images (flagged here)."""
        th, won = self.th, {}
        if not (th.images_rival and self.cfg.scan_inputs and st.cal.source == "trusted"):
            return set()
        bar = th.max_false_alarm / max(st.n_tested, 1)
        for c, (rows, layer_units) in screens.items():
            if st.classes[c].n_quarantined_before:
                continue
            ref_rows = ref.rows[ref.labels == c]
            mine, theirs = self._train_views(st, train, rows), self._ref_views(st, ref_rows)
            if mine is None or theirs is None:
                break                                            # not images
            m, t = unit(mine[0]).double(), unit(theirs[0]).double()
            test = self._test([m], [t], 0, 1, bar, False)
            if test is None or test.p >= bar:
                continue
            seed = _seed(test, th)
            probe = self_train([m], [t], seed, th, rng_seed=self.cfg.seed)
            if probe is None:
                continue
            z_layers, z_images, ref_images = probes[c].z(layer_units), probe.z([m]), probe.z([t])
            bar_layers = self._bar(st, c, True)                  # the reference is scored on the layers' probe
            bar_images = self._bar(st, c, True, ref_images)
            both = (z_layers > bar_layers) & (z_images > bar_images)
            if both.sum() < th.probe_min_side:
                continue
            gap_layers = float(np.median(z_layers[both])) - bar_layers
            gap_images = float(np.median(z_images[both])) - bar_images
            if gap_images > gap_layers:
                won[c] = probe
                del st.probes[c]
                st.score_reference(c, ref_rows, ref_images)
                st.classes[c].reason += (f"; taken in the images' fine view, where the {int(both.sum())} screened "
                                         f"samples both probes put beyond their trusted samples lie further out "
                                         f"(median {gap_images:.1f} above its bar, against {gap_layers:.1f} at the "
                                         "layers)")
        if won:
            self._flag_input_probed(train, st, {c: (0, p) for c, p in won.items()}, st.input_views)
            for c, p in won.items():
                st.input_probes[c] = (0, p)
                st.classes[c].critical_layers = [InputViews.names[0]]
        return set(won)

    def _fit_input_probes(self, st: ScanState, seeds: dict[int, tuple], ref: RefFeats) -> dict[int, tuple[int, Probe]]:
        """Per class, a probe self-trained on its screen in the input view ``k`` where the direction
        test was most significant, calibrated on its reference samples' (:meth:`_fit_probes` in that
        view; a probe over both views takes more benign look-alikes); class -> (k, probe)."""
        probes: dict[int, tuple[int, Probe]] = {}
        for c, (k, screen, seed, benign) in seeds.items():
            probe = self_train(screen, benign, seed, self.th, rng_seed=self.cfg.seed)
            if probe is not None:
                probes[c] = st.input_probes[c] = (k, probe)
                st.classes[c].critical_layers = [InputViews.names[k]]
                st.score_reference(c, ref.rows[ref.labels == c], probe.z(benign))
        return probes

    def _flag_input_probed(self, train: Dataset, st: ScanState, probes: dict[int, tuple[int, Probe]],
                           views: InputViews | None) -> None:
        """Score every kept sample of the ``probes``' classes in its probe's input view and flag them
        as separate. ``views``: the scan's input views; None where every probe is in the fine view, the
        one that is not fitted to the scan."""
        if not probes:
            return
        ex = self.extractor
        rows = st.rows_of(probes)
        labels, z_all = st.labels[rows], np.zeros(len(rows))
        for c, (k, probe) in probes.items():
            mine = np.flatnonzero(labels == c)
            raw = self._train_views(st, train, rows[mine])
            for part in _blocks(len(mine)):
                z_all[mine[part]] = probe.z([_view_unit(views, [v[part] for v in raw], k).double()])
        for c, (k, probe) in probes.items():
            sel = labels == c
            self._give_back(st, c, lambda idx, k=k, probe=probe: probe.z(
                [_view_unit(views, read_views(train, idx, ex.adapter, ex.batch_size, ex.num_workers), k).double()]))
            self._flag(st, c, rows[sel], z_all[sel], Verdict.SEPARATE)

    # ---- stage 5: follow up --------------------------------------------------------------------
    def still_taught(self, train: Dataset, st: ScanState, follow: dict[int, np.ndarray],
                     check: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """The classes of ``follow`` worth a follow-up: poison left behind keeps teaching the model what
        the quarantined samples carry, so the model predicts held-out quarantined samples (``check``,
        never unlearned on) as their label more often than chance explains: more often than it predicts
        that label for the reference samples of other classes, by the unlearning's start test (binomial
        p below ``max_false_alarm``; :func:`~guard.remedy.not_taught`). Where it does not, nothing left
        behind is shown to teach the trigger and a follow-up could only take look-alikes from the benign
        tail. (A trigger the model learned in the warm-up and forgets slowly passes too: the check
        reads what the model knows, not what teaches it.) A class none of whose quarantined
        samples is held out (the check set is drawn from the more suspicious half of the whole
        quarantine, so a class caught with lower scores than another can hold none) shows no such
        evidence either: its follow-up probe is still fitted, since :meth:`elsewhere` holds the other
        classes against it, but it takes nothing (``ScanState.probe_only``). Without a check set at all,
        or a model without class scores, every class is followed up."""
        from guard.remedy import chance_fit, not_taught

        ref_pred, ref_lab = st.cal.predicted, st.cal.labels
        if ref_pred is None or not any(len(v) for v in check.values()):
            return follow
        todo = {c: np.sort(check[c]) for c in follow if len(check.get(c, ()))}
        idx = np.concatenate(list(todo.values())) if todo else np.empty(0, np.int64)
        order = np.argsort(idx, kind="stable")
        pred = np.empty(len(idx), np.int64)
        done = 0
        for b in st.passes.stream(train, [self.layers[-1]], idx[order], "scan/check"):
            if b.logits is None or not is_logits(b.logits, self.C):
                return follow
            pred[order[done:done + len(b.labels)]] = b.logits.argmax(1).numpy()
            done += len(b.labels)
        out = dict(follow)
        for c in follow:
            if c not in todo:
                st.probe_only.add(c)
                st.classes[c].reason += ("; its look-alikes are not taken: none of its quarantined samples is held "
                                         "out to show whether what they carry is still taught (its follow-up probe "
                                         "is fitted for the other classes only)")
        at = 0
        for c, rows in todo.items():
            fitted = int((pred[at:at + len(rows)] == c).sum())
            at += len(rows)
            why_not = not_taught(fitted, len(rows), chance_fit(ref_pred, ref_lab, np.array([c])), self.th)
            if why_not:
                del out[c]
                st.classes[c].reason += f"; not followed up: {why_not}"
        return out

    def follow_up(self, train: Dataset, st: ScanState, follow: dict[int, np.ndarray]) -> None:
        """Classes that already hold quarantined samples: poison left behind shares the trigger of the
        quarantined samples, so they are its labelled examples. A probe is fitted with (a sample of)
        them as the suspect side and a screen of the class's kept samples as the benign side, then
        refitted on its own out-of-fold calls (:func:`~guard.probe.self_train`), so leftovers in the
        screen move to the suspect side. This finds leftovers that no longer leave the benign spread
        by themselves. Where no probe can be fitted, :meth:`_follow_centroid` takes over."""
        probe_ids = self._probe_layers()
        names = [self.layers[i] for i in probe_ids]
        screens = self._follow_screens(train, st, follow, probe_ids)
        ref = self._reference_feats(st, follow, names)
        if self.th.follow_held_out and st.cal.source == "trusted":
            screens = self._held_out_follow(st, screens, ref, len(names))
            follow = {c: follow[c] for c in screens}
        probes = self._fit_probes(st, screens, ref, list(range(len(names))), names)
        follow = {c: q for c, q in follow.items() if c not in st.probe_only}
        if len(probes) < len(follow):
            self._follow_centroid(train, st, {c: follow[c] for c in follow if c not in probes})
        self._flag_probed(train, st, {c: p for c, p in probes.items() if c in follow}, probe_ids, "scan/follow-up",
                          Verdict.LIKE_QUARANTINED)

    def _held_out_follow(self, st: ScanState, screens: dict[int, tuple[list[torch.Tensor], np.ndarray]],
                         ref: RefFeats, n_layers: int) -> dict[int, tuple[list[torch.Tensor], np.ndarray]]:
        """The follow-up screens of the classes whose kept samples, on a probe fitted without them, put
        more beyond every trusted sample than a clean class does (:func:`~guard.gate.split_follow`, below
        ``max_false_alarm / classes``); the others are not followed up, and their reason says so."""
        bar = self.th.max_false_alarm / max(st.n_tested, 1)
        out = {}
        for c, (units, seed) in screens.items():
            test = split_follow(units, seed, ref.units(c, list(range(n_layers))), self.th,
                                np.random.default_rng([self.cfg.seed, 8, c]), rng_seed=self.cfg.seed)
            if test.p < bar:
                out[c] = (units, seed)
            else:
                st.classes[c].reason += (f"; not followed up: on a probe fitted without them, {test.share:.1%} of half "
                                         f"its kept screen lies beyond every one of its {test.n_held} trusted samples, "
                                         f"no more than a clean class puts there (p = {test.p:.2g}, bar {bar:.2g})")
        return out

    def elsewhere(self, train: Dataset, st: ScanState) -> None:
        """Trusted reference only: every class this scan did not act on is held against the probes of
        this scan's catches and follow-ups (:mod:`guard.elsewhere`): the model's (classes the model has
        learned) and each input view's (any class), the catches of each averaged into one direction, the
        p-value corrected for the directions tried. A class with more of a screen of it beyond every
        one of its trusted samples along one of them than a clean class could (:func:`decide`) is
        separate: the samples beyond seed its own probe there, and a pass over the class scores every
        sample with it."""
        th, chance = self.th, self.th.min_class_fit / max(self.C, 1)
        todo = [c for c, v in st.classes.items() if v.verdict not in _ACTED and v.n_scanned >= th.min_class
                and c not in st.probes and c not in st.input_probes]
        if not todo:
            return
        probe_ids = self._probe_layers()
        names = [self.layers[i] for i in probe_ids]
        at = list(range(len(names)))
        rows = self._screen_rows(st, todo, 5)
        ref = self._reference_feats(st, todo, names)
        learned = [c for c in todo if not st.classes[c].train_fit < chance]
        # per family: its name, class -> the screen's unit features of the class, the trusted ones, its probes
        families: list[tuple[str, Callable[[int], list[torch.Tensor]], list[torch.Tensor], dict[int, Probe]]] = []
        if st.probes and learned:
            units = self._class_units(st, train, rows[np.isin(st.labels[rows], learned)], probe_ids, "scan/elsewhere")
            families.append(("model", units, [unit(ref.feats[i].double()) for i in at], st.probes))
        views = self._elsewhere_views(train, st, rows, ref)
        for k, (mine_k, theirs_k) in enumerate(views):
            sources = {c: p for c, (view, p) in st.input_probes.items() if view == k}
            if sources:
                families.append((InputViews.names[k],
                                 lambda c, u=mine_k.double(): [u[torch.from_numpy(st.labels[rows] == c)]],
                                 [theirs_k.double()], sources))
        seeds, in_seeds = {}, {}
        for c in todo:
            tests = []
            for fam, mine, theirs, sources in families:
                if fam == "model" and c not in learned:
                    continue
                mask = torch.from_numpy(ref.labels == c)
                m, t = mine(c), [u[mask] for u in theirs]
                test = along_catches(m, t, {s: p for s, p in sources.items() if s != c})
                if test is not None:
                    tests.append((test.p, fam, test, m, t))
            if not tests:
                continue
            p, fam, test, m, t = min(tests, key=lambda x: x[0])
            p = min(1.0, p * len(tests))
            v = st.classes[c]
            v.caught_p = p
            verdict, reason = decide(ClassStats(v.n_scanned, v.excess, v.p_value, True, st.n_tested,
                                                train_fit=v.train_fit, caught_p=p, caught_share=test.share,
                                                caught_from=tuple(test.sources)), th)
            if verdict != Verdict.SEPARATE:
                continue
            v.reason = reason if fam == "model" else f"{reason}, at {fam}"
            seed = _seed(test, th)
            if fam == "model":
                seeds[c] = (m, seed)
            else:
                in_seeds[c] = (InputViews.names.index(fam), m, seed, t)
        self._take_beyond(train, st, seeds, in_seeds, ref, probe_ids, rows, "scan/elsewhere-confirm")

    def _take_beyond(self, train: Dataset, st: ScanState, seeds: dict, in_seeds: dict, ref: RefFeats,
                     probe_ids: list[int], rows: np.ndarray, desc: str) -> None:
        """Classes found separate by a count beyond every trusted sample: a probe seeded with the samples
        beyond, at the probe layers (``seeds``) or in an input view (``in_seeds``, read in the direction
        stage's views), scores every sample of its class (pass ``desc``) and the class is flagged. ``rows``:
        the screen the seeds were drawn on (a class's seed is its rows of it, in order)."""
        names = [self.layers[i] for i in probe_ids]
        probes = self._fit_probes(st, seeds, ref, list(range(len(names))), names)
        for c in self._rival_images(train, st, {c: (rows[st.labels[rows] == c], seeds[c][0]) for c in probes},
                                    probes, ref):
            del probes[c]
        in_probes = self._fit_input_probes(st, in_seeds, ref)
        for c in (*seeds, *in_seeds):
            if c not in probes and c not in in_probes:
                st.classes[c].reason += ("; no probe could be fitted on the samples beyond, so nothing is taken "
                                         "(the next scan tests the class again)")
        self._flag_probed(train, st, probes, probe_ids, desc, Verdict.SEPARATE)
        if in_probes:
            self._flag_input_probed(train, st, in_probes, st.input_views)

    def _elsewhere_views(self, train: Dataset, st: ScanState, rows: np.ndarray,
                         ref: RefFeats) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The screen's and the reference's unit features in both input views, read when a catch was made
        in one, through the direction stage's views (its coarse view's whitening, which the catches'
        probes were fitted in); empty otherwise."""
        wanted = {k for k, _ in st.input_probes.values()}
        if not wanted or st.input_views is None:
            return []
        mine = self._train_views(st, train, rows)
        theirs = self._ref_views(st, ref.rows)
        if mine is None or theirs is None:
            return []
        mu, tu = st.input_views.units(mine), st.input_views.units(theirs)
        return [(mu[k], tu[k]) for k in range(len(mu))]

    def _follow_screens(self, train: Dataset, st: ScanState, follow: dict[int, np.ndarray],
                        layer_ids: list[int]) -> dict[int, tuple[list[torch.Tensor], np.ndarray]]:
        """Per class: unit features of (a sample of) its quarantined samples then of a screen of its kept
        ones, and the probe's seed: certain suspects (above ``screen_z``) and benign (0). The
        quarantined samples are not in the scan: a model pass reads them."""
        n = self.th.screen_per_class
        rng = np.random.default_rng([self.cfg.seed, 2])
        q_take = {c: np.sort(rng.choice(q, min(len(q), n), replace=False)) for c, q in follow.items()}
        s_take = {c: np.sort(rng.choice(np.flatnonzero(st.labels == c), min(int((st.labels == c).sum()), n),
                                        replace=False)) for c in follow}
        names = [self.layers[i] for i in layer_ids]
        q_units = _units(st.passes.stream(train, names, np.concatenate(list(q_take.values())), "scan/quarantined",
                                          stop_early=True), len(names))
        s_units = self._read_units(st, train, np.concatenate(list(s_take.values())), layer_ids, "scan/follow-screen")
        screens, q0, s0 = {}, 0, 0
        for c in follow:
            nq, ns = len(q_take[c]), len(s_take[c])
            units = [torch.cat([q[q0:q0 + nq], k[s0:s0 + ns]]) for q, k in zip(q_units, s_units)]
            q0, s0 = q0 + nq, s0 + ns
            screens[c] = (units, np.concatenate([np.full(nq, self.th.screen_z + 1.0), np.zeros(ns)]))
        return screens

    def _follow_centroid(self, train: Dataset, st: ScanState, follow: dict[int, np.ndarray]) -> None:
        """Fall-back of the follow-up: the quarantined samples, seen through the current model, are the
        suspect centroid of a two-centroid discriminant over the layers where they sit furthest below
        the benign spread."""
        cal, th = st.cal, self.th
        q_sums = Reference([s.shape[1] for s in cal.reference.sums], self.C)
        q_z: dict[int, list[np.ndarray]] = {c: [] for c in follow}
        q_idx = np.sort(np.concatenate(list(follow.values())))
        for b in st.passes.stream(train, self.layers, q_idx, "scan/quarantined-centroid"):
            q_sums.update(b.feats, b.labels)
            lab = b.labels.numpy()
            z = cal.z(cal.reference.score(b.feats, b.labels).numpy(), lab)
            for c in follow:
                q_z[c].append(z[lab == c])
        windows = {c: [int(i) for i in np.argsort(np.concatenate(q_z[c]).mean(0), kind="stable")[:th.window]]
                   for c in follow}
        layer_ids = sorted({i for w in windows.values() for i in w})
        names = [self.layers[i] for i in layer_ids]
        cent = Centroids([q_sums.sums[i] for i in layer_ids], [cal.reference.sums[i] for i in layer_ids],
                         {c: np.array([li in windows[c] for li in layer_ids]) for c in follow})
        ref = self._reference_feats(st, follow, names)
        t_d = cent.discriminant(ref.feats, ref.labels, loo=True)
        rows = st.rows_of(follow)
        d, done = np.zeros(len(rows)), 0
        for b in self._read(st, train, rows, layer_ids, "scan/follow-up-centroid"):
            d[done:done + len(b.labels)] = cent.discriminant(b.feats, b.labels.numpy())
            done += len(b.labels)
        for c in follow:
            tc, sel = t_d[ref.labels == c], st.labels[rows] == c
            st.classes[c].critical_layers = [self.layers[i] for i in windows[c]]
            sd = max(tc.std(), th.std_floor)
            st.score_reference(c, ref.rows[ref.labels == c], (tc - tc.mean()) / sd)
            self._flag(st, c, rows[sel], (d[sel] - tc.mean()) / sd, Verdict.LIKE_QUARANTINED)

    # ---- shared steps --------------------------------------------------------------------------
    def _read(self, st: ScanState, train: Dataset, rows: np.ndarray, layer_ids: list[int], desc: str) -> Iterator[Batch]:
        """Batches of the kept samples at ``rows`` (sorted) with their features at ``layer_ids``: read
        from the scoring pass's kept features where it could keep them (counted as ``desc (kept)``),
        else a model pass cut short after those layers."""
        if st.store is None:
            yield from st.passes.stream(train, [self.layers[i] for i in layer_ids], st.kept[rows], desc,
                                        stop_early=True)
            return
        st.passes.count_kept(desc, len(rows))
        for at in range(0, len(rows), self.cfg.batch_size):
            r = rows[at:at + self.cfg.batch_size]
            yield Batch(st.kept[r], torch.from_numpy(st.labels[r].astype(np.int64)), st.store.rows(r, layer_ids), None)

    def _read_units(self, st: ScanState, train: Dataset, rows: np.ndarray, layer_ids: list[int], desc: str,
                    dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
        """:func:`_units` of :meth:`_read`: the unit features (``dtype``) of the kept samples at ``rows``
        (sorted) at ``layer_ids``, gathered from the kept features in one step per layer where the
        scoring pass kept them (the same values: rows are normalised one by one), else by a pass."""
        if st.store is None:
            return _units(self._read(st, train, rows, layer_ids, desc), len(layer_ids), dtype)
        st.passes.count_kept(desc, len(rows))
        return [unit_(f) for f in st.store.rows(rows, layer_ids, dtype)]   # rows() returns fresh copies

    def _class_units(self, st: ScanState, train: Dataset, rows: np.ndarray, layer_ids: list[int], desc: str,
                     dtype: torch.dtype = torch.float64) -> Callable[[int], list[torch.Tensor]]:
        """Class ``c`` -> :meth:`_read_units` of its samples among ``rows`` (sorted): read class by class
        from the kept features (no array of every class's rows in ``dtype``), or all at once by a pass."""
        if st.store is not None:
            return lambda c: self._read_units(st, train, rows[st.labels[rows] == c], layer_ids, desc, dtype)
        every = self._read_units(st, train, rows, layer_ids, desc, dtype) if len(rows) else []
        return lambda c: [u[torch.from_numpy(st.labels[rows] == c)] for u in every]

    def _probe_layers(self) -> list[int]:
        """Layers the linear probe may use: all but the first (input-like) and the last (logits,
        too few dimensions to carry a trigger direction apart from the label); all of them when
        fewer than 4 are analysed (dropping two would leave too few to choose from)."""
        n = len(self.layers)
        return list(range(1, n - 1)) if n >= 4 else list(range(n))

    def _reference_feats(self, st: ScanState, classes, names: list[str]) -> RefFeats:
        """Features at ``names`` of the benign reference samples of ``classes``: the kept ones, or a
        partial pass over the reference set where calibration could not keep them."""
        tb = np.flatnonzero(np.isin(st.cal.labels, list(classes)))
        if st.cal.feats is not None:
            rows = torch.from_numpy(tb)
            return RefFeats([st.cal.feats[self.layers.index(n)][rows] for n in names], st.cal.labels[tb], tb)
        chunks = list(st.passes.stream(st.cal.dataset, names, st.cal.positions(tb), "scan/reference-layers",
                                       stop_early=True))
        return RefFeats([torch.cat([b.feats[i] for b in chunks]) for i in range(len(names))], st.cal.labels[tb], tb)

    def _fit_probes(self, st: ScanState, screens: dict[int, tuple[list[torch.Tensor], np.ndarray]], ref: RefFeats,
                    at: list[int], names: list[str]) -> dict[int, Probe]:
        """Per class, a probe self-trained on its screen (unit features at the probe layers, seed z),
        calibrated on the class's reference features at positions ``at``; a class whose probe cannot
        be fitted is left out. Sets the class's critical layers and the reference samples' suspicion."""
        probes: dict[int, Probe] = {}
        for c, (units, seed) in screens.items():
            t_units = ref.units(c, at)
            probe = self_train(units, t_units, seed, self.th, rng_seed=self.cfg.seed)
            if probe is not None:
                probes[c] = st.probes[c] = probe
                st.classes[c].critical_layers = [names[at[k]] for k in probe.layers]
                st.score_reference(c, ref.rows[ref.labels == c], probe.z(t_units))
        return probes

    @staticmethod
    def _apply_probes(probes: dict[int, Probe], units: list[torch.Tensor], labels: np.ndarray,
                      out: np.ndarray) -> None:
        """Write each class's probe z for a batch (``units``: its unit features per probe layer) into
        ``out`` (a view starting at the batch's first row)."""
        for c, probe in probes.items():
            m = np.flatnonzero(labels == c)
            if len(m):
                out[m] = probe.z([u[torch.from_numpy(m)] for u in units])

    def _flag_probed(self, train: Dataset, st: ScanState, probes: dict[int, Probe], probe_ids: list[int], desc: str,
                     verdict: Verdict) -> None:
        """Score every sample of the ``probes``' classes with its class's probe (one read at the probe
        layers) and flag them as ``verdict``."""
        if not probes:
            return
        rows = st.rows_of(probes)
        z_all, done = np.zeros(len(rows)), 0
        for b in self._read(st, train, rows, probe_ids, desc):
            bl = b.labels.numpy()
            self._apply_probes(probes, [unit(f.double()) for f in b.feats], bl, z_all[done:])
            done += len(bl)
        for c in probes:
            sel = st.labels[rows] == c
            if verdict == Verdict.SEPARATE:
                at = list(range(len(probe_ids)))
                self._give_back(st, c, lambda idx, c=c: self._probe_z(train, st, probes[c], probe_ids, at, idx))
            self._flag(st, c, rows[sel], z_all[sel], verdict)

    def _probe_z(self, train: Dataset, st: ScanState, probe: Probe, layer_ids: list[int], at: list[int],
                 idx: np.ndarray) -> np.ndarray:
        """``probe``'s z of the samples ``idx`` (not kept ones: one pass cut short after ``layer_ids``,
        the probe reading positions ``at`` of them)."""
        out = [probe.z([unit(b.feats[i].double()) for i in at])
               for b in st.passes.stream(train, [self.layers[i] for i in layer_ids], idx, "scan/give-back",
                                         stop_early=True)]
        return np.concatenate(out) if out else np.empty(0)

    def _give_back(self, st: ScanState, c: int, score) -> None:
        """Class ``c`` is separate again: its releasable quarantined samples, scored by this scan's
        probe (``score(indices) -> z``), go back where :func:`~guard.decide.give_back` says so."""
        idx = st.releasable.get(c)
        if idx is None or not self.th.give_back:
            return
        back = give_back(score(idx), self.th)
        if back.any():
            st.released.append(idx[back])
            v = st.classes[c]
            v.n_released = int(back.sum())
            v.reason += (f"; {v.n_released} of its {len(idx)} earlier-quarantined samples given back (below "
                         f"flag_z={self.th.flag_z} on this probe, which puts most of them above follow_z)")

    def _bar(self, st: ScanState, c: int, first: bool, ref: np.ndarray | None = None) -> float:
        """What a catch of class ``c`` takes above: a first catch ``flag_z``, a catch in a class that
        already holds quarantined samples (a follow-up, or the class found separate again) ``follow_z``;
        with a trusted set (``flag_beyond_trusted``, ``follow_beyond_trusted``), the class's highest
        trusted sample on the same score where that is higher. A clean training sample exchangeable with
        the class's ``n`` trusted ones lies beyond all of them with probability at most ``1 / (n + 1)``,
        whatever the score's distribution: the share of the class's benign samples taken is bounded by
        the data, not by a z that assumes a bell curve (a trained class's benign tail reaches past a fixed
        z where its trusted samples do too). Trust-free, and where the class's reference was not scored by
        the flagging probe, the fixed z. ``ref``: the class's
        trusted samples on a score their reference does not hold (yet), in place of the reference's."""
        z, bound = ((self.th.flag_z, self.th.flag_beyond_trusted) if first
                    else (self.th.follow_z, self.th.follow_beyond_trusted))
        if not bound:
            return z
        if ref is not None:
            return max(z, float(ref.max())) if len(ref) else z
        return self._beyond_trusted(st, c, z)

    @staticmethod
    def _beyond_trusted(st: ScanState, c: int, bar: float) -> float:
        """``bar``, or class ``c``'s highest trusted sample on the score flagging it in this scan where
        higher (trusted reference only, and only where the reference was scored on that score)."""
        if st.cal.source == "trusted" and c in st.ref_scored:
            ref = st.ref_susp[st.cal.labels == c]
            if len(ref):
                bar = max(bar, float(ref.max()))
        return bar

    def _flag(self, st: ScanState, c: int, rows: np.ndarray, z: np.ndarray, verdict: Verdict) -> None:
        """A confirmed class: its samples' suspicion is ``z``, held to ``flag_z`` or above the class's
        highest trusted sample (:meth:`_bar`: a separate cluster in a class with nothing quarantined yet), or
        to the stricter ``follow_z`` or above that sample (in a class with quarantined samples, by either
        route: what a catch left is few, benign samples many); with ``flag_split``, to where ``z`` splits in two
        (:func:`~guard.decide.flag_cut`) if higher."""
        first = verdict == Verdict.SEPARATE and st.classes[c].n_quarantined_before == 0
        floor = self._bar(st, c, first)
        bar = flag_cut(z, floor) if self.th.flag_split else floor
        st.suspicion[rows], st.threshold[rows] = z, bar
        st.classes[c].verdict, st.classes[c].threshold = verdict, bar
        hit = z > bar
        if verdict == Verdict.LIKE_QUARANTINED:
            below = (f"follow_z={floor}" if floor == self.th.follow_z
                     else f"{floor:.2f}, the class's highest trusted sample; follow_z={self.th.follow_z}")
            where = below if bar == floor else f"{bar:.2f}, where the class's scores split in two; {below}"
            st.classes[c].reason = f"{int(hit.sum())} samples like the quarantined ones (z above {where})"
        self._take(st, c, rows[hit], z[hit])

    def _take(self, st: ScanState, c: int, rows: np.ndarray, susp: np.ndarray) -> None:
        """Flag the kept samples ``rows`` of class ``c`` (``susp``: their suspicion) under the per-class cap
        (:func:`~guard.decide.take`). Where the class was already taken from in this scan, what was taken counts
        towards the cap as quarantined before, is not taken twice, and ``n_flagged`` counts both."""
        v = st.classes[c]
        idx = st.kept[rows]
        if v.n_flagged:
            fresh = ~np.isin(idx, _flat(st.flagged))
            idx, susp = idx[fresh], susp[fresh]
        out = take(c, idx, susp, v.n_scanned - v.n_flagged, v.n_quarantined_before + v.n_flagged, self.th)
        for msg in out.warnings:
            st.warn(msg)
        v.capped = v.capped or out.capped
        v.n_flagged += len(out.indices)
        st.flagged.append(out.indices)

    def trusted_mismatch(self, st: ScanState) -> None:
        """The classes this scan did not act on, read together (:mod:`guard.mismatch`): where their
        direction tests combined say that the trusted samples do not look like the training data, the
        trusted tests' false-alarm bound does not hold here, and the scan warns."""
        quiet = {c: ps for c, ps in st.layer_p.items()
                 if st.classes[c].n_flagged == 0 and st.classes[c].verdict not in _ACTED}
        st.mismatch = mismatch(quiet)
        m = st.mismatch
        if m is None or m.p >= self.th.max_false_alarm:
            return
        acted = sorted(c for c, v in st.classes.items() if v.n_flagged)
        st.warn(f"the trusted samples do not look like the training data: at {st.layer_names[m.layer]}, the "
                f"{m.classes} classes this scan did not act on together hold more samples beyond their trusted "
                f"samples than clean classes could (Fisher's combination p = {m.p:.1e}, corrected for the layers; "
                f"max_false_alarm = {self.th.max_false_alarm}). Either the training data come from another source "
                "than the trusted samples (another compression, camera or resizing; many wrong labels), where the "
                "trusted tests' false-alarm bound does not hold"
                + (f" and the classes acted on ({', '.join(map(str, acted))}) may be clean" if acted else "")
                + ", or poison sits in many classes (all-to-all, cover samples). Trusted samples drawn from the "
                  "training data's own source rule out the first.")

    # ---- result --------------------------------------------------------------------------------
    def result(self, st: ScanState, split: dict[str, float]) -> ScanResult:
        cal = st.cal
        memory = (st.raw.nbytes + st.out_of_spread.nbytes + st.labels.nbytes + st.suspicion.nbytes
                  + st.threshold.nbytes + cal.loo.nbytes + cal.in_sample.nbytes
                  + (st.store.nbytes if st.store is not None else 0)
                  + (st.kept_views.nbytes if st.kept_views is not None else 0)
                  + cal.kept_bytes + st.read_back_bytes
                  + 3 * sum(x.numel() * x.element_size() for x in cal.reference.sums))
        return ScanResult(st.kept, st.suspicion, st.threshold, st.labels, _flat(st.flagged), _flat(st.paper_flagged),
                          [st.classes[c] for c in sorted(st.classes)], cal.source, st.seconds, st.warnings, memory,
                          st.ref_susp, dict(st.passes.samples), split, st.predicted,
                          cal.predicted if cal.source == "trusted" else None, cal.labels, _flat(st.released),
                          None if st.mismatch is None else st.mismatch.p,
                          None if st.mismatch is None else st.layer_names[st.mismatch.layer],
                          None if st.symmetry is None else st.symmetry.p)
