"""The `guard` command: configs validated with the field named, end-to-end runs, report and restore."""

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from guard.cli import main
from guard.errors import GuardError
from guard.experiment import RunSpec, prepare
from guard.runconfig import RunConfig

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_example_configs_load(path):
    cfg = RunConfig.load(path)
    assert cfg.spec().epochs == cfg.train.epochs


INVALID = [
    ({"data": {"name": "mnist"}}, "data.name = 'mnist'"),
    ({"data": {"n_train": 5}}, "data.n_train = 5"),
    ({"data": {"n_test": 5}}, "data.n_test = 5"),
    ({"data": {"trusted_per_class": 1}}, "data.trusted_per_class = 1"),
    ({"attack": {"name": "badnets", "rate": 1.5}}, "attack.rate = 1.5"),
    ({"attack": {"rate": 0.1}}, "attack.name"),
    ({"attack": {"name": "trojan"}}, "attack.name = 'trojan'"),
    ({"train": {"epochs": 0}}, "train.epochs = 0"),
    ({"train": {"lr": -1}}, "train.lr = -1"),
    ({"model": {"width": 0}}, "model.width = 0"),
    ({"modle": {"name": "resnet18"}}, "modle: unknown field"),
    ({"guard": {"scan_every": 0}}, "guard.scan_every = 0"),
    ({"guard": {"warmup_epoch": 2}}, "guard.warmup_epoch: unknown field"),
    ({"guard": {"critical_rule": "best"}}, "guard.critical_rule = 'best'"),
    ({"guard": {"thresholds": {"class_drop_warn": 0.9, "class_drop_cap": 0.5}}}, "class_drop_warn (0.9) must not exceed"),
    (["data", "train"], "top level must be a mapping"),
    ({"train": {"epochs": 4}, "guard": {"warmup_epochs": 4}}, "guard.warmup_epochs (4) must be below train.epochs (4)"),
]


def test_n_test_measures_on_a_stratified_subset_of_the_test_split():
    spec = RunConfig.model_validate({"data": {"n_test": 100}, "attack": {"name": "badnets"}}).spec()
    part, whole = prepare(spec), prepare(replace(spec, n_test=None))
    assert spec.n_test == 100 and np.bincount(part.test.labels).tolist() == [10] * 10
    flat = lambda ds: {x.contiguous().numpy().tobytes() for x in ds.images}  # noqa: E731
    assert flat(part.test) <= flat(whole.test)                     # drawn from the test split, training untouched
    assert np.array_equal(part.labels, whole.labels) and len(part.triggered) == 90   # the target class's 10 left out
    with pytest.raises(ValueError, match="n_test=5 leaves no test image"):
        prepare(RunSpec(data="digits", n_test=5))


@pytest.mark.parametrize("raw, named", INVALID, ids=[m.split()[0] for _, m in INVALID])
def test_invalid_configs_name_the_field(raw, named):
    with pytest.raises(GuardError) as e:
        RunConfig.parse(raw)
    assert named in str(e.value)


