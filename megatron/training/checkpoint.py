"""Atomic checkpoints in GPT-NeoX's layout: `SAVE/global_stepN/` and `SAVE/latest` naming the newest.

Shape legend: E experts, D hidden, F expert width.

Model and optimizer go through torch.distributed.checkpoint (DCP): every rank writes and reads only
its own shards, in parallel, and nothing is gathered on one rank. A checkpoint loads into any layout
(world size, expert-parallel size, ZeRO stage): DCP reshards plain and FSDP-sharded tensors by their
global shapes, and expert tensors, whose stacked shape depends on how many experts a rank holds, are
stored as one entry per global expert (`...experts.w_up_EDF/expert5`), which every layout agrees on.
Each rank also writes a small `rank{r}.pt` with what only it knows (RNG states). A checkpoint is first
written to a hidden temporary folder, fsynced, then renamed; `latest` is replaced last, so a crash at
any moment leaves the previous checkpoint and `latest` intact.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import yaml
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

from megatron.config.schema import DATA_POSITION_KEYS, MODEL_KEYS
from megatron.parallel import DistInfo, all_reduce_mean
from megatron.parallel.data_parallel import expert_parameter_names, expert_state_names
from megatron.parallel.distributed import checkpoint_group

log = logging.getLogger("megatron.checkpoint")
TAG_PATTERN = re.compile(r"^global_step(\d+)$")
# DCP warns on every single-process save/load; one process is a supported, intended case here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def _expert_block(tensor: torch.Tensor, index: int, num_local: int, to_host: bool = False) -> torch.Tensor:
    """Expert `index`'s block of rows of a stacked expert tensor, as a view (so DCP loads in place); `to_host`:
    as a CPU copy of its own instead (for asynchronous saves: DCP's stager fails on several views of one storage,
    "Attempted to call copy_() on an invalid python storage", and copies everything to the host anyway)."""
    rows = tensor.shape[0] // num_local
    take = (lambda t: t.to("cpu", copy=True)) if to_host else (lambda t: t)
    if not isinstance(tensor, DTensor):
        return take(tensor[index * rows:(index + 1) * rows])
    if any(getattr(p, "dim", None) == 0 for p in tensor.placements):
        raise ValueError("expert tensors must not be sharded along the expert dimension")
    shape = torch.Size((rows, *tensor.shape[1:]))
    block = take(tensor.to_local()[index * rows:(index + 1) * rows])
    return DTensor.from_local(block, tensor.device_mesh, tensor.placements, shape=shape,
                              stride=torch.empty(shape, device="meta").stride())


def _split_experts(values: dict[str, Any], experts: dict[str, range], to_host: bool = False) -> dict[str, Any]:
    """The same entries, with every stacked expert tensor split into one entry per global expert."""
    out = {}
    for key, value in values.items():
        ids = experts.get(key)
        if ids is None:
            out[key] = value
        elif isinstance(value, dict):  # an optimizer's per-parameter state: exp_avg, exp_avg_sq, step
            for i, expert in enumerate(ids):
                out[f"{key}/expert{expert}"] = {
                    name: _expert_block(t, i, len(ids), to_host) if torch.is_tensor(t) and t.ndim > 0 else t
                    for name, t in value.items()
                }
        else:
            for i, expert in enumerate(ids):
                out[f"{key}/expert{expert}"] = _expert_block(value, i, len(ids), to_host)
    return out


def layout_free_state(model: nn.Module, optimizer: torch.optim.Optimizer, experts_to_host: bool = False
                      ) -> tuple[dict, dict, dict]:
    """(model state, optimizer state, what DCP writes/reads): the last views the first two per expert (or, with
    `experts_to_host`, holds CPU copies of the expert blocks, for an asynchronous save)."""
    model_state, optim_state = get_state_dict(model, optimizer)
    experts = expert_parameter_names(model)
    optim_view = {**optim_state, "state": _split_experts(optim_state["state"], experts, experts_to_host)}
    model_view = _split_experts(model_state, expert_state_names(model), experts_to_host)
    return model_state, optim_state, {"model": model_view, "optim": optim_view}


class CheckpointSaveError(RuntimeError):
    """A save failed on some rank (full disk, unwritable folder): nothing was published, the previous checkpoint and
    `latest` are intact, and the partial folder is removed."""


def _all_ranks_succeeded(ok: bool) -> bool:
    flag = torch.tensor([1.0 if ok else 0.0], device=_collective_device())
    return bool(all_reduce_mean(flag).item() == 1.0)


def _collective_device() -> torch.device:
    """Where a small tensor for a collective lives: the current CUDA device under NCCL, else the CPU."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def save_checkpoint(
    save_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    rank_state: dict[str, Any],
    config_yaml: str,
    dist_info: DistInfo,
    keep_last_n: int | None = None,
) -> Path:
    """Writes `SAVE/global_stepN` atomically; raises CheckpointSaveError on every rank if any rank failed."""
    return begin_save(save_dir, step, model, optimizer, rank_state, config_yaml, dist_info, keep_last_n).finish()


