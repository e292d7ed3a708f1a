"""What `pip install -e .` brings: the core dependencies, and extras for what some features import; a feature
whose extra is missing stops with one line naming it."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from helpers.runs import assert_one_line, run_main

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parents[2]
DISTRIBUTION = {"PIL": "Pillow", "sklearn": "scikit-learn", "safetensors": "safetensors",
                "transformers": "transformers", "lm_eval": "lm-eval"}


def requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=\[ ;]", req, maxsplit=1)[0].lower() for req in requirements}


def test_every_optional_import_names_an_extra_that_installs_it():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    calls = []
    for path in (REPO / "megatron").rglob("*.py"):
        calls += re.findall(r'optional_import\("([\w.]+)", "(\w+)"', path.read_text())
    assert {module.split(".")[0] for module, _ in calls} == set(DISTRIBUTION)  # images, grids, HF, lm-eval
    for module, extra in calls:
        top = module.split(".")[0]
        assert extra in extras, f"{module}: extra [{extra}] is not declared in pyproject.toml"
        assert DISTRIBUTION[top].lower() in requirement_names(extras[extra]), f"[{extra}] does not install {top}"
        assert DISTRIBUTION[top].lower() not in requirement_names(project["dependencies"])  # optional indeed


def test_requirements_txt_installs_every_extra():
    """The README's install command (requirements.txt) brings every feature."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pinned = requirement_names([line for line in (REPO / "requirements.txt").read_text().splitlines()
                                if line.strip() and not line.startswith("#")])
    for name in ("hf", "dit"):
        assert requirement_names(extras[name]) <= pinned, name


def test_a_dit_run_without_scikit_learn_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import fails as if not installed
    overrides = ["--train_iters", "1", "--save", str(tmp_path / "ckpt"), "--load", str(tmp_path / "ckpt"),
                 "--log_dir", str(tmp_path / "logs")]
    code, err = run_main([str(REPO / "configs" / "dit_digits.yml"), *overrides], capsys)
    assert_one_line(code, err, r"image_dataset: digits needs sklearn, which is not installed: "
                               r"pip install -e '\.\[dit\]'")


def test_an_export_without_safetensors_names_the_extra(monkeypatch):
    from megatron.runtime import MissingExtra, optional_import

    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(MissingExtra, match=r"convert_to_hf needs safetensors, .* pip install -e '\.\[hf\]'"):
        optional_import("safetensors.torch", "hf", "convert_to_hf")
