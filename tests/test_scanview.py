"""What scans read without scan_dataset (guard.scanview): torchvision augmentation switched off in a
copy of the dataset, randomness it cannot switch off reported loudly, and on real CIFAR-10 the
difference it makes to a trust-free scan of a dataset written as torchvision users write it."""

import random
import warnings

import numpy as np
import pytest
import torch
import torchvision.transforms as v1
import torchvision.transforms.v2 as v2
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset, Subset
from torchvision.datasets import FakeData

from guard import GuardConfig, GuardedDataset, GuardWarning, scan_view
from guard.scanview import reads_differ
from tests.conftest import mlp


def _augmented(size=24):
    return v2.Compose([v2.RandomResizedCrop(size), v2.RandomHorizontalFlip(), v2.ColorJitter(0.4, 0.4),
                       v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.25] * 3)])


def test_a_torchvision_dataset_is_read_without_its_random_steps_and_keeps_its_own():
    train = FakeData(size=12, image_size=(3, 40, 32), num_classes=3, transform=_augmented(), random_offset=5)
    view, off = scan_view(train)
    assert off == ("RandomResizedCrop", "RandomHorizontalFlip", "ColorJitter")
    assert reads_differ(train, range(4)) and not reads_differ(view, range(12))
    assert view[3][0].shape == train[3][0].shape == (3, 24, 24)        # a training read's size
    assert view[3][1] == train[3][1]
    names = [type(t).__name__ for t in view.transform.transforms]
    assert names == ["Resize", "CenterCrop", "ToImage", "ToDtype", "Normalize"]
    assert [type(t).__name__ for t in train.transform.transforms][:3] == ["RandomResizedCrop", "RandomHorizontalFlip",
                                                                          "ColorJitter"]   # training unchanged
    assert view.transforms.transform is view.transform                 # VisionDataset's pair follows


def test_classic_transforms_through_subset_and_concat():
    t = v1.Compose([v1.RandomCrop(32, padding=4), v1.RandomHorizontalFlip(), v1.ToTensor()])
    a, b = FakeData(size=6, image_size=(3, 32, 32), transform=t), FakeData(size=6, image_size=(3, 32, 32), transform=t)
    data = ConcatDataset([Subset(a, [0, 2, 4]), b])
    view, off = scan_view(data)
    assert off == ("RandomCrop", "RandomHorizontalFlip") * 2
    assert isinstance(view, ConcatDataset) and view.datasets[0].indices == [0, 2, 4] and len(view) == 9
    assert not reads_differ(view, range(9)) and reads_differ(data, range(9))
    plain = v1.ToTensor()(a.__class__(size=6, image_size=(3, 32, 32))[4][0])
    assert torch.equal(view[2][0], plain)                              # centre crop 32 of 32: the image itself


def test_a_dataset_without_torchvision_transforms_is_its_own_view():
    data = FakeData(size=4, transform=v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]))
    assert scan_view(data) == (data, ())
    assert scan_view(_Jittered())[1] == ()


def test_the_check_for_random_reads_leaves_every_random_state_alone():
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    state = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    assert reads_differ(_Jittered(), range(4))
    assert torch.equal(state[0], torch.get_rng_state())
    assert np.array_equal(state[1], np.random.get_state()[1]) and state[2] == random.getstate()


class _Images(Dataset):
    """A user's dataset of 8-feature "images" as torchvision users write one: a transform attribute."""

    def __init__(self, transform=None, n=90):
        g = np.random.default_rng(0)
        self.y = np.arange(n) % 3
        self.x = (g.normal(0, 1, (n, 8)) + 3 * self.y[:, None]).astype(np.float32)
        self.transform = transform

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        x = torch.from_numpy(self.x[i]).view(1, 2, 4)
        return (self.transform(x) if self.transform else x).flatten(), int(self.y[i])


class _Jittered(_Images):
    """Augmentation written inside ``__getitem__``, which no helper can see."""

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return x + 0.1 * torch.randn(x.shape), y


def _model():
    torch.manual_seed(0)
    return mlp(dim=8)


