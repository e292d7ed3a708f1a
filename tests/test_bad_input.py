"""Bad input found after the config is read (damaged data, foreign files): train.py exits non-zero with one line
naming the file and what was expected, and shows the traceback only with --debug."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from runs import write_config

REPO = Path(__file__).resolve().parents[1]


def damaged_copy(data_prefix: str, folder: Path, damage: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    prefix = folder / "corpus"
    shutil.copy(f"{data_prefix}.bin", f"{prefix}.bin")
    shutil.copy(f"{data_prefix}.idx", f"{prefix}.idx")
    if damage == "truncated bin":
        data = Path(f"{prefix}.bin").read_bytes()
        Path(f"{prefix}.bin").write_bytes(data[: len(data) // 3])
    elif damage == "foreign idx":
        Path(f"{prefix}.idx").write_bytes(b"PK\x03\x04 not an index at all" + bytes(40))
    elif damage == "missing bin":
        Path(f"{prefix}.bin").unlink()
    return str(prefix)


@pytest.mark.parametrize("damage, expected", [
    ("truncated bin", r"corpus\.bin: truncated \(\d+ bytes, .*corpus\.idx says \d+\)"),
    ("foreign idx", r"corpus\.idx: not a GPT-NeoX mmap index \(bad magic\)"),
    ("missing bin", r"corpus\.bin"),
])
def test_damaged_dataset_is_one_line(tmp_path, data_prefix, damage, expected):
    import re

    prefix = damaged_copy(data_prefix, tmp_path / "data", damage)
    config = write_config(tmp_path, prefix, train_iters=2, pos_emb="rotary")
    command = [sys.executable, str(REPO / "train.py"), str(config)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=240)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and re.search(expected, errors[0]), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    if damage == "truncated bin":  # --debug: the traceback, for a bug report
        debug = subprocess.run(command + ["--debug"], capture_output=True, text=True, cwd=REPO, timeout=240)
        assert debug.returncode != 0 and "Traceback" in debug.stderr
