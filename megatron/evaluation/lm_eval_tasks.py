"""lm-evaluation-harness tasks run on a model, one task at a time, so that a task that cannot run (unknown,
its dataset unreachable offline, a crash) costs one line naming it and the other tasks still report.

Used by tools/eval_tasks.py and by the evaluation during training (`eval_tasks`). Task names are lm-eval's
(hellaswag, arc_easy, piqa, lambada_openai, ...) or those of the YAML task folders given as include paths
(tests/data/lm_eval_tasks holds local tasks built from the bundled corpus, which run with no download).
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from megatron.runtime import optional_import

RESULT_SECTIONS = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better",
                   "n-samples", "samples")


def lm_eval_module(name: str) -> ModuleType:
    """A module of lm-eval, or one line naming the extra that installs it when lm-eval is missing."""
    optional_import("lm_eval", "eval", "lm-eval evaluation", also="requirements-dev.txt")
    return importlib.import_module(name)


class TaskError(ValueError):
    """A task that cannot run: the message is one line naming it."""


def task_manager(tasks: list[str], include_path: list[str | Path] | None = None):
    """lm-eval's TaskManager that knows `tasks`: the include paths alone when they hold every task (indexing
    lm-eval's own thousands of YAML files takes about 10 s), else with lm-eval's tasks too. An unknown task
    is a TaskError naming it."""
    TaskManager = lm_eval_module("lm_eval.tasks").TaskManager
    paths = [str(p) for p in include_path or []]
    for path in paths:
        if not Path(path).is_dir():
            raise TaskError(f"include_path: {path} is not a folder of lm-eval task YAML files")
    if paths:
        local = TaskManager(include_defaults=False, include_path=paths)
        if all(known(local, task) for task in tasks):
            return local
    manager = with_lm_eval_tasks(tuple(paths))
    unknown = [task for task in tasks if not known(manager, task)]
    if unknown:
        where = f" nor in {', '.join(paths)}" if paths else ""
        raise TaskError(f"task {unknown[0]}: unknown (not one of lm-eval's {len(manager.all_tasks)} tasks, groups "
                        f"and tags{where}; `lm-eval ls tasks` lists them)")
    return manager


@functools.lru_cache(maxsize=4)
def with_lm_eval_tasks(paths: tuple[str, ...]):
    """lm-eval's TaskManager of its own tasks and `paths`, indexed once per process."""
    return lm_eval_module("lm_eval.tasks").TaskManager(include_path=list(paths) or None)


def known(manager, task: str) -> bool:
    return task in manager.all_tasks or (task.endswith((".yaml", ".yml")) and Path(task).is_file())


@dataclass
class TaskRun:
    """What a run of several tasks gave: lm-eval's result sections merged over the tasks that ran, and one
    line for each task that did not."""

    results: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def run_tasks(lm, tasks: list[str], manager, limit: int | float | None = None, num_fewshot: int | None = None,
              log_samples: bool = False, bootstrap_iters: int = 100000, seed: int | None = None,
              keep_global_rng: bool = False) -> TaskRun:
    """The tasks through lm-eval's `simple_evaluate` on `lm`, all in one call (lm-eval collects its environment
    once per call, about a second); if that raises, each task alone, so that a task that cannot run is
    recorded in `errors` as one line naming it and the others still report. `seed`: lm-eval's seeds (Python,
    numpy, torch, few-shot draws); None: lm-eval's defaults. `keep_global_rng`: the global generators are not
    reseeded (a training run must not have its draws changed by an evaluation); few-shot draws keep their own
    seeded generator."""
    simple_evaluate = lm_eval_module("lm_eval.evaluator").simple_evaluate
    seed_args = {} if seed is None else {"random_seed": seed, "numpy_random_seed": seed, "torch_random_seed": seed,
                                         "fewshot_random_seed": seed}
    if keep_global_rng:
        seed_args.update(random_seed=None, numpy_random_seed=None, torch_random_seed=None)

    def evaluate(names: list[str]) -> dict[str, Any] | None:
        return simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                               log_samples=log_samples, bootstrap_iters=bootstrap_iters, **seed_args)

    run = TaskRun()
    try:
        outputs = [evaluate(tasks)]
    except Exception as err:  # noqa: BLE001 - find which task failed; the others still run
        if len(tasks) == 1:
            run.errors[tasks[0]] = f"task {tasks[0]}: {one_line(err)}"
            return run
        outputs = []
        for task in tasks:
            try:
                outputs.append(evaluate([task]))
            except Exception as err:  # noqa: BLE001
                run.errors[task] = f"task {task}: {one_line(err)}"
    for out in outputs:
        if out is None:  # ranks other than 0 get no results
            continue
        for section in RESULT_SECTIONS:
            if isinstance(out.get(section), dict):
                run.results.setdefault(section, {}).update(out[section])
        run.results.setdefault("config", out.get("config", {}))
    return run


def one_line(err: BaseException) -> str:
    """An exception as `Type: the first line of its message`."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def task_metrics(results: dict[str, Any]) -> dict[str, float]:
    """{`task/metric`: value} for every finite number lm-eval reported per task or group, with the filter
    name dropped when it is lm-eval's default (`acc,none` -> `acc`) and no standard errors."""
    metrics = {}
    for section in ("results", "groups"):
        for task, values in (results.get(section) or {}).items():
            for key, value in values.items():
                name, _, filter_name = key.partition(",")
                if "_stderr" in name or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                if name in ("sample_len", "sample_count") or not math.isfinite(float(value)):
                    continue
                metrics[f"{task}/{name if filter_name in ('', 'none') else f'{name}_{filter_name}'}"] = float(value)
    return metrics


def quiet_lm_eval(level: int = logging.ERROR) -> None:
    """lm-eval logs a warning per task and per truncated request; keep its log to errors."""
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(level)
