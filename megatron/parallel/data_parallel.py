"""Data parallelism around the model: DDP or FSDP2 (ZeRO stages), with expert parallelism, as one object.

What "the same model on one rank with the same global batch" asks of the gradients: the loss is the
mean of the W ranks' losses, so a non-expert gradient is the mean over all W ranks. An expert's gradient
on one rank already sums the contributions of every token its EP group sent it (the all-to-all's
backward brings them back), so it is summed over the ranks holding the same expert and divided by W.

GPT-NeoX's `zero_optimization.stage` maps onto this as:
- 0: DDP. Parameters, gradients and AdamW state replicated (experts: replicated within their EP slot).
- 1, 2: FSDP2 without resharding after forward: parameters, gradients and optimizer state sharded at
  rest; a layer's parameters, once gathered for forward, stay gathered until its backward (ZeRO-2; a
  separate stage 1, which keeps full gradients, would only use more memory).
- 3: FSDP2 resharding after forward: parameters are gathered again for backward (ZeRO-3).
Non-expert parameters are sharded over all ranks, expert parameters over the ranks holding the same
experts, along their largest evenly divisible dimension other than the expert one (`expert_shard_dim`).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.distributed.tensor import DTensor, Shard
from torch.nn.parallel import DistributedDataParallel

from megatron.parallel.mesh import ParallelDims


def expert_modules(model: nn.Module) -> dict[str, tuple[nn.Module, range]]:
    """Every module holding experts' weights (experts, LoRE banks), by name, with the global expert ids
    its parameters' leading dimension runs over (in order, an equal block of rows per expert)."""
    found = {}
    for name, module in model.named_modules():
        if hasattr(module, "expert_parts"):  # an MoE layer
            for part in module.expert_parts():
                part_name = next(n for n, child in module.named_children() if child is part)
                found[f"{name}.{part_name}" if name else part_name] = (part, module.local_experts)
    return found


def expert_parameter_names(model: nn.Module) -> dict[str, range]:
    """Fully qualified name of every expert-owned parameter -> the global expert ids it holds."""
    names = {}
    for prefix, (module, experts) in expert_modules(model).items():
        for name, _ in module.named_parameters():
            names[f"{prefix}.{name}"] = experts
    return names


