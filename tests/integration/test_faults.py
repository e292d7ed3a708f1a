"""Faults: pre-emption signals save and exit 0; SIGKILL at random moments (inside checkpoint saves too) loses
nothing: restarted with the same command, the run finishes with every step's loss equal to an uninterrupted run's
and `latest` always names a complete checkpoint."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.runs import write_config

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ITERS = 60  # steps of every run here (a tiny model: a few seconds)


def fault_config(folder: Path, data_prefix: str, train_iters: int, **overrides) -> Path:
    """Every step logged and checkpointed, so kills land in saves often; dropout 0 so losses are comparable."""
    settings = dict(train_iters=train_iters, checkpoint_factor=1, log_interval=1, eval_interval=0,
                    keep_last_n_checkpoints=2, pos_emb="rotary", hidden_dropout=0.0, attention_dropout=0.0)
    settings.update(overrides)
    return write_config(folder, data_prefix, **settings)


def logged_losses(folder: Path) -> dict[int, float]:
    """Step -> loss from metrics.jsonl; a restarted run logs steps again from its checkpoint: the last one wins."""
    path = folder / "logs" / "metrics.jsonl"
    losses = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        if "loss" in record:
            losses[record["step"]] = record["loss"]
    return losses


def latest_is_complete(save: Path) -> bool:
    latest = save / "latest"
    if not latest.exists():
        return True  # nothing saved yet
    folder = save / latest.read_text().strip()
    return (folder / ".metadata").is_file() and (folder / "rank0.pt").is_file() and (folder / "config.yml").is_file()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_prefix):
    """An uninterrupted run's losses, per step."""
    folder = tmp_path_factory.mktemp("reference")
    subprocess.run([sys.executable, str(REPO / "train.py"), str(fault_config(folder, data_prefix, ITERS))],
                   check=True, env=ENV, cwd=REPO, capture_output=True, timeout=300)
    return logged_losses(folder)


def wait_for_step(folder: Path, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while max(logged_losses(folder), default=0) < step:
        assert process.poll() is None, process.stderr.read() if process.stderr else "exited"
        assert time.time() < deadline, f"no step {step} within {timeout} s"
        time.sleep(0.05)


@pytest.mark.parametrize("sig, twice", [pytest.param(signal.SIGUSR1, False, marks=pytest.mark.slow),
                                        (signal.SIGTERM, True)])  # SIGTERM, signalled twice, in CI
def test_preemption_signal_saves_and_exits_zero(tmp_path, data_prefix, reference, sig, twice):
    config = fault_config(tmp_path, data_prefix, ITERS)
    command = [sys.executable, str(REPO / "train.py"), str(config)]
    stopped_file = tmp_path / "stopped"  # what launch/slurm.sbatch reads to requeue the job
    process = subprocess.Popen(command, env={**ENV, "MEGATRON_STOPPED_FILE": str(stopped_file)}, cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(tmp_path, 3, process)
    process.send_signal(sig)
    if twice:  # a second signal, most likely during the save: no harm
        time.sleep(0.01)
        process.send_signal(sig)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-3000:]
    assert "stopping at step" in output and f"received {sig.name}" in output
    stopped_at = max(logged_losses(tmp_path))
    assert 3 <= stopped_at < ITERS
    assert stopped_file.read_text() == f"{stopped_at}\n"
    assert (tmp_path / "ckpt" / "latest").read_text() == f"global_step{stopped_at}" and latest_is_complete(
        tmp_path / "ckpt")
    stopped_file.unlink()
    finished = {**ENV, "MEGATRON_STOPPED_FILE": str(stopped_file)}
    subprocess.run(command, check=True, env=finished, cwd=REPO, capture_output=True, timeout=300)  # the requeued job
    assert logged_losses(tmp_path) == reference
    assert not stopped_file.exists()  # a run that finished asks for no requeue


def test_two_ranks_stop_at_the_same_step_when_one_is_signalled(tmp_path, data_prefix):
    config = fault_config(tmp_path, data_prefix, 40, checkpoint_factor=100)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
               str(REPO / "train.py"), str(config)]
    log_file = open(tmp_path / "torchrun.log", "w")
    process = subprocess.Popen(command, env=ENV, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT)
    wait_for_step(tmp_path, 2, process)
    workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(max(workers, key=int)), signal.SIGUSR1)  # one worker only (rank order does not matter)
    process.wait(timeout=180)
    log_file.close()
    assert process.returncode == 0, (tmp_path / "torchrun.log").read_text()[-3000:]
    stopped_at = max(logged_losses(tmp_path))
    assert stopped_at < 40
    assert (tmp_path / "ckpt" / "latest").read_text() == f"global_step{stopped_at}"
    saved = tmp_path / "ckpt" / f"global_step{stopped_at}"
    assert (saved / "rank0.pt").is_file() and (saved / "rank1.pt").is_file()  # both ranks saved the same step


def kill_and_restart(tmp_path: Path, data_prefix: str, kills: int, train_iters: int, seed: int) -> dict[int, float]:
    """Runs the same command until it finishes, SIGKILLing it `kills` times after random delays; checks `latest`
    after every kill."""
    config = fault_config(tmp_path, data_prefix, train_iters)
    command = [sys.executable, str(REPO / "train.py"), str(config)]
    rng = random.Random(seed)
    killed = 0
    while True:
        process = subprocess.Popen(command, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        if killed < kills:
            start_step = max(logged_losses(tmp_path), default=0)
            # wait until the run trains (start-up takes a few seconds), then a random moment within a few steps
            deadline = time.time() + 120
            while max(logged_losses(tmp_path), default=0) <= start_step and process.poll() is None:
                assert time.time() < deadline, "the restarted run made no progress"
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.15))
        if process.poll() is None and killed < kills:
            process.kill()
            process.wait()
            killed += 1
            assert latest_is_complete(tmp_path / "ckpt"), f"kill {killed}: latest names an incomplete checkpoint"
            continue
        assert process.wait(timeout=300) == 0
        if max(logged_losses(tmp_path), default=0) == train_iters:
            assert killed == kills, f"the run finished after {killed} of {kills} kills"
            return logged_losses(tmp_path)


def test_sigkill_at_random_moments_loses_nothing(tmp_path, data_prefix, reference):
    losses = kill_and_restart(tmp_path, data_prefix, kills=5, train_iters=ITERS, seed=0)
    assert losses == reference


@pytest.mark.slow
def test_sigkill_twenty_times_loses_nothing(tmp_path, data_prefix, reference):
    losses = kill_and_restart(tmp_path, data_prefix, kills=20, train_iters=ITERS, seed=1)
    assert losses == reference
