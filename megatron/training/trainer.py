"""The one training loop: micro-batches -> backward -> clip -> AdamW step -> log -> eval -> checkpoint.

It knows nothing about MoE or diffusion: a `Task` hands it batches, a loss and named metrics.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from megatron.parallel import DistInfo, all_reduce_mean
from megatron.parallel.data_parallel import ParallelModel
from megatron.parallel.distributed import note_activity
from megatron.parallel.mesh import ParallelDims
from megatron.parallel.stragglers import StragglerWatch
from megatron.runtime import resident_memory_mb
from megatron.sizing.flops import peak_tflops
from megatron.training import checkpoint as ckpt
from megatron.training.metrics import LossSpikeDetector, MetricsLogger
from megatron.training.optim import build_optimizer, lr_at, set_lr
from megatron.training.signals import StopRequest
from megatron.training.task import Task
from megatron.training.task_eval import TaskEvaluation

log = logging.getLogger("megatron.trainer")


class NonFiniteTraining(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient norm: the run stops without saving."""


@dataclass
class TrainResult:
    final_step: int
    losses: list[float]  # LM loss of every step trained in this run, for tests and tools
    last_eval: dict[str, float]
    train_seconds: float
    overhead_seconds: dict[str, float]
    stopped_by: str | None = None  # the signal that ended the run early (it saved first), if any


