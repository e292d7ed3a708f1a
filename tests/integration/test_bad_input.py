"""Bad input found after the config is read (damaged data, foreign files): train.py exits non-zero with one line
naming the file and what was expected, and shows the traceback only with --debug."""

import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.runs import write_config

REPO = Path(__file__).resolve().parents[2]


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
    # in-process in test_bad_input_table.py; here through a real subprocess, slow-only (CI's budget)
    pytest.param("foreign idx", r"corpus\.idx: not a GPT-NeoX mmap index \(bad magic\)", marks=pytest.mark.slow),
    pytest.param("missing bin", r"corpus\.bin", marks=pytest.mark.slow),
])
def test_damaged_dataset_is_one_line(tmp_path, data_prefix, damage, expected):
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


def run_train(config: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "train.py"), str(config), *extra], capture_output=True,
                          text=True, cwd=REPO, timeout=240)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith(("error:", "config error:"))]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_prefix):
    """A finished 2-step run with its checkpoint, copied by each test that damages it."""
    folder = tmp_path_factory.mktemp("trained")
    config = write_config(folder, data_prefix, train_iters=2, checkpoint_factor=2, eval_interval=0, pos_emb="rotary")
    result = run_train(config)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def resume_config(trained: Path, tmp_path: Path, data_prefix: str, **overrides) -> Path:
    shutil.copytree(trained / "ckpt", tmp_path / "ckpt")
    return write_config(tmp_path, data_prefix, train_iters=4, checkpoint_factor=2, eval_interval=0,
                        pos_emb="rotary", **overrides)


def test_checkpoint_of_another_shape_names_the_tensors(trained, tmp_path, data_prefix):
    config = resume_config(trained, tmp_path, data_prefix, hidden_size=64)
    line = one_error_line(run_train(config))
    # the key, from the config the checkpoint was saved with
    assert "saved by a run with another model (hidden_size: checkpoint 32, config 64" in line, line
    # without that config.yml (copied by hand, say), the tensors themselves
    (tmp_path / "ckpt" / "global_step2" / "config.yml").unlink()
    line = one_error_line(run_train(config))
    assert "another model shape" in line and "checkpoint [" in line and ", model [" in line
    assert re.search(r"model\.\S+: checkpoint \[\d+(, \d+)*\], model \[\d+(, \d+)*\]", line), line


@pytest.mark.parametrize("damage", [pytest.param("truncated rank file", marks=pytest.mark.slow), "truncated shard",
                                    pytest.param("latest names a missing folder", marks=pytest.mark.slow),
                                    "code in the rank file"])
def test_damaged_checkpoint_is_one_line(trained, tmp_path, data_prefix, damage):
    config = resume_config(trained, tmp_path, data_prefix)
    step = tmp_path / "ckpt" / "global_step2"
    if damage == "truncated rank file":
        data = (step / "rank0.pt").read_bytes()
        (step / "rank0.pt").write_bytes(data[: len(data) // 2])
        expected = r"rank0\.pt: unreadable .*truncated or corrupt"
    elif damage == "truncated shard":
        shard = next(step.glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[:100])
        expected = r"global_step2: could not read the checkpoint's tensors .*truncated or corrupt"
    elif damage == "latest names a missing folder":
        (tmp_path / "ckpt" / "latest").write_text("global_step9")
        expected = r"latest names global_step9, which is not a complete checkpoint"
    else:  # an object whose unpickling would run code: refused, never executed
        (step / "rank0.pt").write_bytes(pickle.dumps(RunsCode()))
        expected = r"rank0\.pt: not loadable as tensors and plain values only"
    line = one_error_line(run_train(config))
    assert re.search(expected, line), line
    assert not (tmp_path / "pwned").exists()


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.slow  # in-process in test_bad_input_table.py (test_tokenizer_that_does_not_fit_the_model)
def test_vocab_size_that_disagrees_with_the_tokenizer_is_one_line(tmp_path, data_prefix):
    """CharLevelTokenizer: 257 tokens (256 bytes + EOD), padded to 384 by make_vocab_size_divisible_by 128."""
    line = one_error_line(run_train(write_config(tmp_path, data_prefix, vocab_size=50304, pos_emb="rotary")))
    assert "vocab_size: 50304 disagrees with the CharLevelTokenizer tokenizer (257 tokens, 384 padded" in line
    for agreeing in (257, 384):
        folder = tmp_path / f"ok{agreeing}"
        config = write_config(folder, data_prefix, vocab_size=agreeing, train_iters=1, pos_emb="rotary",
                              eval_interval=0, save=None, load=None)
        assert run_train(config).returncode == 0
