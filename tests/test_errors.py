"""Bad input gets a clear, actionable GuardError (a ValueError), never a silent wrong answer."""

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from guard import GuardConfig, GuardedDataset, GuardError
from tests.conftest import Blobs, mlp


class Items(Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_model_with_no_hookable_layers():
    with pytest.raises(GuardError, match="no submodules"):
        GuardedDataset(Blobs(30), nn.Linear(16, 3))


def test_unknown_layer_name():
    with pytest.raises(GuardError, match=r"\['body'\] are not modules"):
        GuardedDataset(Blobs(30), mlp(), GuardConfig(layers=["body"]))


def test_labels_outside_the_number_of_classes():
    ds = TensorDataset(torch.randn(40, 16), torch.arange(40) % 5)      # 5 labels, model has 3 outputs
    gds = GuardedDataset(ds, mlp(), GuardConfig(remedy="none"))
    with pytest.raises(GuardError, match=r"label \d of dataset index \d+ is outside \[0, 3\)"):
        gds.scan()


def test_trusted_set_missing_a_class_or_too_small():
    t = TensorDataset(torch.randn(40, 16), torch.arange(40) % 2)          # class 2 missing
    with pytest.raises(GuardError, match=r"no samples of classes \[2\]"):
        GuardedDataset(Blobs(90), mlp(), trusted=t)
    t = TensorDataset(torch.randn(12, 16), torch.arange(12) % 3)          # 4 per class
    with pytest.raises(GuardError, match="too few samples for classes"):
        GuardedDataset(Blobs(90), mlp(), trusted=t)


def test_trusted_larger_than_training_set():
    with pytest.raises(GuardError, match="larger than the training set"):
        GuardedDataset(Blobs(30), mlp(), trusted=Blobs(60))


def test_items_the_guard_cannot_unpack():
    with pytest.raises(GuardError, match="cannot unpack"):
        GuardedDataset(Items([torch.randn(16)] * 10), mlp())
    with pytest.raises(GuardError, match="no label key"):
        GuardedDataset(Items([{"x": torch.randn(16), "cls": 1}] * 10), mlp())


def test_items_of_varying_shape():
    with pytest.raises(GuardError, match="cannot be batched"):
        GuardedDataset(Items([(torch.randn(16), 0), (torch.randn(15), 1)] * 3), mlp())


@pytest.mark.parametrize("label, match", [(0.0, "dtype torch.float"), ("cat", "strings"),
                                          (torch.tensor([0.0, 1.0, 0.0]), "one-hot")])
def test_labels_of_the_wrong_kind(label, match):
    with pytest.raises(GuardError, match=match):
        GuardedDataset(Items([(torch.randn(16), label)] * 6), mlp())


def test_empty_dataset_and_mismatched_scan_dataset():
    with pytest.raises(GuardError, match="empty"):
        GuardedDataset(Items([]), mlp())
    with pytest.raises(GuardError, match="same samples in the same order"):
        GuardedDataset(Blobs(30), mlp(), scan_dataset=Blobs(20))


def test_nan_features():
    x = torch.randn(30, 16)
    x[3] = float("nan")
    gds = GuardedDataset(TensorDataset(x, torch.arange(30) % 3), mlp(), GuardConfig(remedy="none"))
    with pytest.raises(GuardError, match="NaN/inf"):
        gds.scan()
    assert len(gds.quarantined) == 0 and not gds.report.scans       # nothing applied


def test_config_values_are_validated_with_the_field_named():
    with pytest.raises(ValidationError, match="scan_every"):
        GuardConfig(scan_every=0)
    with pytest.raises(ValidationError, match="warmup_epoch"):
        GuardConfig(warmup_epoch=2)                                    # typo: unknown key
    with pytest.raises(ValidationError, match="class_drop_warn"):
        GuardConfig(thresholds={"class_drop_warn": 0.9, "class_drop_cap": 0.5})
    assert issubclass(GuardError, ValueError)


class Resizable(Blobs):
    def __init__(self, n):
        super().__init__(n)
        self.n = n

    def __len__(self):
        return self.n


def test_dataset_length_that_changes_while_training():
    ds = Resizable(90)
    gds = GuardedDataset(ds, mlp(), GuardConfig(remedy="none"))
    ds.n = 60
    with pytest.raises(GuardError, match="60 samples now but 90 when it was wrapped"):
        iter(gds.sampler)
    with pytest.raises(GuardError, match="keep its length constant"):
        gds.scan()


def test_frozen_model_with_the_unlearning_remedy():
    model = mlp()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(GuardError, match="frozen.*remedy='none'"):
        GuardedDataset(Blobs(90), model)
    GuardedDataset(Blobs(90), model, GuardConfig(remedy="none")).scan()     # quarantining alone works


def test_scan_device_that_is_missing_or_not_the_models():
    if not torch.cuda.is_available():
        with pytest.raises(GuardError, match="'cuda' is not usable here"):
            GuardedDataset(Blobs(90), mlp(), GuardConfig(device="cuda"))
    with pytest.raises(GuardError, match="model's parameters are on cpu"):
        GuardedDataset(Blobs(90), mlp(), GuardConfig(device="meta"))


def test_single_class_data():
    ds = TensorDataset(torch.randn(40, 16), torch.zeros(40, dtype=torch.long))
    with pytest.raises(GuardError, match="all 40 scanned samples have label 0"):
        GuardedDataset(ds, mlp(), GuardConfig(remedy="none")).scan()


def test_class_with_too_few_samples_for_a_trust_free_reference():
    ds = TensorDataset(torch.randn(40, 16), torch.tensor([0] * 19 + [1] * 19 + [2] * 2))
    with pytest.raises(GuardError, match=r"fewer than 2 samples of classes \[2\].*pass a trusted set"):
        GuardedDataset(ds, mlp(), GuardConfig(remedy="none")).scan()


def test_trusted_set_with_classes_the_training_set_lacks():
    ds = TensorDataset(torch.randn(90, 16), torch.arange(90) % 2)
    t = TensorDataset(torch.randn(30, 16), torch.arange(30) % 3)
    with pytest.raises(GuardError, match=r"classes \[2\] that the training set lacks"):
        GuardedDataset(ds, mlp(), GuardConfig(remedy="none"), trusted=t).scan()


class _Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 32)

    def forward(self, x):
        h = self.lin(x)
        return (h, {"h": h})


