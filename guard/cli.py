"""The ``guard`` command: config-driven runs and their reports.

    guard train CONFIG.yaml [--output DIR]     train with the guard; write the run directory
    guard scan CONFIG.yaml --checkpoint PATH   score a trained model once (the paper's setting)
    guard report RUN_DIR                       print the run's summary and re-render its plots
    guard restore RUN_DIR --indices 3 17 ...   bring quarantined samples back (recorded)
    guard config --schema                      the JSON schema of CONFIG

A run directory holds ``config.json`` (the validated config), ``results.json`` (detection and
attack metrics), ``report.json``, ``quarantine.csv``, ``samples.csv``, ``checkpoint.pt`` and the
PNG plots of :mod:`guard.plots`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from loguru import logger

from guard.errors import GuardError

if TYPE_CHECKING:  # pragma: no cover - imported where used, so `guard --help` does not load torch
    import numpy as np

    from guard.runconfig import RunConfig

_WRITES = ("report.json", "results.json", "quarantine.csv", "samples.csv")
_DEFAULT_HANDLER = [0]       # id of loguru's default handler (put back under a new id after each command)


def _results(r: dict[str, Any]) -> dict[str, Any]:
    keep = ("guarded", "unguarded", "warmup", "paper_rule", "trigger_floor", "n_train", "layers",
            "epoch_seconds_median", "scan_seconds", "guard_scan_memory_mb")
    return {k: r[k] for k in keep if k in r}


def _load_ckpt(path: Path) -> dict[str, Any]:
    """A run's ``checkpoint.pt`` (``{"model": state_dict, "guard": ..., "spec": ...}``) or a plain
    ``state_dict``, read with ``weights_only=True``: tensors and plain containers only, no code."""
    import torch

    if not path.is_file():
        raise GuardError(f"{path} does not exist; point at a run directory written by `guard train`")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                 # pickled objects a weights-only load refuses to run
        raise GuardError(f"{path} cannot be read as weights only ({str(e).splitlines()[0][:200]}); save "
                         "the model's state_dict (torch.save(model.state_dict(), path)) or a dict holding it "
                         "under 'model'") from None
    if isinstance(ckpt, dict) and "model" in ckpt:
        return ckpt
    if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return {"model": ckpt}             # a plain state_dict
    raise GuardError(f"{path} holds {type(ckpt).__name__}, not a state_dict or a dict with 'model'; save "
                     "torch.save(model.state_dict(), path)")


def _guard_for(cfg: RunConfig, ckpt: dict[str, Any], **overrides: Any):
    """The run's data and a GuardedDataset over it with the checkpoint's model (and guard state)."""
    from guard.experiment import prepare
    from guard.guarded import GuardedDataset
    from guard.config import GuardConfig

    spec = cfg.spec()
    data = prepare(spec)
    model = data.make_model()
    model.load_state_dict(ckpt["model"])
    gcfg = GuardConfig(**{"seed": spec.seed, **spec.guard, **overrides})
    gds = GuardedDataset(data.train, model, gcfg, trusted=None if spec.trust_free else data.trusted,
                         scan_dataset=data.scan)
    return data, gds


def _say(text: str) -> None:
    """What the command reports to its user: stdout, through loguru (see ``main``)."""
    logger.bind(cli_output=True).info(text)


def _plots(run_dir: Path, images: np.ndarray) -> None:
    """Render the run's plots; a missing matplotlib only costs the plots."""
    from guard.plots import render

    try:
        paths = render(run_dir, images)
    except ImportError as e:
        logger.warning("no plots: {}", e)
        return
    logger.info("plots: {}", ", ".join(p.name for p in paths))


def _train_images(cfg: RunConfig) -> np.ndarray:
    from guard.experiment import prepare

    return prepare(cfg.spec()).train.images.numpy()


