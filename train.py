"""Entry point: python train.py CONFIG.yml [MORE.yml ...] [--key value ...] [--debug]

Loads and checks the config, joins the process group (under torchrun), builds the task and runs
the one trainer loop. Works the same on one CPU and under torchrun/SLURM on many GPUs.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch

from megatron.config import ConfigError, check_data_files, check_machine, load_config, parse_command_line
from megatron.parallel import destroy, init_distributed
from megatron.parallel.distributed import describe_failure, ranks_from_env
from megatron.parallel.mesh import build_parallel_dims
from megatron.runtime import MissingExtra, keep_freed_memory_in_process
from megatron.training.checkpoint import CheckpointSaveError
from megatron.training.lm_task import LMTask
from megatron.training.metrics import MetricsLogger, setup_console_logging
from megatron.training.preflight import preflight
from megatron.training.signals import ctrl_c_exits
from megatron.training.task import Task
from megatron.training.trainer import NonFiniteTraining, Trainer, TrainResult, rank_seed, seed_everything

log = logging.getLogger("megatron")
# A run stopped early by SIGTERM/SIGUSR1/SIGINT (saved, exit 0) writes its step to the file this variable names, so a
# launcher (launch/slurm.sbatch) can tell "pre-empted: requeue" from "finished".
STOPPED_FILE_VARIABLE = "MEGATRON_STOPPED_FILE"


def build_task(args, dist_info, dims) -> Task:
    """The model family of the config: a GPT language model (default) or a (Remix-)DiT."""
    if args.model_type == "dit":
        from megatron.training.dit_task import DiTTask

        return DiTTask(args, dist_info)
    return LMTask(args, dist_info, dims.expert_parallel())


def run(argv: list[str]) -> TrainResult:
    rank, world_size, _ = ranks_from_env()
    setup_console_logging(rank)
    config_paths, overrides = parse_command_line(argv)
    args = load_config(config_paths, overrides, data_parallel_size=world_size)
    check_data_files(args)
    check_machine(args)
    dist_info = init_distributed(args.device, args.distributed_timeout_minutes)
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restarts and dist_info.is_main:  # torchrun's elastic agent re-formed the group, maybe smaller or larger
        log.warning("restart %d of torchrun's elastic agent: %d rank(s) now; train_batch_size %d kept with "
                    "gradient_accumulation_steps %d x micro batch %d x %d rank(s)", restarts, world_size,
                    args.train_batch_size, args.gradient_accumulation_steps, args.train_micro_batch_size_per_gpu,
                    world_size)
    save_lock = preflight(args, dist_info.is_main)  # ranks agree, folders writable, no other run's checkpoints
    try:
        return run_training(args, dist_info)
    finally:
        if save_lock is not None:
            save_lock.release()


def run_training(args, dist_info) -> TrainResult:
    dims = build_parallel_dims(dist_info, args.moe_expert_parallel_size)
    if dist_info.is_main:
        log.info("resolved config:\n%s", args.to_yaml())
    seed_everything(args.seed)  # the same on every rank: the same initial weights
    if dist_info.device.type == "cpu":
        torch.set_float32_matmul_precision("highest")
        if not args.lsh_compression:  # LSH's centroid counts change every step: a never-trimmed heap fragments
            keep_freed_memory_in_process()
    task = build_task(args, dist_info, dims)
    seed_everything(rank_seed(args.seed, dist_info.rank))  # then a stream per rank (dropout, jitter)
    n_params = sum(p.numel() for p in task.model.parameters())
    log.info("model: %.2fM parameters on rank 0 of %s (%d rank(s), expert-parallel %d, ZeRO stage %d)",
             n_params / 1e6, dist_info.device, dist_info.world_size, dims.ep_size, args.zero_stage)
    metrics = MetricsLogger(
        enabled=dist_info.is_main,
        log_dir=args.log_dir,
        tensorboard_dir=args.tensorboard_dir,
        use_wandb=args.use_wandb,
        wandb_project=args.wandb_project,
        wandb_group=args.wandb_group,
        wandb_mode=args.wandb_mode,
        run_config=args.to_dict(),
    )
    try:
        result = Trainer(task, args, dist_info, metrics, dims).train()
    finally:
        metrics.close()
        destroy()
    if result.stopped_by and dist_info.is_main and os.environ.get(STOPPED_FILE_VARIABLE):
        Path(os.environ[STOPPED_FILE_VARIABLE]).write_text(f"{result.final_step}\n")  # the launcher requeues
    return result


# Bad input found after the config (a damaged dataset, a checkpoint of another model, a missing file) surfaces as
# one of these, with a message naming the file and what was expected: shown as one line unless --debug.
INPUT_ERRORS = (ValueError, FileNotFoundError, IsADirectoryError, PermissionError, EOFError, MissingExtra)


def main() -> None:
    argv = sys.argv[1:]
    debug = "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    try:
        with ctrl_c_exits():  # Ctrl-C before the first step or after the last: one line, exit 130
            run(argv)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    except INPUT_ERRORS as err:
        if debug:
            raise
        print(f"error: {err} ({type(err).__name__}; --debug shows the traceback)", file=sys.stderr)
        sys.exit(2)
    except NonFiniteTraining as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(4)
    except CheckpointSaveError as err:  # the last save failed: the previous checkpoint is intact
        print(f"error: {err}", file=sys.stderr)
        sys.exit(5)
    except RuntimeError as err:  # another rank timed out or died: say so in one line, not a C++ backtrace
        message = describe_failure(err)
        if message is None or debug:
            raise
        print(message, file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()
