"""Checked before the first step: the ranks' configs agree, the output folders can be written, no run writes over
checkpoints it did not make or into a folder another run is writing; and a resume is refused when the checkpoint
is of another model, another global batch, or not there."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
from collections import Counter

import pytest
from helpers.distributed import run_on_ranks
from helpers.runs import assert_one_line, read_metrics, run_main, write_config

from megatron.config import ConfigError, load_config
from megatron.training import preflight

STEPS = {"train_iters": 2, "checkpoint_factor": 2, "eval_interval": 0}


def test_a_fresh_run_refuses_a_save_folder_holding_another_runs_checkpoints(tmp_path, data_prefix, capsys):
    first = write_config(tmp_path / "a", data_prefix, **STEPS)
    assert run_main_ok([str(first)])
    before = sorted(p.name for p in (tmp_path / "a" / "ckpt").iterdir())
    # another run (another config folder) pointed at the same save folder, starting fresh (load: null)
    second = write_config(tmp_path / "b", data_prefix, save=str(tmp_path / "a" / "ckpt"), load=None, **STEPS)
    assert_one_line(*run_main([str(second)], capsys),
                    r"save: .*a/ckpt holds another run's checkpoints \(global_step2\) .* overwrite_save: true")
    assert sorted(p.name for p in (tmp_path / "a" / "ckpt").iterdir()) == before  # untouched
    # said explicitly, it may
    assert run_main_ok([str(second), "--overwrite_save", "true"])
    # the run that saved there resumes as always (load is its save folder)
    assert run_main_ok([str(first), "--train_iters", "4"])


def run_main_ok(argv: list[str]) -> bool:
    import train

    saved = sys.argv
    sys.argv = ["train.py", *argv]
    try:
        train.main()
    finally:
        sys.argv = saved
    return True


def test_a_second_run_on_a_locked_save_folder_refuses_and_a_dead_runs_lock_is_taken_over(tmp_path, data_prefix,
                                                                                         capsys):
    config = write_config(tmp_path, data_prefix, **STEPS)
    save = tmp_path / "ckpt"
    save.mkdir()
    lock = save / preflight.LOCK_NAME
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(), "since": "earlier"}))  # alive
    assert_one_line(*run_main([str(config)], capsys), rf"save: .*ckpt is in use by another run \(process "
                                                      rf"{os.getppid()} on .* delete the lock file")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "since": "earlier"}))
    assert run_main_ok([str(config)])
    assert not lock.exists()  # released at the end of the run
    assert (save / "latest").read_text() == "global_step2"


def test_a_lock_from_another_host_is_kept():
    assert not preflight.is_stale({"host": "some-other-node", "pid": 1})
    assert not preflight.is_stale({})  # names no owner: held (locks appear whole, so this is no half-written one)


def test_an_unreadable_lock_is_held_with_one_line_of_advice(tmp_path, data_prefix, capsys):
    config = write_config(tmp_path, data_prefix, **STEPS)
    lock = tmp_path / "ckpt" / preflight.LOCK_NAME
    lock.parent.mkdir()
    lock.write_text("garbage")
    assert_one_line(*run_main([str(config)], capsys), r"save: the lock .*ckpt/\.lock could not be read \(contents "
                                                      r"'garbage', .*\); if no run is using .*ckpt, delete it$")
    assert lock.read_text() == "garbage"  # left for a person to look at


def test_a_run_releases_only_its_own_lock(tmp_path):
    lock = preflight.SaveLock.acquire(str(tmp_path))
    theirs = {"host": socket.gethostname(), "pid": os.getppid(), "since": "later", "token": "theirs"}
    lock.path.write_text(json.dumps(theirs))  # ours deleted by hand, and another run's taken in its place
    lock.release()
    assert json.loads(lock.path.read_text()) == theirs


def _contend(folders: list[str], barrier, outcomes) -> None:
    """One process of several that try, trial after trial, to take the same folder's lock at the same instant."""
    for trial, folder in enumerate(folders):
        barrier.wait()
        try:
            preflight.SaveLock.acquire(folder)
            outcomes.put((trial, "won"))
        except Exception as err:  # a refusal (ConfigError), or what a broken lock raises: reported, never a hang
            outcomes.put((trial, repr(err)))


@pytest.mark.parametrize("stale", [False, True], ids=["fresh", "stale"])
def test_runs_starting_at_the_same_instant_never_both_take_the_lock(tmp_path, stale):
    """200 trials of 3 processes released together by a barrier, on a fresh folder or on one holding the lock of a
    dead run on this host (all three try to take it over): exactly one owner each time."""
    trials, contenders = 200, 4
    folders = [tmp_path / f"trial{trial}" for trial in range(trials)]
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    for folder in folders:
        folder.mkdir()
        if stale:
            (folder / preflight.LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead}))
    context = multiprocessing.get_context("fork")
    barrier, outcomes = context.Barrier(contenders, timeout=60), context.Queue()
    processes = [context.Process(target=_contend, args=([str(f) for f in folders], barrier, outcomes))
                 for _ in range(contenders)]
    for process in processes:
        process.start()
    results = [outcomes.get(timeout=60) for _ in range(trials * contenders)]
    for process in processes:
        process.join(timeout=60)
    winners = Counter(trial for trial, outcome in results if outcome == "won")
    assert [trial for trial in range(trials) if winners[trial] != 1] == [], winners
    refusals = [outcome for _, outcome in results if outcome != "won"]
    assert all("is in use by another run" in refusal for refusal in refusals), set(refusals)


