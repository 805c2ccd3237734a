"""The scan's decisions on saved real-data checkpoints are exactly the recorded ones (see tests/golden.py)."""

import json

import pytest

from tests.golden import CASES, FOLDER, MODES, outputs

GOLDEN = json.loads((FOLDER / "outputs.json").read_text())


def _same(got, want, where: str) -> None:
    if isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-3, abs=1e-3), where
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for k in want:
            _same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list) and want and isinstance(want[0], (dict, float)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _same(g, w, f"{where}[{i}]")
    else:
        assert got == want, where          # indices, verdicts, layer names, counts: exactly


@pytest.mark.cifar
@pytest.mark.parametrize("case", list(CASES))
def test_scan_decisions_match_the_golden_outputs(case, cifar_archive):
    for mode in MODES:
        _same(outputs(case, mode, cifar_archive), GOLDEN[f"{case}/{mode}"], f"{case}/{mode}")