def cmd_train(a: argparse.Namespace) -> int:
    from guard.experiment import prepare, run
    from guard.report import GuardReport
    from guard.runconfig import RunConfig

    cfg = RunConfig.load(a.config)
    out = Path(a.output or cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(cfg.model_dump_json(indent=2))
    data = prepare(cfg.spec())
    r = run(cfg.spec(), compare=cfg.train.compare, out_dir=out, data=data)
    (out / "results.json").write_text(json.dumps(_results(r), indent=1, default=float))
    if cfg.attack:                        # the ground truth is known: keep the numbers with the report
        report = GuardReport.load_json(out / "report.json")
        report.evaluation = {k: float(v) for k, v in r["guarded"].items()}
        report.save_json(out / "report.json")
    _plots(out, data.train.images.numpy())
    _say(r["report"].summary())
    g = r["guarded"]
    _say(f"quarantined {g['flagged']:,}; clean accuracy {g['clean_acc']:.1%}"
         + (f"; TPR {g['tpr']:.1%}, FPR {g['fpr']:.2%}, attack success {g['attack_success']:.1%}"
            if cfg.attack else ""))
    _say(f"run directory: {out}")
    return 0


def cmd_scan(a: argparse.Namespace) -> int:
    from guard.experiment import detection
    from guard.runconfig import RunConfig

    cfg = RunConfig.load(a.config)
    ckpt = _load_ckpt(Path(a.checkpoint))
    out = Path(a.output or cfg.output)
    there = [f for f in _WRITES if (out / f).exists()]
    if there and not a.overwrite:
        raise GuardError(f"{out} already holds {there} (a training run's files, say); pass --output NEW_DIR, or "
                         "--overwrite to replace them")
    data, gds = _guard_for(cfg, ckpt, remedy="none")
    gds.scan()
    gds.save(out)
    res = detection(gds.quarantined, data.poisoned, len(data.labels))
    (out / "results.json").write_text(json.dumps({"scan": res}, indent=1, default=float))
    _plots(out, data.train.images.numpy())
    _say(gds.report.summary())
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from guard.report import GuardReport
    from guard.runconfig import RunConfig

    path = Path(a.run_dir) / "report.json"
    if not path.is_file():
        raise GuardError(f"{path} does not exist; pass a run directory written by `guard train` or `guard scan`")
    _say(GuardReport.load_json(path).summary())
    if a.plots and (Path(a.run_dir) / "config.json").is_file():
        _plots(Path(a.run_dir), _train_images(RunConfig.load(Path(a.run_dir) / "config.json")))
    results = Path(a.run_dir) / "results.json"
    if results.is_file():
        g = json.loads(results.read_text()).get("guarded")
        if g:
            _say(f"  final: clean accuracy {g['clean_acc']:.1%}, attack success {g['attack_success']:.1%}, "
                 f"TPR {g['tpr']:.1%}, FPR {g['fpr']:.2%}")
    return 0


def cmd_restore(a: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from guard.runconfig import RunConfig

    run_dir = Path(a.run_dir)
    cfg = RunConfig.load(run_dir / "config.json")
    ckpt = _load_ckpt(run_dir / "checkpoint.pt")
    _, gds = _guard_for(cfg, ckpt)
    gds.load_state_dict(ckpt["guard"])
    gds.restore(np.asarray(a.indices, dtype=np.int64))
    gds.save(run_dir)
    ckpt["guard"] = gds.state_dict()
    tmp = run_dir / ".checkpoint.pt.tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, run_dir / "checkpoint.pt")
    _say(f"restored {len(set(a.indices))} samples; {len(gds.quarantined):,} remain quarantined")
    return 0


def cmd_config(a: argparse.Namespace) -> int:
    from guard.runconfig import RunConfig

    if a.schema:
        _say(json.dumps(RunConfig.model_json_schema(), indent=2))
    if a.check:
        RunConfig.load(a.check)
        _say(f"{a.check}: valid")
    if not (a.schema or a.check):
        _say(RunConfig().model_dump_json(indent=2))      # the defaults, as a starting point
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="guard", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="a config-driven training run with the guard")
    t.add_argument("config")
    t.add_argument("--output", help="run directory (default: the config's output)")
    t.set_defaults(fn=cmd_train)
    s = sub.add_parser("scan", help="score a trained checkpoint once and write the report")
    s.add_argument("config")
    s.add_argument("--checkpoint", required=True, help="checkpoint.pt of a run (its 'model' weights)")
    s.add_argument("--output", help="folder for the scan's files (default: the config's output)")
    s.add_argument("--overwrite", action="store_true", help="replace report/results files already in --output")
    s.set_defaults(fn=cmd_scan)
    r = sub.add_parser("report", help="print a run's summary")
    r.add_argument("run_dir")
    r.add_argument("--plots", action="store_true", help="also re-render the run's plots into its folder")
    r.set_defaults(fn=cmd_report)
    b = sub.add_parser("restore", help="bring quarantined samples of a run back")
    b.add_argument("run_dir")
    b.add_argument("--indices", nargs="+", type=int, required=True)
    b.set_defaults(fn=cmd_restore)
    c = sub.add_parser("config", help="the config schema, a config check, or the defaults")
    c.add_argument("--schema", action="store_true")
    c.add_argument("--check", metavar="CONFIG")
    c.set_defaults(fn=cmd_config)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run a command. Its report goes to stdout (plain lines), the library's log to stderr (plain
    lines, one per message), through loguru handlers of its own that are removed afterwards;
    handlers you added stay, and loguru's default one is set aside meanwhile."""
    a = parser().parse_args(argv)
    for_user = lambda r: r["extra"].get("cli_output", False)  # noqa: E731
    try:
        logger.remove(_DEFAULT_HANDLER[0])   # loguru's default stderr handler: our own replaces it here
        default = True
    except ValueError:                       # already removed by the program
        default = False
    ours = [logger.add(sys.stdout, level="INFO", format="{message}", filter=for_user),
            logger.add(sys.stderr, level="WARNING" if a.quiet else "INFO", format="{message}",
                       filter=lambda r: r["name"].startswith("guard") and not for_user(r))]
    logger.enable("guard")
    try:
        return a.fn(a)
    except (ValueError, ImportError, FileNotFoundError) as e:   # bad input (GuardError is a ValueError): one line
        logger.error("guard {}: error: {}", a.command, e)
        return 2
    finally:
        logger.disable("guard")
        for i in ours:
            logger.remove(i)
        if default:
            _DEFAULT_HANDLER[0] = logger.add(sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
