"""HuggingFace ``Trainer`` adapter: a callback plus the one Trainer hook that picks the sampler.

    gds = GuardedDataset(train_ds, model, GuardConfig(), trusted=trusted_ds)
    trainer = GuardedTrainer(model=model, args=TrainingArguments(...), guarded=gds)
    trainer.train()                          # or trainer.train(resume_from_checkpoint=True)

Any other Trainer subclass (``Seq2SeqTrainer``, TRL's ``SFTTrainer``, your own) takes the guard
through the mixin, put first::

    class GuardedSFTTrainer(GuardedTrainerMixin, SFTTrainer):
        pass

Items are dicts (``pixel_values``/``input_ids``..., ``labels``); the guard passes every key but
the label to the model, as the Trainer does.

Sampler: the Trainer builds its own sampler; ``GuardedTrainer`` overrides ``_get_train_sampler``
(the hook the Trainer's maintainers point to for custom sampling) to return the guard's. The
Trainer calls ``set_epoch`` on it each epoch and a due scan runs when the epoch's iteration
starts.

Steps: the Trainer sizes the LR schedule (``max_steps``) from the loader's length at the start.
The guard keeps every epoch at that length (``pad_epochs=True``, kept samples topped up), so the
schedule is exact; with ``pad_epochs=False`` epochs shrink by the quarantined share and training
ends with the schedule that much short of its end (a warning says so).

Checkpoints: the callback writes ``guard_state.json`` into every ``checkpoint-N`` folder, and
``GuardedTrainer.train(resume_from_checkpoint=...)`` reads it back, so the quarantine resumes
exactly. (The Trainer's own ``stateful_callbacks`` mechanism rebuilds callbacks from JSON
arguments, which cannot carry the dataset, hence a file of our own.)
"""

from __future__ import annotations

import json
import os
from typing import Any

try:
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("guard.integrations.hf needs transformers: pip install 'layerguard[hf]'") from e

from loguru import logger

from guard.errors import GuardError
from guard.guarded import GuardedDataset
from guard.integrations._common import check_loader, metrics, warn_if_never_scans
from guard.report import atomic_write

STATE_FILE = "guard_state.json"


class GuardTrainerCallback(TrainerCallback):
    """Checks the Trainer samples with the guard's sampler and saves the guard's state into
    every checkpoint folder."""

    def __init__(self, guarded: GuardedDataset) -> None:
        self.guarded = guarded

    def on_train_begin(self, args, state, control, train_dataloader=None, optimizer=None, **kwargs) -> None:
        if optimizer is not None and self.guarded.optimizer is None:
            self.guarded.optimizer = optimizer    # unlearning then steps at its current learning rate
        if train_dataloader is not None:
            check_loader(self.guarded, train_dataloader, "Trainer's train DataLoader")
        warn_if_never_scans(self.guarded, None if args.max_steps > 0 else args.num_train_epochs)
        if not self.guarded.config.pad_epochs:
            logger.warning("guard: the Trainer sized its LR schedule from the full dataset; epochs will shrink by "
                           "the quarantined share and the schedule end that much early. "
                           "GuardConfig(pad_epochs=True), the default, keeps every epoch at full length")

    def on_save(self, args, state, control, **kwargs) -> None:
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder) and state.is_world_process_zero:
            atomic_write(os.path.join(folder, STATE_FILE), json.dumps(self.guarded.state_dict()))


class GuardedTrainerMixin:
    """Makes any ``Trainer`` subclass train with the guard: its train sampler is the guard's and
    ``train_dataset`` the GuardedDataset (``guarded=gds``). Adds a :class:`GuardTrainerCallback`,
    adds the quarantine counts to every log, and restores the guard's state on
    ``train(resume_from_checkpoint=...)``. Put it before the Trainer class in the bases."""

    def __init__(self, *args: Any, guarded: GuardedDataset, **kwargs: Any) -> None:
        if kwargs.setdefault("train_dataset", guarded) is not guarded:
            raise GuardError("GuardedTrainer trains on the GuardedDataset itself: pass train_dataset=None (or the "
                             "same GuardedDataset) and guarded=gds")
        if not isinstance(self, Trainer):
            raise GuardError(f"{type(self).__name__}: GuardedTrainerMixin goes before a transformers Trainer class in "
                             "the bases, e.g. class MyTrainer(GuardedTrainerMixin, Seq2SeqTrainer)")
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self.guarded = guarded
        if not any(isinstance(cb, GuardTrainerCallback) for cb in self.callback_handler.callbacks):
            self.add_callback(GuardTrainerCallback(guarded))

    def _get_train_sampler(self, train_dataset=None):
        return self.guarded.sampler

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        super().log({**logs, **metrics(self.guarded)}, *args, **kwargs)  # type: ignore[misc]

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        if resume_from_checkpoint:
            path = (get_last_checkpoint(self.args.output_dir) if resume_from_checkpoint is True
                    else str(resume_from_checkpoint))
            state_file = os.path.join(path, STATE_FILE) if path else None
            if state_file is None or not os.path.isfile(state_file):
                raise GuardError(f"no {STATE_FILE} in checkpoint {path!r}: it was not saved by a GuardedTrainer, so "
                                 "the quarantine cannot be restored; resume from a checkpoint this trainer wrote")
            with open(state_file) as f:
                self.guarded.load_state_dict(json.load(f))
            logger.info("guard: restored {} quarantined samples from {}", len(self.guarded.quarantined), path)
        return super().train(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]


class GuardedTrainer(GuardedTrainerMixin, Trainer):
    """A ``Trainer`` with the guard (see :class:`GuardedTrainerMixin`)."""
