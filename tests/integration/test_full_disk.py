"""A save that cannot be written (full disk, a save path that is not a folder): a clear error, the previous
checkpoint intact, training goes on and retries at the next interval; only the last save must succeed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from helpers.runs import read_metrics, write_config

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def train(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "train.py"), str(config)], capture_output=True, text=True,
                          cwd=REPO, env=ENV, timeout=300)


def checkpoint_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def small_filesystem(tmp_path):
    """A size-limited tmpfs (root only); the size is set by the test with `resize`."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a size-limited tmpfs")
    mount_point = tmp_path / f"tmpfs_{uuid.uuid4().hex[:6]}"
    mount_point.mkdir()
    mounted = []

    def resize(size_bytes: int) -> Path:
        option = f"size={size_bytes}"
        command = ["mount", "-o", f"remount,{option}", str(mount_point)] if mounted else [
            "mount", "-t", "tmpfs", "-o", option, "tmpfs", str(mount_point)]
        if subprocess.run(command, capture_output=True).returncode != 0:
            pytest.skip("mounting a tmpfs is not allowed here")
        mounted.append(True)
        return mount_point

    yield resize
    if mounted:
        subprocess.run(["umount", str(mount_point)], capture_output=True)


def test_full_disk_keeps_the_previous_checkpoint_and_trains_on(tmp_path, data_prefix, small_filesystem):
    probe = write_config(tmp_path / "probe", data_prefix, train_iters=2, checkpoint_factor=2, eval_interval=0,
                         pos_emb="rotary")
    assert train(probe).returncode == 0
    one = checkpoint_bytes(tmp_path / "probe" / "ckpt" / "global_step2")
    disk = small_filesystem(int(one * 2.5))  # room for two checkpoints, not three
    config = write_config(tmp_path, data_prefix, train_iters=8, checkpoint_factor=2, eval_interval=0,
                          pos_emb="rotary", save=str(disk / "ckpt"), load=str(disk / "ckpt"))
    result = train(config)
    assert result.returncode == 5, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "global_step8 failed" in errors[0] and "latest: global_step4" in errors[0]
    assert "global_step6 failed" in result.stdout + result.stderr  # logged, and training went on
    assert max(r["step"] for r in read_metrics(tmp_path / "logs") if "loss" in r) == 8
    assert (disk / "ckpt" / "latest").read_text() == "global_step4"
    assert sorted(p.name for p in (disk / "ckpt").iterdir()) == ["global_step2", "global_step4", "latest"]
    small_filesystem(int(one * 10))  # space is back: the same command resumes from step 4 and finishes
    resumed = train(config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (disk / "ckpt" / "latest").read_text() == "global_step8"


def test_a_save_path_that_is_not_a_folder_is_one_line_before_the_first_step(tmp_path, data_prefix):
    (tmp_path / "a_file").write_text("not a folder")
    config = write_config(tmp_path, data_prefix, train_iters=2, checkpoint_factor=2, eval_interval=0,
                          pos_emb="rotary", save=str(tmp_path / "a_file" / "ckpt"), load=None)
    result = train(config)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("config error:")]
    assert len(errors) == 1 and "save: " in errors[0] and "a_file/ckpt cannot be written" in errors[0], errors
    assert "Traceback" not in result.stderr and "step 1 " not in result.stdout  # found before training