@pytest.mark.parametrize("key", ["save", "log_dir", "tensorboard_dir"])
def test_an_output_folder_that_is_a_file_is_found_before_the_first_step(tmp_path, data_prefix, capsys, key):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    config = write_config(tmp_path, data_prefix, **{**STEPS, key: str(blocker)})
    assert_one_line(*run_main([str(config)], capsys), rf"{key}: .*a_file is a file; expected a folder")
    assert not (tmp_path / "logs" / "metrics.jsonl").exists()  # nothing ran


def _disagreeing_ranks(rank: int, world: int, config: str) -> None:
    overrides = ["--hidden_size", "64", "--checkpoint_factor", "3"] if rank == 1 else []
    args = load_config([config], overrides, data_parallel_size=world)
    with pytest.raises(ConfigError) as err:
        preflight.check_ranks_agree(args.to_dict())
    assert str(err.value) == (  # every rank says the same; derived keys (the FFN widths) are named too
        "ranks [1] were started with another config than rank 0: checkpoint_factor (2 on rank 0, 3 on rank 1), "
        "hidden_size (32 on rank 0, 64 on rank 1), intermediate_size (128 on rank 0, 256 on rank 1), "
        "moe_ffn_hidden_size (128 on rank 0, 256 on rank 1)")
    preflight.check_ranks_agree(load_config([config], data_parallel_size=world).to_dict())  # the same: no error


def test_ranks_with_different_configs_stop_at_once_naming_the_keys(tmp_path, data_prefix):
    config = write_config(tmp_path, data_prefix, **STEPS)
    run_on_ranks(_disagreeing_ranks, 2, str(config))


@pytest.mark.parametrize("change, pattern", [
    (["--num_layers", "1"], r"another model \(num_layers: checkpoint 2, config 1\)"),
    (["--moe_num_experts", "2"], r"another model \(moe_num_experts: checkpoint 1, config 2\)"),
    (["--train_micro_batch_size_per_gpu", "2"], r"another global batch .*train_batch_size: checkpoint 4, config 2"),
    (["--seq_length", "16"], r"seq_length: checkpoint 32, config 16"),
])
def test_a_resume_with_another_model_or_global_batch_is_refused(tmp_path, data_prefix, capsys, change, pattern):
    config = write_config(tmp_path, data_prefix, **STEPS)
    assert run_main_ok([str(config)])
    assert_one_line(*run_main([str(config), "--train_iters", "4", *change], capsys), pattern)
    # what may change does: a longer run, other logging, another kernel or memory setting
    assert run_main_ok([str(config), "--train_iters", "4", "--log_interval", "2", "--loss_chunk_tokens", "16"])


def test_a_deeper_checkpoint_is_refused_by_its_tensors_too(tmp_path, data_prefix, capsys):
    """Without the checkpoint's config.yml (copied by hand, say), the extra tensors still say so."""
    config = write_config(tmp_path, data_prefix, **STEPS)
    assert run_main_ok([str(config)])
    (tmp_path / "ckpt" / "global_step2" / "config.yml").unlink()
    assert_one_line(*run_main([str(config), "--train_iters", "4", "--num_layers", "1"], capsys),
                    r"checkpoint tensors the model lacks, e\.g\. model\.blocks\.1\.")


@pytest.mark.parametrize("load, pattern", [
    ("ckpt/global_step99", r"load: .*global_step99 is not a complete checkpoint .* checkpoints in .*: global_step2"),
    ("ckpt/latest", r"load: .*latest is a file; expected a save folder"),
    ("elsewhere", r"load: .*elsewhere holds no checkpoint .* not this run's save folder"),
])
def test_a_named_checkpoint_that_is_not_there_is_an_error(tmp_path, data_prefix, capsys, load, pattern):
    config = write_config(tmp_path, data_prefix, **STEPS)
    assert run_main_ok([str(config)])
    shutil.rmtree(tmp_path / "logs")
    assert_one_line(*run_main([str(config), "--load", str(tmp_path / load), "--overwrite_save", "true",
                               "--train_iters", "4"], capsys), pattern)


def test_an_empty_latest_file_says_it_is_empty(tmp_path, data_prefix, capsys):
    config = write_config(tmp_path, data_prefix, **STEPS)
    assert run_main_ok([str(config)])
    (tmp_path / "ckpt" / "latest").write_text("")
    assert_one_line(*run_main([str(config), "--train_iters", "4"], capsys), r"load: .*latest is empty")


def test_metrics_that_cannot_be_written_do_not_stop_training(tmp_path, data_prefix, monkeypatch, capfd):
    """A full disk under log_dir: as for checkpoints, a warning, and training goes on."""
    from megatron.training import metrics

    real_log = metrics.MetricsLogger.log
    calls = []

    def full_disk_after_two(self, step, values, echo=True):
        calls.append(step)
        if len(calls) > 2 and self.jsonl is not None and not isinstance(self.jsonl, _FullDisk):
            self.jsonl = _FullDisk()
        return real_log(self, step, values, echo)

    monkeypatch.setattr(metrics.MetricsLogger, "log", full_disk_after_two)
    config = write_config(tmp_path, data_prefix, train_iters=6, checkpoint_factor=6, eval_interval=0)
    assert run_main_ok([str(config)])
    assert (tmp_path / "ckpt" / "latest").read_text() == "global_step6"  # trained to the end and saved
    assert [r["step"] for r in read_metrics(tmp_path / "logs") if "loss" in r] == [1, 2]
    printed = capfd.readouterr()
    assert (printed.out + printed.err).count("metrics: writing failed at step 3") == 1  # once, not once per record


class _FullDisk:
    def write(self, text):
        raise OSError(28, "No space left on device")

    def close(self):
        raise OSError(28, "No space left on device")