def expert_state_names(model: nn.Module) -> dict[str, range]:
    """The expert parameters plus the experts' persistent buffers (each expert's LoRE routing bias): every entry
    whose leading dimension runs over the local experts, which a checkpoint stores per expert."""
    names = {}
    for prefix, (module, experts) in expert_modules(model).items():
        for name in module.state_dict(keep_vars=True):
            names[f"{prefix}.{name}"] = experts
    return names


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class ParallelModel:
    """The model as the trainer drives it: call `module`, sync gradients, reduce them, clip them."""

    def __init__(self, model: nn.Module, dims: ParallelDims, zero_stage: int = 0,
                 param_dtype: torch.dtype | None = None):
        """DDP runs without `find_unused_parameters` (a traversal of the autograd graph every step): every
        parameter gets a gradient each step, experts included, since the grouped kernels' backward writes
        the whole stacked weight (zeros for an expert that got no rows)."""
        self.model, self.dims, self.zero_stage = model, dims, zero_stage
        expert_names = expert_parameter_names(model)
        self.sharded = dims.world_size > 1 and zero_stage > 0
        if dims.world_size == 1:
            self.module = model
        elif self.sharded:
            shard_with_fsdp(model, dims, reshard_after_forward=zero_stage == 3, param_dtype=param_dtype)
            self.module = model
        else:
            if dims.ep_size > 1:  # experts differ per EP rank: DDP must leave them to `reduce_gradients`
                # ... and their buffers (LoRE biases and running counts), which are per EP rank too
                expert_buffers = [f"{prefix}.{name}" for prefix, (module, _) in expert_modules(model).items()
                                  for name, _ in module.named_buffers()]
                DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                    model, list(expert_names) + expert_buffers)
            self.module = DistributedDataParallel(model)
        # after wrapping: FSDP2 replaces the parameter objects (by DTensors of the same names)
        named = dict(model.named_parameters())
        self.expert_params = [named[name] for name in expert_names]
        # how many ranks hold a copy of each gradient element once gradients are reduced (for the norm)
        replicas = dict.fromkeys(named, 1 if self.sharded else dims.world_size)
        if not self.sharded and dims.ep_size > 1:
            replicas.update(dict.fromkeys(expert_names, dims.edp_size))
        self._replicas = [(named[name], count) for name, count in replicas.items()]

    def grad_scaler(self, device_type: str, enabled: bool) -> torch.amp.GradScaler:
        """The fp16 loss scaler. Where gradients differ per rank (sharded, or experts), an overflow on one
        rank must skip the step on all of them: ShardedGradScaler all-reduces the overflow flag."""
        if self.dims.world_size > 1 and (self.sharded or self.dims.ep_size > 1):
            return ShardedGradScaler(device_type, enabled=enabled)
        return torch.amp.GradScaler(device_type, enabled=enabled)

    def gradient_sync(self, enabled: bool):
        """Context for one micro-batch's backward: reduce gradients only on the last one."""
        if enabled or self.dims.world_size == 1:
            return contextlib.nullcontext()
        if self.sharded:
            return _fsdp_no_sync(self.model)
        return self.module.no_sync()

    def reduce_gradients(self) -> None:
        """After the last backward of a step: the expert part of the reduction DDP/FSDP cannot do."""
        if self.dims.ep_size == 1 or not self.expert_params:
            return
        grads = [p.grad for p in self.expert_params if p.grad is not None]
        if self.sharded:  # FSDP averaged over the expert replicas (edp); the mean is over all W ranks
            torch._foreach_mul_([_local(g) for g in grads], 1.0 / self.dims.ep_size)
            return
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=self.dims.expert_mesh["edp"].get_group())
        flat /= self.dims.world_size
        for grad, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            grad.copy_(reduced)

    def clip_grad_norm_(self, max_norm: float) -> float:
        """The global L2 norm of all gradients (each element counted once whatever the layout); scales
        the gradients down to `max_norm` as torch.nn.utils.clip_grad_norm_ does; returns the norm."""
        with_grads = [(p, count) for p, count in self._replicas if p.grad is not None]
        if not with_grads:
            return 0.0
        grads = [_local(p.grad) for p, _ in with_grads]
        norms = torch._foreach_norm(grads)
        weights = torch.tensor([1.0 / count for _, count in with_grads], device=grads[0].device)
        total_sq = (torch.stack(norms).float().square() * weights).sum()
        if self.dims.world_size > 1:
            dist.all_reduce(total_sq)
        total = total_sq.sqrt()
        if max_norm > 0 and torch.isfinite(total):
            clip = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            torch._foreach_mul_(grads, clip.to(grads[0].dtype))
        return float(total)


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module):
    assert isinstance(model, FSDPModule)
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def expert_shard_dim(shape: tuple[int, ...] | torch.Size, shards: int) -> int:
    """The dimension FSDP2 splits an expert tensor on: never 0 (a rank's experts stay whole, and split per
    expert in checkpoints), and one that divides evenly (FSDP2 pads only dim 0): the largest such one."""
    even = [d for d in range(1, len(shape)) if shape[d] % shards == 0]
    if not even:
        raise ValueError(f"an expert tensor of shape {tuple(shape)} has no dimension but the expert one that "
                         f"{shards} ranks (world / moe_expert_parallel_size) divide evenly; raise "
                         "moe_expert_parallel_size or pick a world size that divides the hidden size")
    return max(even, key=lambda d: shape[d])


def shard_with_fsdp(model: nn.Module, dims: ParallelDims, reshard_after_forward: bool,
                    param_dtype: torch.dtype | None = None) -> None:
    """FSDP2 in place: experts over their replicas, every transformer block and the root over all ranks."""
    # cast_forward_inputs off: the residual stream stays fp32 between blocks as under DDP's autocast (torch's
    # default would round it to bf16 at every block), so numerics do not depend on the layout
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None,
                                  cast_forward_inputs=False)
    expert_mesh = dims.expert_mesh["edp"]
    for module, _ in expert_modules(model).values():
        fully_shard(module, mesh=expert_mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy,
                    shard_placement_fn=lambda p: Shard(expert_shard_dim(p.shape, expert_mesh.size())))
    for block in [*getattr(model, "blocks", []), *getattr(model, "mtp", [])]:  # an MTP module is one unit too
        fully_shard(block, mesh=dims.world_mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    fully_shard(model, mesh=dims.world_mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
