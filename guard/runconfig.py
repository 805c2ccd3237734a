"""Config-driven runs: one YAML/JSON file describes data, optional red-team attack, model,
training and guard settings. Validated by pydantic; a bad file gives one message per problem
naming the field, the value and what is allowed.

    >>> from guard.runconfig import RunConfig
    >>> cfg = RunConfig.model_validate({"data": {"name": "digits"}, "train": {"epochs": 4}})
    >>> cfg.guard.warmup_epochs, cfg.attack is None
    (3, True)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from guard.config import GuardConfig
from guard.errors import GuardError
from guard.experiment import RunSpec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataSection(_Strict):
    name: Literal["digits", "cifar10", "imagefolder"] = "digits"
    root: str | None = Field(None, description="cifar10: the JPEG archive (default: $GUARD_CIFAR10_ARCHIVE); "
                                               "imagefolder: folder with train/ and test/")
    download: bool = Field(False, description="cifar10: fetch it with torchvision when no archive is found")
    n_train: int | None = Field(None, ge=10, description="stratified training subset size (None: all)")
    n_test: int | None = Field(None, ge=10, description="stratified test subset size for the measurements (None: all)")
    trusted_per_class: int | None = Field(None, ge=2, description="verified samples per class held out as the "
                                                                   "trusted set (default: 20 for digits, else 100)")
    trust_free: bool = Field(False, description="run without the trusted set (weaker; see README)")
    augment: bool = False


class AttackSection(_Strict):
    name: Literal["badnets", "blended", "wanet", "wanet_noise", "all2all", "sig", "adaptive_blend",
                  "adaptive_patch", "label_consistent"]
    rate: float = Field(0.1, gt=0, lt=1, description="share of the training set poisoned")
    target: int = Field(0, ge=0)
    kwargs: dict[str, Any] = Field(default_factory=dict, description="further fields of the attack, e.g. cover_rate")


class ModelSection(_Strict):
    name: str = Field("auto", description="auto (small CNN for digits, CIFAR ResNet-18 otherwise), a "
                                          "torchvision.models name, or 'package.module:callable'")
    width: int = Field(16, ge=1, description="auto models: base width")
    kwargs: dict[str, Any] = Field(default_factory=dict)


class TrainSection(_Strict):
    epochs: int = Field(6, ge=1)
    lr: float = Field(0.01, gt=0)
    batch_size: int = Field(128, ge=1)
    seed: int = 0
    compare: bool = Field(False, description="also train the unguarded twin (same warm-up) and report both")


class RunConfig(_Strict):
    """A whole run. Every section has defaults; ``guard`` takes any :class:`~guard.GuardConfig` field."""

    data: DataSection = Field(default_factory=DataSection)
    attack: AttackSection | None = None
    model: ModelSection = Field(default_factory=ModelSection)
    train: TrainSection = Field(default_factory=TrainSection)
    guard: GuardConfig = Field(default_factory=GuardConfig)
    output: str = Field("runs/guard", description="run directory (created)")

    @model_validator(mode="after")
    def _scans_fit_in_training(self) -> "RunConfig":
        if self.data.name == "imagefolder" and not self.data.root:
            raise ValueError("data.root: imagefolder needs the folder holding train/ and test/ (data.root is "
                             "RunSpec's archive=)")
        if self.guard.warmup_epochs >= self.train.epochs:
            raise ValueError(f"guard.warmup_epochs ({self.guard.warmup_epochs}) must be below train.epochs "
                             f"({self.train.epochs}): the first scan runs when epoch warmup_epochs starts, so "
                             "this run would never scan")
        return self

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        """Read a YAML (.yaml/.yml) or JSON file; errors name the file and every bad field."""
        path = Path(path)
        if not path.is_file():
            raise GuardError(f"config file {path} does not exist")
        text = path.read_text()
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                raw = yaml.safe_load(text)
            else:
                raw = json.loads(text)
        except Exception as e:  # noqa: BLE001 - any parse error becomes one clear message
            raise GuardError(f"{path}: not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'}: {e}") from None
        return cls.parse(raw or {}, str(path))

    @classmethod
    def parse(cls, raw: Any, source: str = "config") -> "RunConfig":
        if not isinstance(raw, dict):
            raise GuardError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            raise GuardError(f"{source}: " + "; ".join(_explain(err) for err in e.errors())) from None

    def spec(self) -> RunSpec:
        d, a, m, t = self.data, self.attack, self.model, self.train
        return RunSpec(data=d.name, attack=a.name if a else None, rate=a.rate if a else 0.0,
                       target=a.target if a else 0, attack_kwargs=dict(a.kwargs) if a else {}, n_train=d.n_train,
                       n_test=d.n_test,
                       trusted_per_class=d.trusted_per_class or (20 if d.name == "digits" else 100),
                       trust_free=d.trust_free, epochs=t.epochs, lr=t.lr, batch_size=t.batch_size, width=m.width,
                       augment=d.augment, seed=t.seed, archive=d.root, download=d.download, model=m.name,
                       model_kwargs=dict(m.kwargs), guard=self.guard.model_dump(exclude_unset=True))


def _explain(err: dict[str, Any]) -> str:
    where = ".".join(str(p) for p in err["loc"]) or "config"
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown field (value {err['input']!r}); check the spelling against `guard config --schema`"
    return f"{where} = {err.get('input')!r}: {err['msg']}"
