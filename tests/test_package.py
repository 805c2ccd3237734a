"""A library's manners: ranges, not pins; its version from the package metadata; quiet until asked."""

import importlib.metadata as metadata
import subprocess
import sys
from pathlib import Path

import guard


def test_dependencies_are_ranges_not_pins():
    reqs = [r for r in metadata.requires("layerguard") if "extra ==" not in r]
    assert any(r.startswith("torch>=") for r in reqs) and any(r.startswith("torchvision>=") for r in reqs)
    assert not [r for r in reqs if "==" in r], reqs


def test_version_and_typing_marker_come_with_the_package():
    assert guard.__version__ == metadata.version("layerguard")
    assert (Path(guard.__file__).parent / "py.typed").is_file()


QUIET = """
import torch
from torch.utils.data import TensorDataset
import guard
torch.manual_seed(0)
x, y = torch.randn(300, 8), torch.arange(300) % 3
model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
                            torch.nn.Linear(32, 3))
gds = guard.GuardedDataset(TensorDataset(x, y), model, guard.GuardConfig(remedy="none"))
gds.scan()
if {enable}:
    guard.enable_logging()
    gds.scan()
"""


def _run(enable: bool) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", QUIET.format(enable=enable)], capture_output=True, text=True,
                          timeout=300)


def test_importing_and_scanning_prints_nothing_until_logging_is_enabled():
    quiet = _run(False)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout == "" and quiet.stderr == ""
    loud = _run(True)
    assert loud.returncode == 0 and "guard: scan 2" in loud.stderr and "scan 1" not in loud.stderr


def test_the_command_line_help_does_not_load_torch():
    probe = ("import sys, guard.cli; guard.cli.parser().format_help(); "
             "print(sorted({'torch', 'numpy'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
