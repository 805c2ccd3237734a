"""GuardConfig: every knob of the guard, validated by pydantic, with defaults that work."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from guard.thresholds import Thresholds

# flat names the decision numbers had before ``thresholds`` (still accepted, e.g. in saved reports) -> the
# Thresholds fields that now hold what each one set
_LEGACY = {"threshold_z": ("out_z", "screen_z", "follow_z", "filter_z"), "min_cluster": ("min_excess", "min_screen_share"),
           **{k: (k,) for k in ("window", "cluster_share", "separation_z", "screen_per_class", "flag_z",
                                "probe_shrinkage", "class_drop_warn", "class_drop_cap")}}


class GuardConfig(BaseModel):
    """Settings of a :class:`~guard.GuardedDataset` (and of :class:`~guard.InputFilter`).

    >>> from guard import GuardConfig
    >>> GuardConfig(warmup_epochs=2, scan_every=2).remedy
    'unlearn'
    >>> GuardConfig(thresholds={"class_drop_cap": 0.5}).thresholds.class_drop_cap
    0.5
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # schedule
    warmup_epochs: int = Field(
        3, ge=0, description="first scan when this epoch starts (after this many full epochs)")
    scan_every: int = Field(2, ge=1, description="then scan every this many epochs")
    scan_backoff: int = Field(
        1, ge=1, description="each scan that changes nothing doubles the gap to the next, up to this x scan_every (1: fixed)")
    max_scans: int | None = Field(None, ge=1, description="stop scheduled scans after this many (None: no limit)")
    scan_sample_per_class: int | None = Field(
        512, ge=1, description="scans after the first score at most this many kept samples a class, and rescan all where that acts (None: all)")

    # layers and features
    layers: list[str] | None = Field(None, description="module names to analyse; None discovers them")
    pool_grid: int = Field(4, ge=0, description="feature maps are average-pooled to grid x grid (0: keep all)")
    scan_inputs: bool = Field(
        True, description="image inputs: test the images too (guard.inputs), against trusted and other classes' images")
    mirror_images: bool | Literal["auto"] = Field(
        "auto", description="image inputs: also hold each class's images against their mirror images; "
                            "'auto': where the trusted images (trust-free: most training images) are mirror-symmetric")
    scan_view: bool = Field(
        True, description="without scan_dataset, scans read the training data with its random torchvision transforms off")
    critical_rule: Literal["guard", "paper"] = Field(
        "guard", description="'guard': separation-tested layer window; 'paper': Jebreel et al.'s rule")

    # decision
    thresholds: Thresholds = Field(default_factory=Thresholds, description="the decision rules' numbers")

    # trusted data
    min_trusted_per_class: int = Field(10, ge=2, description="smallest trusted set per class that is accepted")
    trust_free_per_class: int = Field(
        200, ge=10, description="trust-free mode: training samples per class in the reference")

    # remedy
    remedy: Literal["unlearn", "restart", "none"] = Field(
        "unlearn", description="after quarantines: 'unlearn' the trigger, 'restart' from the first weights, 'none'")
    unlearn_steps: int = Field(60, ge=1, description="least unlearning steps (up to 3x, until fitted at chance)")
    unlearn_batch: int = Field(64, ge=2, description="samples per unlearning step, half quarantined and half kept")
    unlearn_lr: float = Field(0.01, gt=0, description="unlearning learning rate: SGD's without optimizer=, the cap with it")
    unlearn_momentum: float = Field(0.9, ge=0, lt=1, description="unlearning SGD momentum (without optimizer=)")

    # sampling
    shuffle: bool = True
    seed: int = 0
    pad_epochs: bool = Field(
        True, description="keep every epoch at the full length (kept samples topped up); False: epochs shrink")

    # execution
    batch_size: int = Field(256, ge=1, description="scan batch size")
    num_workers: int | None = Field(
        None, ge=0, description="DataLoader workers of the guard's passes; None: the train loader's (Lightning, HF), else 0")
    keep_mb: float | None = Field(
        None, ge=0, description="host MB a scan may keep features and images in instead of reading them again; "
                                "None: a quarter of the memory available, at least 512")
    device: str | None = Field(None, description="scan device; None uses the model's device")
    amp: bool = Field(True, description="autocast the guard's passes: bf16 where the device computes it natively, "
                                         "else fp16 scans on a GPU, float32 on a CPU")
    channels_last: bool = Field(
        True, description="feed the guard's 4-D image batches in channels_last memory format")
    num_classes: int | None = Field(None, ge=2, description="None infers it from the labels and the model")
    input_key: str | list[str] | None = Field(None, description="dict items: key(s) of the model input")
    label_key: str | None = Field(None, description="dict items: key of the label")
    progress: bool = Field(True, description="progress bars (terminal, notebook) or log lines of long passes")

    @model_validator(mode="before")
    @classmethod
    def _legacy(cls, data: Any) -> Any:
        """Decision numbers given flat (``GuardConfig(cluster_share=0.2)``) move into ``thresholds``."""
        if isinstance(data, dict) and set(data) & set(_LEGACY):
            data = dict(data)
            th = data.get("thresholds", {})
            th = dict(th.model_dump(exclude_unset=True) if isinstance(th, Thresholds) else th)
            for old in sorted(set(data) & set(_LEGACY)):
                value = data.pop(old)
                for new in _LEGACY[old]:
                    th.setdefault(new, value)
            data["thresholds"] = th
        return data

    @model_validator(mode="after")
    def _check(self) -> "GuardConfig":
        t = self.thresholds
        if t.class_drop_warn > t.class_drop_cap:
            raise ValueError(f"thresholds.class_drop_warn ({t.class_drop_warn}) must not exceed "
                             f"thresholds.class_drop_cap ({t.class_drop_cap})")
        return self