class _Wrapped(nn.Module):
    """A block returning a tuple holding a dict: the guard takes its first tensor."""

    def __init__(self):
        super().__init__()
        self.block, self.mid, self.head = _Pair(), nn.Linear(32, 32), nn.Linear(32, 3)

    def forward(self, x):
        h, _ = self.block(x)
        return self.head(torch.relu(self.mid(h)))


@pytest.mark.parametrize("wrap", [lambda m: m, nn.DataParallel], ids=["tuple-layer", "data-parallel"])
def test_layers_returning_tuples_and_wrapped_models_are_handled(wrap):
    gds = GuardedDataset(Blobs(90), wrap(_Wrapped()), GuardConfig(remedy="none", layers=["block", "mid", "head"]))
    assert gds.scan().n_scanned == 90


def test_classes_too_small_to_judge_are_left_alone_with_a_warning():
    x = torch.randn(93, 16)
    y = torch.cat([torch.arange(90) % 2, torch.full((3,), 2)])            # class 2: three samples
    x[90:] += 6.0                                                          # and far from everything
    gds = GuardedDataset(TensorDataset(x, y), mlp(), GuardConfig(remedy="none"),
                         trusted=TensorDataset(torch.randn(30, 16), torch.arange(30) % 3))
    scan = gds.scan()
    assert any("fewer than 5 samples" in w and "{2: 3}" in w for w in scan.warnings)
    assert not np.isin(np.arange(90, 93), gds.quarantined).any()


def test_nan_inputs_to_the_input_filter():
    from guard import InputFilter

    flt = InputFilter(mlp(), TensorDataset(torch.randn(30, 16), torch.arange(30) % 3))
    x = torch.randn(4, 16)
    x[1] = float("nan")
    with pytest.raises(GuardError, match="NaN/inf"):
        flt(x)
