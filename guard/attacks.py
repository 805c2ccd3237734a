"""Reproducible poisoning attacks for red-teaming and evaluation: all-to-one (BadNets, Blended,
WaNet with or without its noise mode), all-to-all, clean-label (SIG, label-consistent), the attacks
built to defeat latent-separation defences (Adaptive-Blend, Adaptive-Patch), a tabular feature
trigger, and a *trigger zoo*: random patches, blends, warps and frequency-domain triggers drawn
from a seed (:func:`trigger_zoo`), so a defence can be measured on triggers nobody tuned it on.

Each attack poisons a uint8 image array (N, H, W, C) and returns the ground-truth poisoned
indices (and the *cover* samples: triggered, label kept), so detection quality can be measured
exactly::

    >>> import numpy as np
    >>> from guard.attacks import BadNets
    >>> x = np.zeros((100, 32, 32, 3), np.uint8); y = np.arange(100) % 10
    >>> res = BadNets(target=0, rate=0.1, seed=0).poison(x, y)
    >>> len(res.poisoned), bool((res.labels[res.poisoned] == 0).all())
    (10, True)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def _no_indices() -> np.ndarray:
    return np.empty(0, np.int64)


@dataclass
class PoisonResult:
    images: np.ndarray
    labels: np.ndarray
    poisoned: np.ndarray  # sorted int64 indices of poisoned samples (trigger, label changed or clean-label)
    cover: np.ndarray = field(default_factory=_no_indices)  # sorted indices carrying a trigger, true label kept


@dataclass
class Attack:
    """Base class: choose ``rate`` x N non-target samples, add the trigger, relabel to ``target``.
    ``cover_rate`` x N other samples (any class) carry the training-time trigger with their true
    label (Qi et al. 2023's regularisation samples: they teach the model that the trigger alone
    is not the cue, which blurs the poison's separation in feature space)."""

    target: int = 0
    rate: float = 0.1
    seed: int = 0
    cover_rate: float = 0.0
    name: str = field(default="attack", init=False)

    def trigger(self, images: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        """The test-time trigger (attack success is measured with it)."""
        raise NotImplementedError

    def train_trigger(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The trigger the poisoned training samples carry (the test-time one unless the attack
        trains with a weaker or partial one)."""
        return self.trigger(images)

    def cover_trigger(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The trigger the cover samples carry."""
        return self.train_trigger(images, rng)

    def cover_count(self, n: int, n_poisoned: int) -> int:
        """How many cover samples, of ``n`` training samples with ``n_poisoned`` poisoned."""
        return int(round(self.cover_rate * n))

    def pool(self, labels: np.ndarray) -> tuple[np.ndarray, str]:
        """The samples that may be poisoned, and what they are (for the error when too few)."""
        return np.flatnonzero(labels != self.target), f"are outside target class {self.target}"

    def choose(self, labels: np.ndarray) -> np.ndarray:
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"poisoning rate must be in [0, 1), got {self.rate}")
        pool, what = self.pool(labels)
        n = int(round(self.rate * len(labels)))
        if n > len(pool):
            raise ValueError(f"rate {self.rate} asks for {n} poisoned samples but only {len(pool)} {what}; "
                             "lower the rate")
        rng = np.random.default_rng(self.seed)
        return np.sort(rng.choice(pool, n, replace=False)).astype(np.int64)

    def check(self, images: np.ndarray) -> None:
        """Validate the data before poisoning (image attacks: uint8 (N, H, W, C))."""
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")

    def targets(self, labels: np.ndarray) -> np.ndarray:
        """The label the trigger should make the model predict, per true label."""
        return np.full(len(labels), self.target, dtype=np.int64)

    def test_mask(self, labels: np.ndarray) -> np.ndarray:
        """Test images the attack success is measured on: those not already of their target."""
        return labels != self.targets(labels)

    def choose_cover(self, labels: np.ndarray, poisoned: np.ndarray) -> np.ndarray:
        n = self.cover_count(len(labels), len(poisoned))
        if n < 0:
            raise ValueError(f"cover_rate must be >= 0, got {self.cover_rate}")
        free = np.setdiff1d(np.arange(len(labels)), poisoned)
        if n > len(free):
            raise ValueError(f"{n} cover samples asked for but only {len(free)} samples are not poisoned; "
                             "lower cover_rate or rate")
        rng = np.random.default_rng([self.seed, 2])
        return np.sort(rng.choice(free, n, replace=False)).astype(np.int64)

    def poison(self, images: np.ndarray, labels: np.ndarray) -> PoisonResult:
        self.check(images)
        idx = self.choose(labels)
        cover = self.choose_cover(labels, idx)
        rng = np.random.default_rng([self.seed, 1])
        x, y = images.copy(), labels.copy()
        if len(idx):
            x[idx] = self.train_trigger(images[idx], rng)
            y[idx] = self.targets(labels[idx])
        if len(cover):
            x[cover] = self.cover_trigger(images[cover], rng)
        return PoisonResult(x, y, idx, cover)

    def triggered_test(self, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Test images not of their target, with the trigger, and their true labels (for attack success)."""
        keep = self.test_mask(labels)
        return self.trigger(images[keep]), labels[keep]


@dataclass
class BadNets(Attack):
    """Gu et al. 2017: a small checkerboard patch in the bottom-right corner."""

    size: int = 3

    def __post_init__(self) -> None:
        self.name = "badnets"

    def trigger(self, images: np.ndarray) -> np.ndarray:
        out = images.copy()
        s = self.size
        board = (np.indices((s, s)).sum(0) % 2 == 0).astype(np.uint8) * 255
        out[:, -s - 1:-1, -s - 1:-1, :] = board[None, :, :, None]
        return out


@dataclass
class Patch(Attack):
    """A ``size`` x ``size`` patch pasted at ``at`` = (row, column) as fractions of the free range
    (0: top / left edge, 1: bottom / right edge, 0.5: centre). ``style``: ``"binary"`` (a random
    black-and-white pattern) or ``"colour"`` (random colours), fixed by ``pattern_seed``."""

    size: int = 4
    at: tuple[float, float] = (1.0, 1.0)
    style: str = "binary"
    pattern_seed: int = 0

    def __post_init__(self) -> None:
        self.name = "patch"
        if self.style not in ("binary", "colour"):
            raise ValueError(f"patch style must be 'binary' or 'colour', got {self.style!r}")

    def trigger(self, images: np.ndarray) -> np.ndarray:
        n, h, w, ch = images.shape
        s = self.size
        if not 1 <= s <= min(h, w):
            raise ValueError(f"patch size {s} does not fit images of {h} x {w}")
        rng = np.random.default_rng(self.pattern_seed)
        if self.style == "binary":
            pattern = np.repeat(rng.integers(0, 2, (s, s, 1)) * 255, ch, axis=2)
        else:
            pattern = rng.integers(0, 256, (s, s, ch))
        top, left = int(round(self.at[0] * (h - s))), int(round(self.at[1] * (w - s)))
        out = images.copy()
        out[:, top:top + s, left:left + s, :] = pattern.astype(np.uint8)[None]
        return out


@dataclass
class Blended(Attack):
    """Chen et al. 2017: blend a fixed (seeded) random pattern into the whole image: uniform noise
    (``kind="noise"``) or a smooth random image (``"smooth"``: noise on a 4 x 4 grid, upsampled)."""

    alpha: float = 0.2
    pattern_seed: int = 12345
    kind: str = "noise"

    def __post_init__(self) -> None:
        self.name = "blended"
        if self.kind not in ("noise", "smooth"):
            raise ValueError(f"blend kind must be 'noise' or 'smooth', got {self.kind!r}")

    def trigger(self, images: np.ndarray) -> np.ndarray:
        pattern = blend_pattern(images.shape[1:], self.pattern_seed, self.kind)
        out = (1 - self.alpha) * images.astype(np.float32) + self.alpha * pattern[None]
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def blend_pattern(shape: tuple[int, ...], seed: int, kind: str = "noise") -> np.ndarray:
    """A fixed float32 (H, W, C) pattern in [0, 255]: uniform noise, or ``"smooth"`` (noise on a
    4 x 4 grid, upsampled bicubically)."""
    rng = np.random.default_rng(seed)
    if kind == "noise":
        return rng.integers(0, 256, size=shape, dtype=np.uint8).astype(np.float32)
    h, w, ch = shape
    coarse = torch.from_numpy(rng.uniform(0, 255, (1, ch, 4, 4)).astype(np.float32))
    pattern = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)[0]
    return pattern.clamp(0, 255).permute(1, 2, 0).numpy()


@dataclass
class Frequency(Attack):
    """A frequency-domain trigger: ``waves`` fixed 2-D gratings (random high spatial frequencies,
    orientations and phases, fixed by ``pattern_seed``) added with amplitude ``delta`` (of 255), a
    pattern spread over the whole image that a spatial patch detector does not see."""

    delta: float = 12.0
    waves: int = 2
    pattern_seed: int = 0

    def __post_init__(self) -> None:
        self.name = "frequency"

    def trigger(self, images: np.ndarray) -> np.ndarray:
        h, w = images.shape[1:3]
        rng = np.random.default_rng(self.pattern_seed)
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
        signal = np.zeros((h, w))
        for _ in range(self.waves):
            fy, fx = rng.integers(h // 4, h // 2 + 1), rng.integers(w // 4, w // 2 + 1)
            signal += np.cos(2 * np.pi * (fy * ys / h + fx * xs / w) + rng.uniform(0, 2 * np.pi))
        signal *= self.delta / max(np.abs(signal).max(), 1e-9)
        out = images.astype(np.float32) + signal[None, :, :, None].astype(np.float32)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@dataclass
class WaNet(Attack):
    """Nguyen & Tran 2021: a fixed smooth warping field (k x k control grid, strength s). With
    ``cross_ratio`` > 0 (the published *noise mode*, 2), ``cross_ratio`` x the poisoned count of
    other samples are warped by the field plus per-pixel random noise and keep their labels, so the
    model must learn the exact warp, not warping in general."""

    k: int = 4
    strength: float = 0.5
    pattern_seed: int = 12345
    cross_ratio: float = 0.0

    def __post_init__(self) -> None:
        self.name = "wanet"

    def cover_count(self, n: int, n_poisoned: int) -> int:
        return int(round(self.cross_ratio * n_poisoned)) + super().cover_count(n, n_poisoned)

    def cover_trigger(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self._warp(images, rng)

    def _warp(self, images: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """The field applied to every image; with ``rng``, plus fresh per-pixel noise for each."""
        n, h, w, _ = images.shape
        out = np.empty_like(images)
        for lo in range(0, n, 256):
            x = torch.from_numpy(images[lo:lo + 256]).permute(0, 3, 1, 2).float()
            grid = self._grid(h, w).expand(len(x), -1, -1, -1)
            if rng is not None:
                noise = torch.from_numpy(rng.uniform(-1, 1, (len(x), h, w, 2)).astype(np.float32))
                grid = (grid + noise / h).clamp(-1, 1)
            warped = F.grid_sample(x, grid, align_corners=True)
            out[lo:lo + 256] = warped.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
        return out

    def _grid(self, h: int, w: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.pattern_seed)
        ins = torch.rand(1, 2, self.k, self.k, generator=g) * 2 - 1
        ins = ins / ins.abs().mean()
        noise = F.interpolate(ins, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        identity = torch.stack((xs, ys), dim=2)[None]
        return (identity + self.strength * noise / h).clamp(-1, 1)

    def trigger(self, images: np.ndarray) -> np.ndarray:
        return self._warp(images)


@dataclass
class AllToAll(BadNets):
    """BadNets patch, every poisoned sample relabelled to the next class, ``(y + 1) % num_classes``:
    no single target class collects the poison."""

    num_classes: int = 10

    def __post_init__(self) -> None:
        self.name = "all2all"

    def pool(self, labels: np.ndarray) -> tuple[np.ndarray, str]:
        return np.arange(len(labels)), "samples exist"

    def targets(self, labels: np.ndarray) -> np.ndarray:
        return (np.asarray(labels, dtype=np.int64) + 1) % self.num_classes


@dataclass
class CleanLabelSIG(Attack):
    """Barni et al. 2019 (SIG): a clean-label attack. A horizontal sinusoid (amplitude ``delta`` of
    255, ``freq`` periods across the image) is added to images *of the target class*, whose labels
    stay correct; the model learns the signal as a cue for the target. ``rate`` is a share of the
    whole training set and must not exceed the target class's share."""

    delta: float = 20.0
    freq: int = 6

    def __post_init__(self) -> None:
        self.name = "sig"

    def pool(self, labels: np.ndarray) -> tuple[np.ndarray, str]:
        return (np.flatnonzero(labels == self.target),
                f"are in target class {self.target} (a clean-label attack poisons only those)")

    def trigger(self, images: np.ndarray) -> np.ndarray:
        w = images.shape[2]
        signal = self.delta * np.sin(2 * np.pi * np.arange(w) * self.freq / w)
        out = images.astype(np.float32) + signal[None, None, :, None]
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@dataclass
class WaNetNoise(WaNet):
    """:class:`WaNet` in its published noise mode (``cross_ratio`` 2)."""

    cross_ratio: float = 2.0

    def __post_init__(self) -> None:
        self.name = "wanet_noise"


def _grid_cells(h: int, w: int, pieces: int) -> list[tuple[slice, slice]]:
    side = int(round(np.sqrt(pieces)))
    if side * side != pieces or side > min(h, w):
        raise ValueError(f"pieces must be a square number of cells that fits the image, got {pieces} for {h} x {w}")
    rows, cols = np.linspace(0, h, side + 1).astype(int), np.linspace(0, w, side + 1).astype(int)
    return [(slice(rows[i], rows[i + 1]), slice(cols[j], cols[j + 1])) for i in range(side) for j in range(side)]


@dataclass
class AdaptiveBlend(Attack):
    """Qi et al. 2023 (Adaptive-Blend), built to defeat latent-separation defences: the blend
    pattern is cut into ``pieces`` cells and every poisoned and cover sample carries a random
    ``1 - mask_rate`` of them, blended at ``alpha``; the test trigger is the whole pattern at
    ``test_alpha``. Cover samples (``cover_rate``) keep their labels. Defaults are the published
    CIFAR-10 ones (16 pieces, half masked, alpha 0.15 / 0.2, 0.3 % poison and 0.3 % cover); the
    pattern is a seeded :func:`blend_pattern` (the paper blends a picture)."""

    rate: float = 0.003
    cover_rate: float = 0.003
    alpha: float = 0.15
    test_alpha: float = 0.2
    pieces: int = 16
    mask_rate: float = 0.5
    pattern_seed: int = 12345
    kind: str = "noise"

    def __post_init__(self) -> None:
        self.name = "adaptive_blend"
        if not 0.0 <= self.mask_rate < 1.0:
            raise ValueError(f"mask_rate must be in [0, 1), got {self.mask_rate}")

    def _blend(self, images: np.ndarray, alpha: float, mask: np.ndarray) -> np.ndarray:
        pattern = blend_pattern(images.shape[1:], self.pattern_seed, self.kind)
        x = images.astype(np.float32)
        out = x + alpha * mask[..., None] * (pattern[None] - x)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    def trigger(self, images: np.ndarray) -> np.ndarray:
        return self._blend(images, self.test_alpha, np.ones((1,) + images.shape[1:3], np.float32))

    def train_trigger(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        n, h, w, _ = images.shape
        cells = _grid_cells(h, w, self.pieces)
        hidden = int(round(self.mask_rate * self.pieces))
        mask = np.ones((n, h, w), np.float32)
        for i in range(n):
            for c in rng.choice(self.pieces, hidden, replace=False):
                mask[(i,) + cells[c]] = 0.0
        return self._blend(images, self.alpha, mask)


@dataclass
class AdaptivePatch(Attack):
    """Qi et al. 2023 (Adaptive-Patch): ``len(train_alphas)`` different patches, one in each
    corner; every poisoned and cover sample carries *one* of them, blended at its low training
    opacity (published: 0.5, 0.2, 0.5, 0.3); the test trigger pastes the ``test_patches`` at full
    opacity (published: two of them, the 0.5 ones). Defaults are the published CIFAR-10 ones (0.3 %
    poison, 0.6 % cover); the patches are seeded ``size`` px colour patterns (the paper's are logos)."""

    rate: float = 0.003
    cover_rate: float = 0.006
    size: int = 6
    train_alphas: tuple[float, ...] = (0.5, 0.2, 0.5, 0.3)
    test_patches: tuple[int, ...] = (0, 2)
    pattern_seed: int = 0

    def __post_init__(self) -> None:
        self.name = "adaptive_patch"
        if not 1 <= len(self.train_alphas) <= 4 or not set(self.test_patches) <= set(range(len(self.train_alphas))):
            raise ValueError(f"1-4 patches (one per corner) and test_patches among them; got "
                             f"{len(self.train_alphas)} patches, test_patches={self.test_patches}")

    def _paste(self, images: np.ndarray, which: int, alpha: float) -> np.ndarray:
        n, h, w, ch = images.shape
        s = self.size
        if not 1 <= s <= min(h, w) // 2:
            raise ValueError(f"patch size {s} does not fit four corners of {h} x {w} images")
        rng = np.random.default_rng([self.pattern_seed, which])
        pattern = rng.integers(0, 256, (s, s, ch)).astype(np.float32)
        top, left = (1, h - s - 1)[which // 2], (1, w - s - 1)[which % 2]
        out = images.copy()
        region = out[:, top:top + s, left:left + s, :].astype(np.float32)
        out[:, top:top + s, left:left + s, :] = np.clip(np.rint(region + alpha * (pattern[None] - region)), 0, 255)
        return out

    def trigger(self, images: np.ndarray) -> np.ndarray:
        out = images
        for j in self.test_patches:
            out = self._paste(out, j, 1.0)
        return out

    def train_trigger(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        k = len(self.train_alphas)
        which = rng.permutation(np.arange(len(images)) % k)
        out = images.copy()
        for j in range(k):
            rows = np.flatnonzero(which == j)
            if len(rows):
                out[rows] = self._paste(images[rows], j, self.train_alphas[j])
        return out


@dataclass
class LabelConsistent(Attack):
    """Turner, Tsipras & Madry 2019 (label-consistent, adversarial variant): a clean-label attack.
    Images *of the target class* (their labels stay correct) are first perturbed by PGD (L-inf
    ``eps`` of 1, ``steps`` steps) away from their class on a ``surrogate`` model, so that their
    own content is hard to learn from, then a 3 x 3 checkerboard is stamped in each corner at
    ``amplitude``; the model leans on the trigger to fit them. ``surrogate``: a classifier of
    (N, C, H, W) float images in [0, 1]; ``None`` trains a small CNN on the data being poisoned
    for ``surrogate_epochs`` (the attacker's clean copy). ``rate`` is a share of the whole
    training set and must not exceed the target class's share. Published: eps 16/255, full
    amplitude (255)."""

    eps: float = 16 / 255
    steps: int = 10
    amplitude: int = 255
    surrogate: Any = field(default=None, repr=False, compare=False)
    surrogate_epochs: int = 4
    _data: tuple[np.ndarray, np.ndarray] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.name = "label_consistent"

    def pool(self, labels: np.ndarray) -> tuple[np.ndarray, str]:
        return (np.flatnonzero(labels == self.target),
                f"are in target class {self.target} (a clean-label attack poisons only those)")

    def poison(self, images: np.ndarray, labels: np.ndarray) -> PoisonResult:
        self._data = (images, labels)         # for the surrogate, when none was given
        try:
            return super().poison(images, labels)
        finally:
            self._data = None

    def trigger(self, images: np.ndarray) -> np.ndarray:
        out = images.copy()
        board = ((np.indices((3, 3)).sum(0) % 2 == 0) * self.amplitude).astype(np.uint8)
        h, w = images.shape[1:3]
        for top in (1, h - 4):
            for left in (1, w - 4):
                out[:, top:top + 3, left:left + 3, :] = board[None, :, :, None]
        return out

    def train_trigger(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        model = self.surrogate if self.surrogate is not None else self._fit_surrogate()
        model.eval()
        x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        y = torch.full((len(x0),), self.target, dtype=torch.long)
        step = 2.5 * self.eps / max(self.steps, 1)
        adv = []
        for lo in range(0, len(x0), 256):
            xb, yb = x0[lo:lo + 256], y[lo:lo + 256]
            x = xb.clone()
            for _ in range(self.steps):
                x.requires_grad_(True)
                loss = F.cross_entropy(model(x), yb)
                (grad,) = torch.autograd.grad(loss, x)
                x = (xb + (x.detach() + step * grad.sign() - xb).clamp(-self.eps, self.eps)).clamp(0, 1)
            adv.append(x.detach())
        perturbed = (torch.cat(adv) * 255).round().byte().permute(0, 2, 3, 1).numpy()
        return self.trigger(perturbed)

    def _fit_surrogate(self) -> torch.nn.Module:
        if self._data is None:
            raise ValueError("LabelConsistent needs a surrogate model, or poison() to train one on the data")
        from guard.models import SmallCNN          # here: guard.models is not needed by the other attacks

        images, labels = self._data
        g = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        model = SmallCNN(num_classes=int(labels.max()) + 1, in_channels=images.shape[3], width=16)
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        x = torch.from_numpy(images).permute(0, 3, 1, 2)
        y = torch.from_numpy(labels.astype(np.int64))
        model.train()
        for _ in range(self.surrogate_epochs):
            for b in torch.randperm(len(x), generator=g).split(128):
                opt.zero_grad()
                F.cross_entropy(model(x[b].float() / 255), y[b]).backward()
                opt.step()
        return model.eval()


@dataclass
class FeatureTrigger(Attack):
    """A tabular backdoor: set a few features to a fixed, out-of-range value (in standard
    deviations of each feature) and relabel. Works on float (N, F) arrays.

    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(200, 6)).astype(np.float32); y = np.arange(200) % 2
    >>> res = FeatureTrigger(target=0, rate=0.1, features=(0, 1), value=5.0).poison(x, y)
    >>> len(res.poisoned), bool(np.allclose(res.images[res.poisoned][:, :2], 5.0 * x.std(0)[:2] + x.mean(0)[:2]))
    (20, True)
    """

    features: tuple[int, ...] = (0, 1, 2)
    value: float = 4.0
    _stats: tuple[np.ndarray, np.ndarray] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.name = "feature"

    def check(self, images: np.ndarray) -> None:
        if images.ndim != 2 or not np.issubdtype(images.dtype, np.floating):
            raise ValueError(f"features must be a float (N, F) array, got {images.dtype} {images.shape}")
        self._stats = (images.mean(0), images.std(0))       # the trigger value is fixed by the clean data

    def trigger(self, images: np.ndarray) -> np.ndarray:
        if self._stats is None:
            raise ValueError("call poison() first: the trigger value is set from the training data's statistics")
        mean, std = self._stats
        out = images.copy()
        cols = list(self.features)
        out[:, cols] = (mean[cols] + self.value * std[cols]).astype(images.dtype)
        return out


ATTACKS: dict[str, type[Attack]] = {"badnets": BadNets, "blended": Blended, "wanet": WaNet, "all2all": AllToAll,
                                    "sig": CleanLabelSIG, "wanet_noise": WaNetNoise, "adaptive_blend": AdaptiveBlend,
                                    "adaptive_patch": AdaptivePatch, "label_consistent": LabelConsistent}
ZOO_FAMILIES = ("patch", "blend", "warp", "frequency")


def random_trigger(rng: np.random.Generator, num_classes: int = 10, seed: int = 0) -> Attack:
    """One all-to-one trigger drawn from ``rng``: a family from :data:`ZOO_FAMILIES`, its shape, a
    poison rate of 3-10 % and a random target. Patches: 2-8 px anywhere (edges, corners, centre),
    binary or coloured; blends: noise or a smooth image at alpha 0.05-0.25; warps: WaNet fields of
    3-6 control points at strength 0.5-1.0; frequency: 1-3 high-frequency gratings of amplitude 8-24.
    ``seed`` chooses the poisoned samples."""
    family = ZOO_FAMILIES[int(rng.integers(len(ZOO_FAMILIES)))]
    common = dict(target=int(rng.integers(num_classes)), rate=round(float(rng.uniform(0.03, 0.10)), 3), seed=seed)
    pattern_seed = int(rng.integers(2**31))
    if family == "patch":
        at = tuple(float(rng.choice([0.0, 0.5, 1.0])) if rng.random() < 0.5 else round(float(rng.random()), 2)
                   for _ in range(2))
        return Patch(**common, size=int(rng.integers(2, 9)), at=at, style=str(rng.choice(["binary", "colour"])),
                     pattern_seed=pattern_seed)
    if family == "blend":
        return Blended(**common, alpha=round(float(rng.uniform(0.05, 0.25)), 3), pattern_seed=pattern_seed,
                       kind=str(rng.choice(["noise", "smooth"])))
    if family == "warp":
        return WaNet(**common, k=int(rng.integers(3, 7)), strength=round(float(rng.uniform(0.5, 1.0)), 2),
                     pattern_seed=pattern_seed)
    return Frequency(**common, delta=round(float(rng.uniform(8, 24)), 1), waves=int(rng.integers(1, 4)),
                     pattern_seed=pattern_seed)


def trigger_zoo(seed: int, n: int = 20, num_classes: int = 10) -> list[Attack]:
    """``n`` random triggers (:func:`random_trigger`), the same for the same ``seed``; keep the seed
    list in the benchmark and report triggers the thresholds were never tuned on.

    >>> [a.name for a in trigger_zoo(seed=0, n=4)] == [a.name for a in trigger_zoo(seed=0, n=4)]
    True
    """
    rng = np.random.default_rng([seed, 7919])
    return [random_trigger(rng, num_classes, seed=seed * 1000 + i) for i in range(n)]


def make_attack(name: str, **kwargs) -> Attack:
    """Build an attack by name (a key of :data:`ATTACKS`), or the
    ``I``-th trigger of ``trigger_zoo(S)`` as ``"zoo:S:I"`` (``kwargs`` then replace its own target,
    rate and sample seed)."""
    if name.startswith("zoo:"):
        try:
            seed, index = (int(p) for p in name.split(":")[1:])
        except ValueError:
            raise ValueError(f"zoo trigger {name!r}: write 'zoo:SEED:INDEX', e.g. 'zoo:0:7'") from None
        atk = trigger_zoo(seed, index + 1)[index]
        for k, v in kwargs.items():
            setattr(atk, k, v)
        return atk
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose one of {sorted(ATTACKS)} or 'zoo:SEED:INDEX'")
    return ATTACKS[name](**kwargs)
