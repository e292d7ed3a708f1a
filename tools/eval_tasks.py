"""Downstream evaluation of a checkpoint with lm-evaluation-harness, on our model directly (no export).

    python tools/eval_tasks.py CHECKPOINT --tasks hellaswag,arc_easy,piqa,lambada_openai [--limit N]
        [--num_fewshot K] [--output results.json] [--include_path DIR] [--batch_size 16] [--device cuda]
        [--dtype bfloat16] [--log_samples] [--bootstrap_iters N]

CHECKPOINT is a save folder (its `latest` is read) or one global_stepN folder; any GPT we train (dense, MoE,
StructMoE, every family) is evaluated as its own code computes it, with LSH compression off. lm-eval's table
is printed and `--output` gets its JSON (results, configs, versions, n-shot; per-document samples with
--log_samples). lm-eval fetches its tasks' datasets from the Hugging Face Hub; offline, tasks defined by
local YAML files run with `--include_path DIR` (tests/data/lm_eval_tasks: four small tasks built from the
bundled corpus). A task that cannot run (unknown, dataset unreachable) is one line naming it; the others
still run, and the exit status is 1. Several processes split the documents: torchrun --nproc_per_node N
tools/eval_tasks.py ... (each holds the whole model; rank 0 prints and writes). Needs the `eval` extra
(pip install -e '.[eval]'). docs/evaluation.md has more.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the package is the repo's
    sys.path.insert(0, str(REPO))

from megatron.config import ConfigError  # noqa: E402
from megatron.evaluation.lm_eval_tasks import (  # noqa: E402
    TaskError,
    lm_eval_module,
    quiet_lm_eval,
    run_tasks,
    task_manager,
)
from megatron.runtime import MissingExtra  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a save folder (its `latest` is read) or one global_stepN folder")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task, group or tag names")
    parser.add_argument("--limit", type=float, default=None, help="documents per task (below 1: a fraction)")
    parser.add_argument("--num_fewshot", "--num-fewshot", type=int, default=None)
    parser.add_argument("--output", "--output_path", type=Path, default=None, help="the results JSON to write")
    parser.add_argument("--include_path", "--include-path", action="append", default=[],
                        help="a folder of lm-eval task YAML files (repeatable)")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=16)
    parser.add_argument("--max_gen_toks", type=int, default=256, help="generation tasks' default token budget")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--log_samples", action="store_true", help="per-document inputs and outputs in the JSON")
    parser.add_argument("--bootstrap_iters", type=int, default=100000, help="for standard errors; 0: none")
    parser.add_argument("--seed", type=int, default=None,
                        help="lm-eval's seeds (few-shot draws, sampling); default: lm-eval's own")
    parser.add_argument("--verbose", action="store_true", help="lm-eval's warnings too")
    opts = parser.parse_args(argv)
    if opts.limit is not None and opts.limit == int(opts.limit):
        opts.limit = int(opts.limit)
    opts.tasks = [task.strip() for task in opts.tasks.split(",") if task.strip()]
    if not opts.tasks:
        parser.error("--tasks: expected at least one task name")
    return opts


def process_group() -> tuple[int, int]:
    """(rank, world size): torchrun's when launched by it (a gloo or NCCL group is started), else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return torch.distributed.get_rank(), world


def main(argv: list[str] | None = None) -> dict:
    opts = parse(argv)
    if not opts.verbose:
        quiet_lm_eval()
    try:
        rank, world = process_group()
        manager = task_manager(opts.tasks, opts.include_path)  # unknown names before the checkpoint is read
        from megatron.evaluation.lm_eval_adapter import MegatronLM

        lm = MegatronLM.from_checkpoint(opts.checkpoint, device=opts.device, dtype=DTYPES[opts.dtype],
                                        batch_size=opts.batch_size, max_gen_toks=opts.max_gen_toks, rank=rank,
                                        world_size=world, seed=1234 if opts.seed is None else opts.seed)
        run = run_tasks(lm, opts.tasks, manager, opts.limit, opts.num_fewshot, opts.log_samples,
                        opts.bootstrap_iters, seed=opts.seed)
    except (ConfigError, TaskError, MissingExtra, FileNotFoundError, ValueError) as err:
        sys.exit(f"eval_tasks: {err}")
    results = {"checkpoint": str(lm.checkpoint), **run.results, "errors": run.errors}
    if rank == 0:
        utils = lm_eval_module("lm_eval.utils")
        for section in ("results", "groups"):
            if run.results.get(section):
                print(utils.make_table(run.results, section))
        if opts.output is not None:
            opts.output.parent.mkdir(parents=True, exist_ok=True)
            opts.output.write_text(json.dumps(results, indent=2, default=utils.handle_non_serializable,
                                              ensure_ascii=False) + "\n")
    if run.errors:
        sys.exit("\n".join(f"eval_tasks: {line}" for line in run.errors.values()))
    return results


if __name__ == "__main__":
    main()