def begin_save(
    save_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    rank_state: dict[str, Any],
    config_yaml: str,
    dist_info: DistInfo,
    keep_last_n: int | None = None,
    asynchronous: bool = False,
) -> PendingSave:
    """Starts a save into a hidden folder; `finish()` publishes it. Asynchronous: the tensors are copied to CPU
    memory here (the only stall) and written by DCP's background thread while training goes on."""
    save_dir = Path(save_dir)
    tag = f"global_step{step}"
    pending = PendingSave(save_dir, step, save_dir / f".tmp_{tag}", rank_state, config_yaml, dist_info, keep_last_n)
    error: BaseException | None = None
    try:
        if dist_info.is_main:
            save_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(pending.tmp, ignore_errors=True)  # left over from a crash
            pending.tmp.mkdir()
    except OSError as err:
        error = err
    if not _all_ranks_succeeded(error is None):
        raise _save_failed(save_dir, pending.tmp, step, error, dist_info)
    try:
        _, _, state = layout_free_state(model, optimizer, experts_to_host=asynchronous)
        if asynchronous:
            pending.future = dcp.async_save(state, checkpoint_id=pending.tmp, process_group=checkpoint_group())
        else:
            dcp.save(state, checkpoint_id=pending.tmp)
    except (OSError, CheckpointException, RuntimeError) as err:  # ENOSPC and friends, as DCP or torch report them
        pending.error = err
    return pending


@dataclass
class PendingSave:
    """A checkpoint written (or being written) to its hidden folder, not yet published as `latest`."""

    save_dir: Path
    step: int
    tmp: Path
    rank_state: dict[str, Any]
    config_yaml: str
    dist_info: DistInfo
    keep_last_n: int | None
    future: Any = None  # DCP's async_save future
    error: BaseException | None = None

    def finish(self) -> Path:
        """Waits for the tensors, writes this rank's state, then publishes: rename, `latest`, pruning."""
        tag = f"global_step{self.step}"
        final, error = self.save_dir / tag, self.error
        try:
            if self.future is not None and error is None:  # a Future, or a response holding one for the upload
                getattr(self.future, "upload_completion", self.future).result()
            with open(self.tmp / f"rank{self.dist_info.rank}.pt", "wb") as f:
                torch.save(self.rank_state, f)
                f.flush()
                os.fsync(f.fileno())
            if self.dist_info.is_main:
                (self.tmp / "config.yml").write_text(self.config_yaml)
                for path in self.tmp.iterdir():
                    _fsync_path(path)
                _fsync_path(self.tmp)
        except (OSError, CheckpointException, RuntimeError) as err:
            error = error or err
        if not _all_ranks_succeeded(error is None):
            raise _save_failed(self.save_dir, self.tmp, self.step, error, self.dist_info)
        try:
            if self.dist_info.is_main:
                if final.exists():  # re-saving a step: move the old copy aside before replacing it
                    stale = self.save_dir / f".old_{tag}"
                    shutil.rmtree(stale, ignore_errors=True)
                    final.rename(stale)
                    shutil.rmtree(stale)
                self.tmp.rename(final)
                _fsync_path(self.save_dir)
                write_file_atomically(self.save_dir / "latest", tag.encode())
                if self.keep_last_n:
                    prune_checkpoints(self.save_dir, self.keep_last_n)
        except OSError as err:  # `latest` still names the previous checkpoint: that one stays the one to resume from
            error = err
        if not _all_ranks_succeeded(error is None):
            raise _save_failed(self.save_dir, self.tmp, self.step, error, self.dist_info)
        return final


