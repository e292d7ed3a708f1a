"""lm-evaluation-harness tasks during training (`eval_tasks`): every eval_tasks_interval steps (else every
eval_interval) and at the last step, the model as it trains answers the tasks, and each task's metrics are logged
like the validation loss (metrics.jsonl, TensorBoard, wandb) as `lm_eval/TASK/METRIC`.

A task that cannot run (its dataset unreachable, a crash inside it) is one warning line naming it, and training
goes on; an unknown task name or a missing lm-eval stops the run before its first step. The evaluation leaves
training as it was: lm-eval does not reseed the global generators (and the trainer restores them), LSH
compression is off only while it runs, and the model is back in training mode at the next step. Every rank
runs all the documents (an expert-parallel or sharded model needs every rank in each forward); rank 0 logs.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn as nn

from megatron.config import ConfigError
from megatron.data.tokenizer import Tokenizer
from megatron.evaluation.lm_eval_tasks import TaskError, quiet_lm_eval, run_tasks, task_manager, task_metrics
from megatron.runtime import MissingExtra

log = logging.getLogger("megatron")


class TaskEvaluation:
    """The run's `eval_tasks`, resolved once (task names checked, lm-eval imported) before training starts."""

    def __init__(self, args, tokenizer: Tokenizer):
        self.tasks = list(args.eval_tasks)
        self.interval = args.eval_tasks_interval or args.eval_interval
        self.last_step = args.train_iters
        self.limit, self.num_fewshot = args.eval_tasks_limit, args.eval_tasks_num_fewshot
        self.batch_size = args.train_micro_batch_size_per_gpu
        self.tokenizer = tokenizer
        quiet_lm_eval()
        try:
            self.manager = task_manager(self.tasks, args.eval_tasks_include_path)
        except (TaskError, MissingExtra) as err:
            raise ConfigError(f"eval_tasks: {err}") from None

    @classmethod
    def from_args(cls, args, task) -> TaskEvaluation | None:
        if not args.eval_tasks:
            return None
        return cls(args, task.tokenizer)

    def due(self, step: int) -> bool:
        return step % self.interval == 0 or step == self.last_step

    def run(self, model: nn.Module, step: int) -> dict[str, float]:
        """{`lm_eval/TASK/METRIC`: value, `lm_eval/seconds`: wall time}; the model in eval mode, no gradients."""
        from megatron.evaluation.lm_eval_adapter import MegatronLM, exact_moe_exchange

        started = time.perf_counter()
        model.eval()
        with torch.no_grad(), exact_moe_exchange(model):
            lm = MegatronLM(model, self.tokenizer, batch_size=self.batch_size)
            run = run_tasks(lm, self.tasks, self.manager, self.limit, self.num_fewshot, bootstrap_iters=0,
                            keep_global_rng=True)
        for line in run.errors.values():
            log.warning("eval_tasks at step %d: %s; training goes on", step, line)
        metrics = {f"lm_eval/{name}": value for name, value in task_metrics(run.results).items()}
        metrics["lm_eval/seconds"] = time.perf_counter() - started
        return metrics
