"""guard: find and drop backdoor-poisoned training samples while the model trains.

One line in an existing loop::

    gds = GuardedDataset(train_ds, model, GuardConfig(warmup_epochs=2, scan_every=2), trusted=trusted_ds)
    loader = DataLoader(gds, batch_size=128, sampler=gds.sampler)   # then train as usual
"""

from guard.config import GuardConfig
from guard.errors import GuardError
from guard.filter import InputFilter
from guard.guarded import GuardedDataset
from guard.report import GuardReport
from guard.sampler import GuardSampler

__all__ = ["GuardConfig", "GuardError", "InputFilter", "GuardReport", "GuardSampler", "GuardedDataset"]
__version__ = "0.1.0"