def _save_failed(save_dir: Path, tmp: Path, step: int, error: BaseException | None,
                 dist_info: DistInfo) -> CheckpointSaveError:
    if dist_info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # free what the partial save took
    reason = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}" if (
        error is not None) else "failed on another rank"
    latest = save_dir / "latest"
    kept = latest.read_text().strip() if latest.is_file() else "none"
    return CheckpointSaveError(f"saving {save_dir / f'global_step{step}'} failed ({reason}); the previous checkpoint "
                               f"is intact (latest: {kept})")


def list_checkpoints(save_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for path in save_dir.iterdir() if save_dir.is_dir() else []:
        match = TAG_PATTERN.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def prune_checkpoints(save_dir: Path, keep_last_n: int) -> None:
    latest = (save_dir / "latest").read_text().strip()
    for _, path in list_checkpoints(save_dir)[:-keep_last_n]:
        if path.name != latest:
            shutil.rmtree(path)


def resolve_checkpoint(load: str | Path) -> Path | None:
    """`load` names a save folder (its `latest` is used) or one checkpoint; None when the folder has none yet.
    A checkpoint named explicitly (`.../global_stepN`) that is not there, or a file, is an error."""
    load = Path(load)
    if (load / ".metadata").is_file():
        return load
    if load.is_file():
        raise FileNotFoundError(f"load: {load} is a file; expected a save folder or one of its global_stepN folders")
    if TAG_PATTERN.match(load.name):
        present = sorted(p.name for p in load.parent.glob("global_step*")) if load.parent.is_dir() else []
        raise FileNotFoundError(f"load: {load} is not a complete checkpoint (no .metadata); "
                                f"checkpoints in {load.parent}: {', '.join(present[-5:]) or 'none'}")
    latest = load / "latest"
    if not latest.is_file():
        return None
    name = latest.read_text().strip()
    if not name:
        raise FileNotFoundError(f"load: {latest} is empty; expected the name of a checkpoint folder such as "
                                "global_step100 (write one there, or delete the file to start from scratch)")
    path = load / name
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"load: {latest} names {path.name}, which is not a complete checkpoint")
    return path


def same_folder(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def check_same_run_settings(path: Path, config: dict[str, Any]) -> None:
    """The run resuming from `path` has the checkpoint's model (MODEL_KEYS) and counts its data position in the
    same global batches (DATA_POSITION_KEYS); else one line naming every key that differs. Checked against the
    config.yml the checkpoint was saved with (a checkpoint without one is checked by its tensor shapes only).
    A step-0 checkpoint (a converted or upcycled model) has consumed no data, so its batch does not matter."""
    try:
        saved = yaml.safe_load((path / "config.yml").read_text()) or {}
    except FileNotFoundError:
        return
    tag = TAG_PATTERN.match(path.name)
    keys = MODEL_KEYS + (DATA_POSITION_KEYS if tag is None or int(tag.group(1)) > 0 else ())
    differ = [key for key in keys if key in saved and saved[key] != config.get(key)]
    if not differ:
        return
    shown = "; ".join(f"{key}: checkpoint {saved[key]!r}, config {config.get(key)!r}" for key in differ)
    what = "another model" if any(key in MODEL_KEYS for key in differ) else "another global batch or sequence"
    fix = "resume with the checkpoint's values, or start a new run with another save folder"
    if differ == ["train_batch_size"] and all(saved.get(key) == config.get(key) for key in (
            "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")):  # so the number of ranks changed
        fix = (f"the number of ranks changed ({ranks_of(saved)} -> {ranks_of(config)}, an elastic restart?) with "
               f"gradient_accumulation_steps fixed: set train_batch_size {saved['train_batch_size']} and leave "
               "gradient_accumulation_steps out, so that it is derived from the ranks")
    raise ValueError(f"{path}: saved by a run with {what} ({shown}): {fix}")


def ranks_of(config: dict[str, Any]) -> int | None:
    """The data-parallel size a resolved config was made for (its global batch over micro batch x accumulation)."""
    try:
        return config["train_batch_size"] // (config["train_micro_batch_size_per_gpu"] *
                                              config["gradient_accumulation_steps"])
    except (KeyError, TypeError, ZeroDivisionError):
        return None


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, dist_info: DistInfo
) -> dict[str, Any]:
    """Loads model and optimizer in place; returns this rank's saved state (RNG, step, data position)."""
    model_state, optim_state, state = layout_free_state(model, optimizer)
    check_compatible(path, {"model": state["model"]})
    _load_dcp(state, path)  # in place, into views of model_state and optim_state
    optim_state["param_groups"] = state["optim"]["param_groups"]
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    rank_file = path / f"rank{dist_info.rank}.pt"
    if rank_file.is_file():
        return _load_rank_state(rank_file)
    log.info("%s has no state for rank %d (saved with another world size): rank 0's step and data "
             "position, a fresh random stream", path, dist_info.rank)
    state = _load_rank_state(path / "rank0.pt")
    state["rng"] = None
    return state