def test_unreadable_config_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [name: digits\n")
    with pytest.raises(GuardError, match="not valid YAML"):
        RunConfig.load(bad)
    with pytest.raises(GuardError, match="does not exist"):
        RunConfig.load(tmp_path / "missing.yaml")
    assert main(["config", "--check", str(bad)]) == 2


def test_schema_lists_every_section(capsys):
    assert main(["config", "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"data", "attack", "model", "train", "guard", "output"} <= set(schema["properties"])


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_train_report_restore_and_scan_on_digits(tmp_path, capsys):
    plt = pytest.importorskip("matplotlib.pyplot")
    cfg = yaml.safe_load((CONFIGS / "digits_badnets.yaml").read_text())
    cfg["train"]["compare"] = False
    cfg["output"] = str(tmp_path / "run")
    path = tmp_path / "digits.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} >= {"config.json", "results.json", "report.json", "quarantine.csv",
                                                "samples.csv", "checkpoint.pt"}
    g = json.loads((run / "report.json").read_text())["evaluation"]
    assert g["tpr"] >= 0.95 and g["fpr"] <= 0.02 and g["attack_success"] <= 0.05
    assert g == json.loads((run / "results.json").read_text())["guarded"]
    quarantined = _rows(run / "quarantine.csv")
    assert len(quarantined) == g["flagged"]

    for name in ("separation", "scores", "quarantine_per_class", "suspicious"):
        img = plt.imread(run / f"{name}.png")
        assert img.shape[0] > 200 and img.shape[1] > 200 and img[..., :3].std() > 0.05, name   # drawn, not blank
    (run / "scores.png").unlink()
    before = sorted((p.name, p.stat().st_mtime_ns) for p in run.iterdir())
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "quarantined" in out and "layers (discovered, early to late): block1, block2, block3, block4, head" in out
    assert sorted((p.name, p.stat().st_mtime_ns) for p in run.iterdir()) == before         # reads, writes nothing
    assert main(["report", str(run), "--plots"]) == 0
    assert (run / "scores.png").stat().st_size > 10_000                                     # re-rendered, as asked

    back = [int(quarantined[0]["index"]), int(quarantined[1]["index"])]
    assert main(["restore", str(run), "--indices", *map(str, back)]) == 0
    report = json.loads((run / "report.json").read_text())
    assert len(report["quarantine"]) == g["flagged"] - 2 and report["restores"][-1]["indices"] == sorted(back)
    status = {int(r["index"]): r["status"] for r in _rows(run / "samples.csv")}
    assert all(status[i] == "restored" for i in back)
    assert main(["restore", str(run), "--indices", str(back[0])]) == 2     # not quarantined any more

    trained = (run / "report.json").read_bytes()
    assert main(["scan", str(path), "--checkpoint", str(run / "checkpoint.pt")]) == 2      # would overwrite the run
    assert "already holds ['report.json', 'results.json'" in capsys.readouterr().err
    assert (run / "report.json").read_bytes() == trained
    assert main(["scan", str(path), "--checkpoint", str(run / "checkpoint.pt"), "--output",
                 str(tmp_path / "scan")]) == 0
    scanned = json.loads((tmp_path / "scan" / "report.json").read_text())
    assert len(scanned["scans"]) == 1 and scanned["scans"][0]["remedy"] is None
    # a plain state_dict is a checkpoint too, read weights-only; a pickled object is refused
    torch.save(torch.load(run / "checkpoint.pt", weights_only=True)["model"], tmp_path / "weights.pt")
    assert main(["scan", str(path), "--checkpoint", str(tmp_path / "weights.pt"), "--output",
                 str(tmp_path / "scan2")]) == 0
    torch.save({"model": _Pickled()}, tmp_path / "pickled.pt")
    assert main(["scan", str(path), "--checkpoint", str(tmp_path / "pickled.pt"), "--output",
                 str(tmp_path / "scan3")]) == 2
    assert "cannot be read as weights only" in capsys.readouterr().err


class _Pickled:
    """An object a weights-only load must refuse to unpickle."""


@pytest.mark.cifar
def test_train_on_cifar10_subset_trust_free(cifar_archive, tmp_path):
    # 6,000 real CIFAR-10 images, width-16 ResNet-18, no trusted set; BadNets 10 % is learned within 2 epochs
    # here. The same run with a trusted set goes through Lightning (test_lightning.py)
    cfg = {"data": {"name": "cifar10", "root": cifar_archive, "n_train": 6000, "n_test": 2000, "trust_free": True},
           "attack": {"name": "badnets", "rate": 0.1}, "train": {"epochs": 3},
           "guard": {"warmup_epochs": 2, "scan_every": 2}, "output": str(tmp_path / "run")}
    path = tmp_path / "cifar.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    g, paper = report["evaluation"], res["paper_rule"][0]
    assert report["scans"][0]["remedy_fit_before"] >= 0.9   # the trigger was learned before the scan
    assert g["tpr"] >= 0.98 and g["fpr"] <= 0.01
    assert g["attack_success_correct"] <= 0.05               # unlearned: the trigger no longer works
    assert g["f1"] > paper["f1"]                              # the paper's rule on the same scan
    assert (tmp_path / "run" / "checkpoint.pt").stat().st_size > 100_000


def test_imagefolder_data_and_a_torchvision_model_by_path(tmp_path, capsys):
    # a folder of PNGs in train/<class>/ and test/<class>/, a model named 'package.module:callable'
    from PIL import Image
    import numpy as np

    g = np.random.default_rng(0)
    for split, n in (("train", 60), ("test", 10)):
        for c in ("ants", "bees", "wasps"):
            (tmp_path / "imgs" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(g.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                    tmp_path / "imgs" / split / c / f"{i}.png")
    cfg = {"data": {"name": "imagefolder", "root": str(tmp_path / "imgs"), "trusted_per_class": 10},
           "model": {"name": "torchvision.models:mobilenet_v2", "kwargs": {"num_classes": 3, "width_mult": 0.25}},
           "train": {"epochs": 2, "batch_size": 32}, "guard": {"warmup_epochs": 1, "remedy": "none"},
           "output": str(tmp_path / "run")}
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    assert main(["train", str(path)]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["n_samples"] == 150 and report["num_classes"] == 3      # 180 train images - 30 trusted
    assert len(report["scans"]) == 1 and any(layer.startswith("features.") for layer in report["layers"])
    bad = {**cfg, "model": {"name": "torchvision.models:no_such_net"}}
    path.write_text(json.dumps(bad))
    capsys.readouterr()
    assert main(["train", str(path)]) == 2                                 # one line, no traceback
    err = capsys.readouterr().err
    assert err.startswith("guard train: error: model 'torchvision.models:no_such_net' cannot be imported")
    assert len(err.strip().splitlines()) == 1
    path.write_text(json.dumps({**cfg, "data": {"name": "imagefolder"}}))
    assert main(["train", str(path)]) == 2
    assert "data.root: imagefolder needs the folder holding train/ and test/" in capsys.readouterr().err


def test_the_default_config_is_a_runnable_config(tmp_path, capsys):
    assert main(["config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    cfg["output"] = str(tmp_path / "run")
    (tmp_path / "defaults.json").write_text(json.dumps(cfg))
    assert main(["train", str(tmp_path / "defaults.json")]) == 0          # digits, no attack: nothing dropped
    assert json.loads((tmp_path / "run" / "report.json").read_text())["quarantine"] == []