def test_guarded_dataset_scans_the_view_and_says_so():
    data = _Images(v2.Compose([v2.RandomHorizontalFlip()]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", GuardWarning)
        gds = GuardedDataset(data, _model(), GuardConfig(remedy="none", progress=False))
    assert gds.scan_dataset is not None and gds.scan_dataset is not data
    assert "RandomHorizontalFlip off" in gds.report.scan_source and "scans read:" in gds.report.summary()
    assert gds[0][0].shape == (8,) and gds.dataset is data             # training reads are the user's own
    given = _Images()
    gds = GuardedDataset(data, _model(), GuardConfig(remedy="none", progress=False), scan_dataset=given)
    assert gds.scan_dataset is given and gds.report.scan_source == "scan_dataset"
    trusted = Subset(data, list(range(0, 90, 2)))                        # a verified part, same transform
    gds = GuardedDataset(data, _model(), GuardConfig(remedy="none", progress=False), trusted=trusted)
    assert gds.trusted is not trusted and not reads_differ(gds.trusted, range(8))
    assert gds.report.scan_source.endswith("the trusted set with RandomHorizontalFlip off")


def test_randomness_it_cannot_switch_off_is_a_warning_that_points_to_scan_dataset():
    with pytest.warns(GuardWarning, match="scan_dataset="):
        gds = GuardedDataset(_Jittered(), _model(), GuardConfig(remedy="none", progress=False))
    assert gds.scan_dataset is None and "augmented" in gds.report.scan_source
    with pytest.warns(GuardWarning, match="random augmentation"):
        GuardedDataset(_Images(v2.RandomHorizontalFlip()), _model(), GuardConfig(scan_view=False, progress=False))


class _CifarLike(Dataset):
    """CIFAR-10 images as torchvision's ``CIFAR10`` serves them: PIL images through ``transform``."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


@pytest.mark.cifar
def test_a_trust_free_scan_of_augmented_cifar_without_scan_dataset_finds_the_blend(cifar_archive):
    """Blended CIFAR-10 written as torchvision users write it (random crop with padding 4 and a flip in
    the Dataset's transform, no scan_dataset), an untrained model, no trusted set: the images alone
    can find the poison, and only when scans read them without the crop and flip."""
    from guard.experiment import RunSpec, prepare
    from guard.models import CifarResNet18

    data = prepare(RunSpec(data="cifar10", attack="blended", rate=0.1, n_train=2000, archive=cifar_archive))
    images = data.train.images.permute(0, 2, 3, 1).numpy()
    transform = v2.Compose([v2.ToImage(), v2.RandomCrop(32, padding=4, padding_mode="reflect"),
                            v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize([0.49, 0.48, 0.45], [0.25, 0.24, 0.26])])
    train = _CifarLike(images, data.labels, transform)
    p = set(data.poisoned.tolist())
    caught = {}
    for view in (True, False):
        torch.manual_seed(0)
        cfg = GuardConfig(remedy="none", progress=False, scan_view=view)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            gds = GuardedDataset(train, CifarResNet18(width=8), cfg)
        assert any(issubclass(w.category, GuardWarning) for w in seen) is not view   # loud only without the view
        gds.scan()
        q = set(gds.quarantined.tolist())
        caught[view] = (len(q & p) / len(p), len(q - p) / (len(train) - len(p)))
    assert caught[True][0] >= 0.95 and caught[True][1] <= 0.01
    assert caught[False][0] <= 0.5


def test_the_benchmarks_augmented_data_is_switched_off_like_a_users():
    from guard.datasets import ArrayImageDataset, ArraySplit

    split = ArraySplit(np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8), np.arange(6) % 2)
    train, plain = (ArrayImageDataset(split, (0.5,) * 3, (0.25,) * 3, augment=a) for a in (True, False))
    view, off = scan_view(train)
    assert off == ("RandomCrop", "RandomHorizontalFlip") and reads_differ(train, range(6))
    assert all(torch.equal(view[i][0], plain[i][0]) for i in range(6))


def test_torchvisions_reference_recipe_is_switched_off_too_and_its_batches_mix():
    """The benchmark's ``recipe="strong"``: TrivialAugmentWide, Normalize and RandomErasing in the
    Dataset's transform (the view keeps only the normalisation), MixUp / CutMix and label smoothing
    in the training step (soft targets, a loss that is not the plain cross-entropy)."""
    from guard.datasets import ArrayImageDataset, ArraySplit
    from guard.experiment import RunSpec, _Step

    split = ArraySplit(np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8), np.arange(6) % 2)
    strong = ArrayImageDataset(split, (0.5,) * 3, (0.25,) * 3, strong=True)
    plain = ArrayImageDataset(split, (0.5,) * 3, (0.25,) * 3)
    view, off = scan_view(strong)
    assert off == ("RandomCrop", "RandomHorizontalFlip", "TrivialAugmentWide", "RandomErasing")
    assert reads_differ(strong, range(6)) and not reads_differ(view, range(6))
    assert all(torch.allclose(view[i][0], plain[i][0], atol=1e-6) for i in range(6))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 2))
    x, y = torch.stack([plain[i][0] for i in range(6)]), torch.arange(6) % 2
    torch.manual_seed(0)
    mixed = _Step(RunSpec(recipe="strong"), num_classes=2).loss(model, x, y)
    assert not torch.allclose(mixed, torch.nn.functional.cross_entropy(model(x), y))
    assert torch.equal(_Step(RunSpec(), num_classes=2).loss(model, x, y), torch.nn.functional.cross_entropy(model(x), y))


def test_a_random_trusted_set_or_scan_dataset_is_a_warning_too():
    with pytest.warns(GuardWarning, match="the trusted set returns different data"):
        gds = GuardedDataset(_Images(), _model(), GuardConfig(remedy="none", progress=False, min_trusted_per_class=10),
                             trusted=_Jittered(n=30))
    assert gds.report.scan_source.endswith("the trusted set augmented (it returns different data for the same index)")
    with pytest.warns(GuardWarning, match="the scan_dataset returns different data"):
        GuardedDataset(_Images(), _model(), GuardConfig(remedy="none", progress=False), scan_dataset=_Jittered())
