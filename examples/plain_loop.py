"""The one-line integration in a plain PyTorch loop (offline, scikit-learn digits, ~20 s on a CPU).

The loop below is an ordinary training loop; the guard adds one wrapper and one sampler.
"""

import torch
from torch import nn
from torch.utils.data import DataLoader

from guard import GuardConfig, GuardedDataset
from guard.attacks import BadNets
from guard.datasets import ArrayImageDataset, ArraySplit, load_digits, stratified_indices
from guard.models import SmallCNN

torch.manual_seed(0)
data = load_digits()
train, test = data["train"], data["test"]
trusted_idx = stratified_indices(train.labels, 20, seed=1)            # a small verified set
keep = sorted(set(range(len(train.labels))) - set(trusted_idx.tolist()))
trusted, train = train.subset(trusted_idx), train.subset(keep)
poison = BadNets(target=0, rate=0.1, seed=0).poison(train.images, train.labels)  # untrusted data

train_ds = ArrayImageDataset(ArraySplit(poison.images, poison.labels), (0.3,), (0.35,))
trusted_ds = ArrayImageDataset(trusted, (0.3,), (0.35,))
model = SmallCNN(num_classes=10, in_channels=1, width=16)
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

gds = GuardedDataset(train_ds, model, GuardConfig(warmup_epochs=4, scan_every=4), trusted=trusted_ds,
                     optimizer=opt)                 # unlearning then steps at opt's current learning rate
loader = DataLoader(gds, batch_size=64, sampler=gds.sampler)
for epoch in range(12):
    model.train()
    for x, y in loader:                        # scans run by themselves at epochs 4 and 8
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

caught = len(set(gds.quarantined.tolist()) & set(poison.poisoned.tolist()))
print(gds.report.summary())
print(f"caught {caught} of {len(poison.poisoned)} poisoned samples; {len(gds.quarantined) - caught} benign dropped")
