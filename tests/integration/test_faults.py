"""Faults: pre-emption signals and Ctrl-C save and exit 0, a second signal never aborts the save under way and a
third Ctrl-C stops at once; SIGKILL at random moments (inside checkpoint saves too) loses nothing: restarted with
the same command, the run finishes with every step's loss equal to an uninterrupted run's and `latest` always names
a complete checkpoint."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.distributed import free_port
from helpers.runs import run_main, write_config
from torch.distributed.checkpoint.filesystem import FileSystemReader

from megatron.training.signals import CTRL_C_LINE

REPO = Path(__file__).resolve().parents[2]
GATED_TRAIN = REPO / "tests" / "helpers" / "gated_train.py"  # train.py whose checkpoint I/O waits on a file
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


@pytest.fixture
def start():
    """`start(script, config, folder, **env)` runs `python SCRIPT CONFIG`, its stdout in folder/out.log and its
    stderr in folder/err.log; killed when the test ends if still running (after a failed assertion, say)."""
    processes: list[subprocess.Popen] = []

    def launch(script: Path, config: Path, folder: Path, **env: str) -> subprocess.Popen:
        with open(folder / "out.log", "w") as out, open(folder / "err.log", "w") as err:
            processes.append(subprocess.Popen([sys.executable, str(script), str(config)], env={**ENV, **env},
                                              cwd=REPO, stdout=out, stderr=err))
        return processes[-1]

    yield launch
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def wait_until(condition, process: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, f"exited ({process.returncode}) before {what}"
        assert time.time() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.02)


def logged(folder: Path, text: str) -> bool:
    return text in (folder / "out.log").read_text()


def test_ctrl_c_stops_like_sigterm_and_the_run_resumes(tmp_path, data_prefix, start):
    """SIGINT mid-training: the step is finished and saved, exit 0, the same lines and stopped file as SIGTERM."""
    config = fault_config(tmp_path, data_prefix, ITERS, checkpoint_factor=100)
    stopped_file = tmp_path / "stopped"
    process = start(REPO / "train.py", config, tmp_path, MEGATRON_STOPPED_FILE=str(stopped_file))
    wait_for_step(tmp_path, 3, process)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 0, (tmp_path / "err.log").read_text()[-3000:]
    assert "Traceback" not in (tmp_path / "err.log").read_text()
    stopped_at = max(logged_losses(tmp_path))
    assert logged(tmp_path, "received SIGINT: saving a checkpoint at the end of this step, then exiting")
    assert logged(tmp_path, f"stopping at step {stopped_at} on SIGINT (checkpoint saved: True)")
    assert stopped_file.read_text() == f"{stopped_at}\n"
    assert (tmp_path / "ckpt" / "latest").read_text() == f"global_step{stopped_at}" and latest_is_complete(
        tmp_path / "ckpt")
    import train  # the requeued job, in this process (no second start-up): two more steps

    assert train.run([str(config), "--exit_interval", "2"]).final_step == stopped_at + 2
    assert max(logged_losses(tmp_path)) == stopped_at + 2
    assert (tmp_path / "ckpt" / "latest").read_text() == f"global_step{stopped_at + 2}"


@pytest.mark.parametrize("async_save", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_second_signal_does_not_abort_the_save_under_way(tmp_path, data_prefix, async_save, start):
    """SIGTERM, then SIGINT and SIGUSR1 while the save is held at its first write: the save completes, exit 0.
    Asynchronously, the held write is a background one the stop waits for."""
    config = fault_config(tmp_path, data_prefix, ITERS, checkpoint_factor=1 if async_save else 100,
                          async_save=async_save)
    gate = tmp_path / "gate"
    gate.mkdir()
    process = start(GATED_TRAIN, config, tmp_path, TRAIN_GATE=str(gate))
    wait_for_step(tmp_path, 3, process)
    (gate / "hold").touch()
    if async_save:  # a background write is held; the stop's save waits for it first
        wait_until((gate / "saving").exists, process, "background save")
    process.send_signal(signal.SIGTERM)
    wait_until((gate / "saving").exists, process, "save")
    process.send_signal(signal.SIGINT)
    wait_until(lambda: logged(tmp_path, "received SIGINT again"), process, "second signal")
    process.send_signal(signal.SIGUSR1)  # a third signal that is not SIGINT: no harm either
    wait_until(lambda: logged(tmp_path, "received SIGUSR1 again"), process, "third signal")
    (gate / "hold").unlink()
    assert process.wait(timeout=120) == 0, (tmp_path / "err.log").read_text()[-3000:]
    assert "Traceback" not in (tmp_path / "err.log").read_text()
    stopped_at = max(logged_losses(tmp_path))
    assert (tmp_path / "ckpt" / "latest").read_text() == f"global_step{stopped_at}" and latest_is_complete(
        tmp_path / "ckpt")


def test_a_third_ctrl_c_stops_at_once_and_a_ctrl_c_while_loading_is_one_line(tmp_path, data_prefix, monkeypatch,
                                                                             capsys, start):
    config = fault_config(tmp_path, data_prefix, ITERS, checkpoint_factor=2)
    gate = tmp_path / "gate"
    gate.mkdir()
    latest = tmp_path / "ckpt" / "latest"
    process = start(GATED_TRAIN, config, tmp_path, TRAIN_GATE=str(gate))
    wait_until(latest.exists, process, "first checkpoint")
    (gate / "hold").touch()
    wait_until((gate / "saving").exists, process, "held save")
    before = latest.read_text()  # the held save has not published: this is the previous checkpoint
    for sig, line in [(signal.SIGTERM, "received SIGTERM: saving"), (signal.SIGINT, "received SIGINT again")]:
        process.send_signal(sig)
        wait_until(lambda line=line: logged(tmp_path, line), process, sig.name)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 130
    errors = (tmp_path / "err.log").read_text()
    assert "Traceback" not in errors
    lines = [line for line in errors.splitlines() if line.startswith("interrupted:")]
    assert len(lines) == 1 and re.fullmatch(
        r"interrupted: stopped at once on a third signal \(SIGINT\): the checkpoint being written \(.*global_step\d+\) "
        rf"was abandoned; the previous checkpoint is intact \(latest: {before}\)", lines[0]), errors
    assert latest.read_text() == before and latest_is_complete(tmp_path / "ckpt")

    # the same command again, in this process, Ctrl-C while it loads that checkpoint: one line, exit 130
    real_read = FileSystemReader.read_data

    def ctrl_c_while_reading(self, *args, **kwargs):
        assert signal.getsignal(signal.SIGINT) not in (signal.default_int_handler, signal.SIG_IGN), \
            "the run's own handler is not installed"
        os.kill(os.getpid(), signal.SIGINT)
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(FileSystemReader, "read_data", ctrl_c_while_reading)
    own_handler = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN when started in the background
    code, errors = run_main([str(config)], capsys)
    assert code == 130 and errors.strip().splitlines() == [CTRL_C_LINE], errors
    assert not (tmp_path / "ckpt" / ".lock").exists()  # released on the way out
    assert signal.getsignal(signal.SIGINT) is own_handler  # the process's own handler is back


@pytest.mark.slow
def test_ctrl_c_at_torchrun_reaches_the_workers_as_sigint_and_they_save(tmp_path, data_prefix):
    """torchrun starts its workers in sessions of their own: a terminal's Ctrl-C reaches only the agent, which sends
    SIGINT to every worker (then SIGKILL after --shutdown_timeout); the workers save and exit 0, and torchrun exits
    1 with its own SignalException traceback."""
    config = fault_config(tmp_path, data_prefix, ITERS, checkpoint_factor=100)
    stopped_file = tmp_path / "stopped"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={free_port()}",
               str(REPO / "train.py"), str(config)]
    with open(tmp_path / "torchrun.log", "w") as log:
        process = subprocess.Popen(command, env={**ENV, "MEGATRON_STOPPED_FILE": str(stopped_file)}, cwd=REPO,
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_step(tmp_path, 3, process)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 1
    finally:
        if process.poll() is None:
            process.kill()
    output = (tmp_path / "torchrun.log").read_text()
    assert "closing signal SIGINT" in output and "received SIGINT: saving a checkpoint" in output, output[-3000:]
    stopped_at = max(logged_losses(tmp_path))
    assert stopped_file.read_text() == f"{stopped_at}\n"
    assert (tmp_path / "ckpt" / "latest").read_text() == f"global_step{stopped_at}" and latest_is_complete(
        tmp_path / "ckpt")


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