def capture_rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain types, so checkpoints load with `weights_only=True`."""
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, torch.tensor(mt_state, dtype=torch.int64), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(int(v) for v in mt_state.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """A distinct random stream per rank (dropout, jitter) after the shared-seed model init."""
    return (seed * 1_000_003 + rank * 7_919 + step) % 2**63


class Trainer:
    def __init__(self, task: Task, args, dist_info: DistInfo, metrics: MetricsLogger, dims: ParallelDims | None = None):
        self.task, self.args, self.dist, self.metrics = task, args, dist_info, metrics
        self.device = dist_info.device
        self.model = task.model.to(self.device)
        dims = dims or ParallelDims(dist_info.world_size, 1, dist_info.rank)
        param_dtype = torch.bfloat16 if args.precision == "bfloat16" and self.device.type == "cuda" else None
        self.parallel = ParallelModel(self.model, dims, args.zero_stage, param_dtype)
        opt = args.optimizer.params  # built after sharding: FSDP2 turns the parameters into DTensors
        self.optimizer = build_optimizer(
            self.model, opt.lr, tuple(opt.betas), opt.eps, args.weight_decay, self.device, task.lr_scales(),
            fp16=args.precision == "fp16",
        )
        self.warmup_iters = int(round(args.warmup * args.lr_decay_iters))
        self.scaler = self.parallel.grad_scaler(self.device.type, enabled=args.precision == "fp16")
        self.step = 0
        self.nonfinite_total = 0  # steps skipped for a non-finite loss or gradient norm, over the whole run
        self.nonfinite_streak = 0  # of them, the consecutive ones up to now
        self.peak: tuple[float, str] | None = None  # (TFLOP/s of one device, its source), found at the first log
        self.pending_save: ckpt.PendingSave | None = None  # an asynchronous save still being written
        self.writing_step: int | None = None  # the checkpoint the main thread is writing (or waiting for) now
        self.spikes = LossSpikeDetector(args.loss_spike_factor)
        self.task_eval = TaskEvaluation.from_args(args, task)  # eval_tasks: lm-eval tasks at their interval
        # SIGTERM/SIGUSR1/SIGINT: save at the next step boundary and return
        self.stop = StopRequest(describe_checkpoints=self.describe_checkpoints)
        self.stop_agreed = False  # some rank was signalled: all ranks learn it in the same step's all-reduce
        # a rank whose own work stays slower than the others' is named at the log interval (off on one rank)
        self.stragglers = StragglerWatch(args.straggler_factor, args.straggler_window, dist_info.rank,
                                         dist_info.world_size, self.device) if (
            args.straggler_factor and dist_info.world_size > 1) else None
        if self.stragglers:
            self.stragglers.clock.exclude_wrapper_waits(self.parallel.module, self.model)

    # -- precision -------------------------------------------------------------------------------
    def autocast(self):
        dtype = {"bfloat16": torch.bfloat16, "fp16": torch.float16}.get(self.args.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    # -- checkpoints -----------------------------------------------------------------------------
    def maybe_resume(self) -> None:
        if not self.args.load:
            return
        path = ckpt.resolve_checkpoint(self.args.load)
        if path is None:
            if self.args.save and not ckpt.same_folder(self.args.load, self.args.save):
                raise FileNotFoundError(f"load: {self.args.load} holds no checkpoint (no 'latest' file), and it is "
                                        f"not this run's save folder: expected a save folder or a global_stepN")
            log.info("no checkpoint in %s yet: starting from scratch", self.args.load)
            return
        ckpt.check_same_run_settings(path, self.args.to_dict())
        state = ckpt.load_checkpoint(path, self.model, self.optimizer, self.dist)
        self.step = state["step"]
        self.task.load_state_dict(state["task"])
        if state.get("rng") is not None:
            restore_rng_state(state["rng"])
        else:  # saved with another world size: a fresh stream per rank, a function of seed, rank and step
            seed_everything(rank_seed(self.args.seed, self.dist.rank, self.step))
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        if "loss_spikes" in state:
            self.spikes.load_state_dict(state["loss_spikes"])
        log.info("resumed from %s at step %d", path, self.step)

    def save(self, must_succeed: bool = False) -> None:
        """A failed save (full disk, unwritable folder) leaves the previous checkpoint intact; the run keeps training
        and tries again at the next interval, unless this save must succeed (the last one, or one before a stop).
        With `async_save` the tensors are written in the background and published at the next save (or the end);
        saves that must succeed are synchronous."""
        note_activity(f"saving the checkpoint of step {self.step}")
        try:
            self.finish_pending_save()  # saves publish in order: `latest` never goes back
            self.writing_step = self.step
            state = {
                "step": self.step,
                "task": self.task.state_dict(),
                "rng": capture_rng_state(),
                "scaler": self.scaler.state_dict(),
                "nonfinite_total": self.nonfinite_total,
                "loss_spikes": self.spikes.state_dict(),  # the window of logged losses (metrics with history)
            }
            pending = ckpt.begin_save(
                self.args.save, self.step, self.model, self.optimizer, state, self.args.to_yaml(), self.dist,
                self.args.keep_last_n_checkpoints, asynchronous=self.args.async_save and not must_succeed,
            )
            if pending.future is None:
                log.info("saved checkpoint %s", pending.finish())
            else:
                self.pending_save = pending
        except ckpt.CheckpointSaveError as err:
            if must_succeed:
                raise
            log.error("%s; training goes on, the next save is at step %d", err,
                      self.step + self.args.checkpoint_factor - self.step % self.args.checkpoint_factor)
        finally:
            self.writing_step = None

    def finish_pending_save(self) -> None:
        pending, self.pending_save = self.pending_save, None
        if pending is not None:
            self.writing_step = pending.step
            try:
                log.info("saved checkpoint %s (written in the background)", pending.finish())
            finally:
                self.writing_step = None

    def describe_checkpoints(self) -> str:
        """What stopping the process now leaves, in words: for the line a third SIGINT prints."""
        latest_file = Path(self.args.save) / "latest" if self.args.save else None
        latest = latest_file.read_text().strip() if latest_file and latest_file.is_file() else "none"
        writing = self.writing_step if self.writing_step is not None else getattr(self.pending_save, "step", None)
        if writing is None:
            return f"no checkpoint was being written (latest: {latest})"
        return (f"the checkpoint being written ({Path(self.args.save) / f'global_step{writing}'}) was abandoned; the "
                f"previous checkpoint is intact (latest: {latest})")

    # -- one optimizer step ----------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        args = self.args
        note_activity(f"training step {self.step + 1}")  # for the line naming a rank that did not arrive
        if self.stragglers:
            self.stragglers.clock.start()
        lr = lr_at(self.step + 1, args.optimizer.params.lr, args.min_lr, self.warmup_iters,
                   args.lr_decay_iters, args.lr_decay_style)
        set_lr(self.optimizer, lr)
        self.parallel.module.train()
        accum = args.gradient_accumulation_steps
        sums: dict[str, torch.Tensor] = {}
        total_loss = torch.zeros((), device=self.device)
        for micro in range(accum):
            batch = self.task.train_batch(self.step, micro)
            with self.parallel.gradient_sync(enabled=micro == accum - 1):
                with self.autocast():
                    loss, step_metrics = self.task.loss(self.parallel.module, batch)
                if self.stragglers and micro == accum - 1:  # the gradient all-reduce, a wait on the others, starts
                    self.stragglers.clock.stop()
                self.scaler.scale(loss / accum).backward()
            total_loss += loss.detach().float() / accum
            for key, value in step_metrics.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float() / accum
        self.parallel.reduce_gradients()
        self.scaler.unscale_(self.optimizer)
        grad_norm = float(self.parallel.clip_grad_norm_(args.gradient_clipping))
        keys = sorted(sums)
        stop_flag = torch.tensor(float(self.stop.requested), device=total_loss.device)
        averaged = all_reduce_mean(torch.stack([total_loss, stop_flag] + [sums[k] for k in keys])).tolist()
        self.stop_agreed = averaged[1] > 0
        # Every rank sees the same averaged loss and global norm, so all skip together. With fp16 the scaler owns
        # overflowing gradients (it skips those steps and lowers the scale); only a non-finite loss counts here.
        finite = math.isfinite(averaged[0]) and (self.scaler.is_enabled() or math.isfinite(grad_norm))
        if finite:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.task.optimizer_stepped()
        self.step += 1
        self.nonfinite_streak = 0 if finite else self.nonfinite_streak + 1
        self.nonfinite_total += 0 if finite else 1
        return {**dict(zip(keys, averaged[2:])), "lr": lr, "grad_norm": grad_norm,
                "nonfinite_steps": float(not finite)}

    def check_nonfinite(self) -> None:
        """A skipped step is a warning; `max_consecutive_nonfinite` in a row stop the run, keeping the checkpoints."""
        if self.nonfinite_streak == 0:
            return
        limit = self.args.max_consecutive_nonfinite
        log.warning("step %d: non-finite loss or gradient norm: step skipped (%d in a row, %d in the run; the run "
                    "stops at %d in a row)", self.step, self.nonfinite_streak, self.nonfinite_total, limit)
        if self.nonfinite_streak >= limit:
            self.finish_pending_save()  # a background save from before the streak is a good one: publish it
            latest = ckpt.resolve_checkpoint(self.args.save) if self.args.save else None
            raise NonFiniteTraining(
                f"{self.nonfinite_streak} consecutive steps (to step {self.step}) had a non-finite loss or gradient "
                f"norm (max_consecutive_nonfinite {limit}): stopped without saving; the last good checkpoint is "
                f"{latest or 'none (nothing was saved)'}; lower the learning rate or enable gradient_clipping")

    # -- the loop --------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        note_activity(f"evaluation after step {self.step}")
        self.parallel.module.eval()
        with torch.no_grad(), self.autocast():
            return self.task.evaluate(self.model)

    def evaluate_tasks(self) -> dict[str, float]:
        """The run's lm-eval tasks (megatron/training/task_eval.py), the random generators left as they were."""
        rng = capture_rng_state()
        try:
            with self.autocast():
                return self.task_eval.run(self.model, self.step)
        finally:
            restore_rng_state(rng)

    def train(self) -> TrainResult:
        args = self.args
        self.maybe_resume()
        losses: list[float] = []
        last_eval: dict[str, float] = {}
        overhead = {"checkpoint": 0.0, "eval": 0.0, "logging": 0.0}
        if self.step >= args.train_iters:
            log.info("already trained to step %d (train_iters %d): nothing to do", self.step, args.train_iters)
            return TrainResult(self.step, losses, last_eval, 0.0, overhead)

        interval: dict[str, float] = {}
        interval_steps, interval_start = 0, time.perf_counter()
        run_start = time.perf_counter()
        progress = tqdm(total=args.train_iters, initial=self.step, disable=not self.dist.is_main,
                        desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)
        stopped_by = None
        self.stop.install()  # SIGTERM/SIGUSR1/SIGINT from here on: save at the next step boundary
        try:  # the bar ends its line even when the run stops on an error, so the error gets a line of its own
            while self.step < args.train_iters:
                step_metrics = self.train_step()
                losses.append(step_metrics.get("loss", math.nan))
                self.check_nonfinite()
                progress.update(1)
                progress.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
                for key, value in step_metrics.items():
                    interval[key] = interval.get(key, 0.0) + value
                interval_steps += 1

                if self.step % args.log_interval == 0 or self.step == args.train_iters:
                    started = time.perf_counter()
                    elapsed = started - interval_start
                    record = {k: v / interval_steps for k, v in interval.items()}
                    record["nonfinite_steps"] = interval.get("nonfinite_steps", 0.0)  # a count, not a mean
                    record["lr"] = step_metrics["lr"]
                    record["tokens"] = self.step * self.task.tokens_per_step()
                    record["tokens_per_sec"] = interval_steps * self.task.tokens_per_step() / max(elapsed, 1e-9)
                    record.update(self.throughput(interval_steps, elapsed))
                    if self.stragglers:  # a collective: every rank logs at the same steps
                        record.update(self.stragglers.update(interval_steps))
                    if self.spikes.is_spike(record.get("loss", math.nan)):
                        record["loss_spike"] = 1.0
                        log.warning("step %d: loss %.4g is above %.1f x the median of the last logged losses",
                                    self.step, record["loss"], self.spikes.factor)
                    record.update(self.task.interval_metrics())
                    rss = resident_memory_mb()
                    if rss is not None:
                        record["memory/rss_mb"] = rss
                    self.metrics.log(self.step, record)
                    interval, interval_steps = {}, 0
                    overhead["logging"] += time.perf_counter() - started
                    interval_start = time.perf_counter()

                if args.eval_interval and (self.step % args.eval_interval == 0 or self.step == args.train_iters):
                    started = time.perf_counter()
                    last_eval = self.evaluate()
                    self.metrics.log(self.step, last_eval)
                    overhead["eval"] += time.perf_counter() - started
                    interval_start += time.perf_counter() - started  # keep eval out of tokens/s
                if self.task_eval is not None and self.task_eval.due(self.step):
                    started = time.perf_counter()
                    self.metrics.log(self.step, self.evaluate_tasks())
                    overhead["eval"] += time.perf_counter() - started
                    interval_start += time.perf_counter() - started

                exiting = bool(args.exit_interval) and len(losses) >= args.exit_interval
                if self.checkpoint_due(exiting):
                    started = time.perf_counter()
                    self.save(must_succeed=exiting or self.stop_agreed or self.step == args.train_iters)
                    overhead["checkpoint"] += time.perf_counter() - started
                    interval_start += time.perf_counter() - started
                if exiting:
                    log.info("exit_interval %d reached at step %d: stopping", args.exit_interval, self.step)
                    break
                if self.stop_agreed:
                    stopped_by = self.stop.received.name if self.stop.received else "a signal to another rank"
                    log.warning("stopping at step %d on %s (checkpoint saved: %s)", self.step, stopped_by,
                                bool(args.save) and self.nonfinite_streak == 0)
                    break
            self.finish_pending_save()  # while the signals still only ask for a stop: a Ctrl-C cannot cut it short
        finally:
            progress.close()
            self.stop.restore()
        total = time.perf_counter() - run_start
        log.info(
            "trained %d steps in %.1fs; checkpoint I/O %.1f%%, logging %.1f%%, evaluation %.1f%% of the time",
            len(losses), total, 100 * overhead["checkpoint"] / total, 100 * overhead["logging"] / total,
            100 * overhead["eval"] / total,
        )
        return TrainResult(self.step, losses, last_eval, total, overhead, stopped_by)

    def throughput(self, steps: int, seconds: float) -> dict[str, float]:
        """Achieved model TFLOP/s per rank and MFU against one device's peak (tasks that count their FLOPs)."""
        flops_per_step = getattr(self.task, "flops_per_step", None)
        if flops_per_step is None:
            return {}
        if self.peak is None:
            self.peak = (self.args.peak_tflops, "the peak_tflops key") if self.args.peak_tflops else peak_tflops(
                self.device, self.args.precision)
            log.info("MFU against %.3g TFLOP/s per device (%s)", *self.peak)
        achieved = flops_per_step() * steps / max(seconds, 1e-9) / self.dist.world_size / 1e12
        return {"tflops_per_rank": achieved, "mfu": achieved / self.peak[0]}

    def checkpoint_due(self, exiting: bool) -> bool:
        if not self.args.save or self.nonfinite_streak:  # never rotate a good checkpoint out for a bad one
            return False
        args = self.args
        return (self.step % args.checkpoint_factor == 0 or self.step == args.train_iters or exiting
                or self.stop_agreed)
