"""Framework adapters over the one core in :mod:`guard`, installed as ``guard.integrations``.

* :mod:`guard.integrations.lightning` -- ``GuardCallback`` for PyTorch Lightning 2.x
  (``pip install layerguard[lightning]``).
* :mod:`guard.integrations.hf` -- ``GuardTrainerCallback`` and ``GuardedTrainer`` for the
  HuggingFace ``Trainer`` (``pip install layerguard[hf]``).

Each adapter only connects the framework's epoch boundaries, sampler and checkpoints to a
:class:`~guard.GuardedDataset`; detection, quarantine and remedy live in the core.
"""
