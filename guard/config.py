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
        3, ge=0, description="first scan when this epoch starts (after this many full epochs). A backdoor shows "
                             "fully only once it is learned from every poisoned sample: on 10,000 CIFAR-10 images "
                             "(79 steps an epoch) a first scan after 2 epochs caught 89 % of Blended 5 %, after 3 "
                             "or 4 epochs 99.8 / 100 %; a second look one epoch after dropping the first 89 % "
                             "found no more (the trigger fades once most of its samples are gone)")
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
        3.0, gt=0, description="a sample is out of the benign spread when its score is this many benign "
                               "standard deviations out (locating and confirming)")
    cluster_share: float = Field(
        0.16, gt=0, le=1, description="a class holds a separate cluster when this share of its screened samples "
                                      "is out of the benign spread on the discriminant (trusted reference only) ...")
    separation_z: float = Field(
        6.0, gt=0, description="... or when at least min_cluster is, with a median discriminant above this "
                               "(benign standard deviations)")
    screen_per_class: int = Field(
        512, ge=16, description="samples per candidate class screened before a full confirming pass")
    flag_z: float = Field(
        2.0, gt=0, description="in a class that holds a separate cluster, quarantine samples whose "
                               "discriminant is above this (benign standard deviations)")
    probe_shrinkage: float = Field(
        0.8, gt=0, le=1, description="linear probe of a confirmed cluster: LDA covariance shrinkage towards "
                                     "the average variance (1: no covariance, a mean-difference direction)")
    min_cluster: float = Field(
        0.01, gt=0, lt=1, description="minimum share of a class, in excess of the calibrated false-alarm "
                                      "rate, that must be flagged before the class is acted on")
    class_drop_warn: float = Field(0.2, gt=0, le=1, description="warn loudly when a class loses more than this share")
    class_drop_cap: float = Field(0.75, gt=0, le=1, description="never drop more than this share of a class")

    # trusted data
    min_trusted_per_class: int = Field(10, ge=2, description="smallest trusted set per class that is accepted")
    trust_free_per_class: int = Field(
        200, ge=10, description="trust-free mode: training samples per class used to build the reference")

    # remedy
    remedy: Literal["unlearn", "restart", "none"] = Field(
        "unlearn", description="after new quarantines: 'unlearn' the trigger, 'restart' from the initial "
                               "weights, or 'none'")
    unlearn_steps: int = Field(60, ge=1, description="optimizer steps of one unlearning at least (up to 3x as many "
                                                     "until held-out quarantined samples are fitted no more than by "
                                                     "chance)")
    unlearn_lr: float = Field(0.01, gt=0, description="SGD learning rate used for unlearning")

    # sampling
    shuffle: bool = True
    seed: int = 0
    pad_epochs: bool = Field(
        False, description="keep every epoch as long as the full dataset by drawing extra kept samples, so "
                           "step counts and LR schedules computed from the initial length stay exact")

    # execution
    batch_size: int = Field(256, ge=1, description="scan batch size")
    num_workers: int = Field(0, ge=0, description="DataLoader workers used by scans")
    device: str | None = Field(None, description="scan device; None uses the model's device")
    amp: bool = Field(True, description="autocast the guard's own passes, scans and unlearning (bf16 where "
                                       "supported; else fp16 for scans, float32 for unlearning); features are "
                                       "pooled and scored in float32")
    channels_last: bool = Field(
        True, description="feed 4-D image inputs of the guard's own passes in channels_last memory format (the "
                          "model's weights are left as they are): with amp, oneDNN's bf16 convolutions on CPU run "
                          "about 2x faster than on contiguous inputs")
    num_classes: int | None = Field(None, ge=2, description="None infers it from the labels and the model")
    input_key: str | list[str] | None = Field(None, description="dict items: key(s) of the model input")
    label_key: str | None = Field(None, description="dict items: key of the label")
    progress: bool = Field(True, description="log scan progress")

    @model_validator(mode="after")
    def _check(self) -> "GuardConfig":
        if self.class_drop_warn > self.class_drop_cap:
            raise ValueError(f"class_drop_warn ({self.class_drop_warn}) must not exceed class_drop_cap "
                             f"({self.class_drop_cap})")
        return self
