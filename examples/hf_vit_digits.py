"""The guard in a HuggingFace ``Trainer`` run with a tiny ViT built from a config (no hub
download; offline, scikit-learn digits, a few minutes on a CPU).

    python examples/hf_vit_digits.py
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset
from transformers import TrainingArguments, ViTConfig, ViTForImageClassification

from guard import GuardConfig, GuardedDataset
from guard.experiment import RunSpec, detection, measure, prepare
from guard.integrations.hf import GuardedTrainer


class PixelDicts(Dataset):
    """HF-style items: ``{"pixel_values": x, "labels": y}``."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        x, y = self.ds[i]
        return {"pixel_values": x, "labels": y}


def main(epochs: int = 30) -> dict[str, float]:
    torch.manual_seed(0)
    data = prepare(RunSpec(data="digits", attack="badnets", rate=0.1, trusted_per_class=20))
    model = ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=64,
                                                num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                                                num_labels=10))
    gds = GuardedDataset(PixelDicts(data.train), model, GuardConfig(warmup_epochs=10, scan_every=10),
                         trusted=PixelDicts(data.trusted))
    args = TrainingArguments(output_dir="runs/hf_vit_digits", num_train_epochs=epochs, per_device_train_batch_size=64,
                             learning_rate=3e-3, warmup_steps=20, save_strategy="no", report_to=[], use_cpu=True,
                             logging_steps=50, seed=0)
    GuardedTrainer(model=model, args=args, guarded=gds).train()
    d = detection(gds.quarantined, data.poisoned, len(data.labels))
    m = measure(model, data)
    print(gds.report.summary())
    print(f"caught {d['tpr']:.1%} of the poison, dropped {d['fpr']:.1%} of benign samples; "
          f"clean accuracy {m['clean_acc']:.1%}, attack success {m['attack_success']:.1%}")
    return {**d, **m}


if __name__ == "__main__":
    main()
