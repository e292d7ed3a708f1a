"""The supported torch range: declared in pyproject.toml, and the oldest release checked by running the tests
that touch torch's changing APIs on it (tests/oldest_torch.sh builds a scratch environment for it)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def declared_range() -> tuple[str, str]:
    text = (REPO / "pyproject.toml").read_text()
    match = re.search(r'"torch>=([0-9.]+),<([0-9.]+)"', text)
    assert match, "pyproject.toml declares no torch range of the form torch>=A,<B"
    return match.group(1), match.group(2)


def as_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def test_the_pinned_torch_is_inside_the_declared_range():
    oldest, beyond = declared_range()
    assert as_tuple(oldest) <= (2, 11), "the range must include the torch 2.11 that GPU images ship"
    pinned = re.search(r"^torch==([0-9.]+)", (REPO / "requirements.txt").read_text(), re.M).group(1)
    assert as_tuple(oldest) <= as_tuple(pinned) < as_tuple(beyond)
    assert as_tuple(oldest) <= as_tuple(torch.__version__) < as_tuple(beyond)


@pytest.mark.slow
def test_the_oldest_supported_torch_passes_the_version_sensitive_tests():
    venv = os.environ.get("MEGATRON_OLDEST_TORCH_VENV", "/tmp/megatron-oldest-torch")
    result = subprocess.run(["bash", str(REPO / "tests" / "oldest_torch.sh"), venv], cwd=REPO,
                            capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