def _load_rank_state(path: Path) -> dict[str, Any]:
    """`weights_only=True`: tensors and plain types only, so a checkpoint from elsewhere cannot run code."""
    try:
        return torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing from the checkpoint (a half-copied checkpoint?)") from None
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else "unpickling refused"
        raise ValueError(f"{path}: not loadable as tensors and plain values only ({reason}); refusing to "
                         "unpickle it") from None
    except (EOFError, OSError, RuntimeError, ValueError) as err:  # truncated: EOFError, a zip or seek error
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"{path}: unreadable ({type(err).__name__}: {reason}): a truncated or corrupt checkpoint; "
                         "load an earlier global_step folder") from None


def _load_dcp(state: dict[str, Any], path: Path) -> None:
    try:
        dcp.load(state, checkpoint_id=path)
    except (Exception, CheckpointException) as err:  # DCP wraps reader failures in a BaseException of its own
        first = str(err).strip().splitlines()
        raise ValueError(f"{path}: could not read the checkpoint's tensors ({type(err).__name__}: "
                         f"{first[-1] if first else ''}): a truncated or corrupt checkpoint; load an earlier "
                         "global_step folder") from None


def moe_layers(keys) -> list[int]:
    """The layer indices that hold a router, from state-dict keys (`...blocks.3.mlp.router...`)."""
    return sorted({int(m.group(1)) for key in keys if (m := re.search(r"blocks\.(\d+)\.mlp\.router\.", key))})


def check_compatible(path: Path, state: dict[str, Any]) -> None:
    """The checkpoint holds every tensor of `state` with the same global shape; else one line naming the first
    mismatches (a checkpoint of another model: other width, depth, experts...)."""
    try:
        saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as err:
        raise ValueError(f"{path}: no readable checkpoint metadata ({type(err).__name__}): not a complete "
                         "checkpoint") from None
    expected = {}
    for prefix, values in state.items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                expected[f"{prefix}.{name}"] = tuple(value.shape)
    missing = [key for key in expected if key not in saved]
    prefixes = tuple(f"{prefix}." for prefix in state)
    # tensors the model lacks (a deeper model's, say); per-expert entries aside: with expert parallelism a rank
    # holds only its own experts' share of them
    extra = [key for key in saved if key.startswith(prefixes) and key not in expected and "/expert" not in key]
    wrong = [(key, tuple(saved[key].size), shape) for key, shape in expected.items()
             if key in saved and hasattr(saved[key], "size") and tuple(saved[key].size) != shape]
    if not missing and not wrong and not extra:
        return
    parts = [f"{key}: checkpoint {list(have)}, model {list(want)}" for key, have, want in wrong[:3]]
    if missing:
        parts.append(f"{len(missing)} tensors missing from the checkpoint, e.g. {missing[0]}")
    if extra:
        parts.append(f"{len(extra)} checkpoint tensors the model lacks, e.g. {extra[0]}")
    saved_moe, model_moe = moe_layers(saved), moe_layers(expected)
    if saved_moe and model_moe and saved_moe != model_moe:
        parts.append(f"MoE layers: checkpoint {saved_moe}, model {model_moe}: set moe_first_layer to "
                     f"{saved_moe[0]} to match")
    raise ValueError(f"{path}: a checkpoint of another model shape ({len(wrong)} tensors differ: "
                     + "; ".join(parts) + ")")


def load_model_weights(path: Path, model: nn.Module) -> None:
    """The model's weights only (no optimizer state is read), for evaluation, analysis and export."""
    model_state = get_model_state_dict(model)
    state = {"model": _split_experts(model_state, expert_state_names(model))}
    check_compatible(path, state)
    _load_dcp(state, path)
    set_model_state_dict(model, model_state)
