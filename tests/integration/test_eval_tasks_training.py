"""`eval_tasks` during training (megatron/training/task_eval.py): the local lm-eval tasks of tests/data/lm_eval_tasks
run at their interval and at the end, their metrics logged like the validation loss, the training itself
unchanged; a task that cannot run is one warning line naming it and the run finishes; an unknown task stops the
run before its first step with one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.runs import assert_one_line, read_metrics, run_main, train_losses, write_config

import train

pytest.importorskip("lm_eval")

TASKS_DIR = Path(__file__).resolve().parents[1] / "data/lm_eval_tasks"
# byte-level tokens (the tiny runs' CharLevelTokenizer): a line of verse fits a 96-token window, a document spans
# several windows
EVAL_TASKS = {"seq_length": 96, "eval_tasks": ["shakespeare_next_line", "shakespeare_passages", "gone_task"],
              "eval_tasks_limit": 2, "eval_tasks_interval": 4, "hidden_dropout": 0.1}


def small_index(paths: tuple[str, ...]):
    """A TaskManager of `paths` alone, standing in for lm-eval's index of its thousands of tasks."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=False, include_path=list(paths))


@pytest.fixture
def tasks_with_a_missing_dataset(tmp_path) -> str:
    """A task folder: the local tasks and `gone_task`, whose data file does not exist."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "gone_task.yaml").write_text((TASKS_DIR / "shakespeare_next_line.yaml").read_text().replace(
        "task: shakespeare_next_line", "task: gone_task").replace("next_line.jsonl", "gone.jsonl"))
    (folder / "shakespeare.py").write_text((TASKS_DIR / "shakespeare.py").read_text())
    return str(folder)


def test_tasks_run_at_their_interval_and_leave_training_unchanged(tmp_path, data_prefix, capsys,
                                                                  tasks_with_a_missing_dataset):
    runs = {}
    for name, extra in (("plain", {}), ("tasks", {**EVAL_TASKS, "tensorboard_dir": str(tmp_path / "tb"),
                                                  "eval_tasks_include_path": [str(TASKS_DIR),
                                                                              tasks_with_a_missing_dataset]})):
        extra = extra or {"seq_length": 96, "hidden_dropout": 0.1}  # dropout: a changed random stream shows
        config = write_config(tmp_path / name, data_prefix, train_iters=7, **extra)
        result = train.run([str(config)])
        assert result.final_step == 7
        runs[name] = read_metrics(tmp_path / name / "logs")
    assert train_losses(runs["tasks"]) == train_losses(runs["plain"])  # the evaluation changed nothing
    task_records = {r["step"]: r for r in runs["tasks"] if "lm_eval/seconds" in r}
    assert sorted(task_records) == [4, 7]  # every eval_tasks_interval steps and the last
    for record in task_records.values():
        assert 0 <= record["lm_eval/shakespeare_next_line/acc"] <= 1
        assert record["lm_eval/shakespeare_passages/bits_per_byte"] > 0
        assert not any(key.startswith("lm_eval/gone_task") for key in record)
    warnings = [line.split("megatron: ", 1)[1] for line in capsys.readouterr().out.splitlines()
                if "megatron: eval_tasks at step" in line]
    assert len(warnings) == 2 and warnings[0].startswith("eval_tasks at step 4: task gone_task: ")
    assert "gone.jsonl" in warnings[0] and "\n" not in warnings[0]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert [e.step for e in events.Scalars("lm_eval/shakespeare_next_line/acc")] == [4, 7]


def test_an_unknown_task_stops_the_run_before_its_first_step(tmp_path, data_prefix, capsys, monkeypatch):
    from megatron.evaluation import lm_eval_tasks

    monkeypatch.setattr(lm_eval_tasks, "with_lm_eval_tasks", small_index)  # lm-eval's own index takes ~10 s
    config = write_config(tmp_path, data_prefix, eval_tasks=["shakespeare_next_line", "no_such_task"],
                          eval_tasks_include_path=[str(TASKS_DIR)])
    code, err = run_main([str(config)], capsys)
    assert_one_line(code, err, r"eval_tasks: task no_such_task: unknown")
    assert not list((tmp_path / "ckpt").glob("global_step*"))
