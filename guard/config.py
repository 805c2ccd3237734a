"""GuardConfig: every knob of the guard, validated by pydantic, with defaults that work."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class GuardConfig(BaseModel):
    """Settings of a :class:`~guard.GuardedDataset` (and of :class:`~guard.InputFilter`).

    >>> from guard import GuardConfig
    >>> GuardConfig(warmup_epochs=2, scan_every=2).remedy
    'unlearn'
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # schedule
    warmup_epochs: int = Field(
        3, ge=0, description="first scan when this epoch starts (after this many full epochs)")
    scan_every: int = Field(2, ge=1, description="then scan every this many epochs")
    max_scans: int | None = Field(None, ge=1, description="stop scheduled scans after this many (None: no limit)")

    # layers and features
    layers: list[str] | None = Field(None, description="module names to analyse; None discovers them")
    pool_grid: int = Field(4, ge=0, description="feature maps are average-pooled to grid x grid (0: keep all)")
    critical_rule: Literal["guard", "paper"] = Field(
        "guard", description="'guard': separation-tested layer window; 'paper': Jebreel et al.'s rule")

    # scoring and decision
    window: int = Field(2, ge=1, description="guard rule: score over this many layers (largest excess first)")
    threshold_z: float = Field(
        3.0, gt=0, description="out of the benign spread: this many benign standard deviations out")
    cluster_share: float = Field(
        0.16, gt=0, le=1, description="separate cluster: this share of the screened class far out (trusted only)")
    separation_z: float = Field(
        6.0, gt=0, description="... or min_cluster of it, with a median this many standard deviations out")
    screen_per_class: int = Field(
        512, ge=16, description="samples per candidate class screened before a full confirming pass")
    flag_z: float = Field(
        2.0, gt=0, description="in a class that holds a separate cluster, quarantine samples whose "
                               "discriminant is above this (benign standard deviations)")
    probe_shrinkage: float = Field(
        0.8, gt=0, le=1, description="the cluster probe's LDA shrinkage (1: a mean-difference direction)")
    min_cluster: float = Field(
        0.01, gt=0, lt=1, description="least share of a class beyond the false-alarm rate that is acted on")
    class_drop_warn: float = Field(0.2, gt=0, le=1, description="warn when a class loses more than this share")
    class_drop_cap: float = Field(0.75, gt=0, le=1, description="never drop more than this share of a class")

    # trusted data
    min_trusted_per_class: int = Field(10, ge=2, description="smallest trusted set per class that is accepted")
    trust_free_per_class: int = Field(
        200, ge=10, description="trust-free mode: training samples per class in the reference")

    # remedy
    remedy: Literal["unlearn", "restart", "none"] = Field(
        "unlearn", description="after quarantines: 'unlearn' the trigger, 'restart' from the first weights, 'none'")
    unlearn_steps: int = Field(60, ge=1, description="least unlearning steps (up to 3x, until fitted at chance)")
    unlearn_lr: float = Field(0.01, gt=0, description="unlearning SGD learning rate (without optimizer=)")

    # sampling
    shuffle: bool = True
    seed: int = 0
    pad_epochs: bool = Field(
        False, description="keep every epoch at the full length (kept samples topped up)")

    # execution
    batch_size: int = Field(256, ge=1, description="scan batch size")
    num_workers: int = Field(0, ge=0, description="DataLoader workers used by scans")
    device: str | None = Field(None, description="scan device; None uses the model's device")
    amp: bool = Field(True, description="autocast the guard's passes (bf16; fp16 scans where bf16 is missing)")
    channels_last: bool = Field(
        True, description="feed the guard's 4-D image batches in channels_last memory format")
    num_classes: int | None = Field(None, ge=2, description="None infers it from the labels and the model")
    input_key: str | list[str] | None = Field(None, description="dict items: key(s) of the model input")
    label_key: str | None = Field(None, description="dict items: key of the label")
    progress: bool = Field(True, description="progress bars (terminal, notebook) or log lines of long passes")

    @model_validator(mode="after")
    def _check(self) -> "GuardConfig":
        if self.class_drop_warn > self.class_drop_cap:
            raise ValueError(f"class_drop_warn ({self.class_drop_warn}) must not exceed class_drop_cap "
                             f"({self.class_drop_cap})")
        return self
