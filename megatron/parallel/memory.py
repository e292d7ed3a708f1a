"""Memory per rank of a config at a layout (world size W, expert-parallel size EP, ZeRO stage), on paper.

Shape legend: T tokens per micro-batch (micro-batch x seq_length), D hidden, F MLP width, E experts,
K experts per token, M LoREs per expert, R LoRE rank, V padded vocabulary, L layers.

The layout follows `ParallelModel` (megatron/parallel/data_parallel.py) tensor by tensor. The
parameter shapes come from the model itself, built on the meta device (no memory), and are checked
against the closed-form count of `megatron.model.param_count`; which tensors belong to experts is
decided by the same `expert_parameter_names` that ParallelModel uses. The most loaded rank is rank 0:
it is EP rank 0, which holds ceil(E/EP) experts of every MoE layer, and shard 0 of every FSDP2 mesh,
which FSDP2 gives the largest (padded) chunk.

- W = 1, or stage 0 (DDP): every non-expert tensor whole; expert tensors whole for the local experts.
- Stages 1-3 (FSDP2): non-expert tensors split on dim 0 over all W ranks, expert tensors over the
  edp = W / EP ranks holding the same experts on `expert_shard_dim` (their largest evenly divisible
  dim but the expert one; FSDP2 refuses uneven splits of any dim but 0). FSDP2 pads dim 0 up to a
  multiple of the shard count (each rank stores ceil(rows / n) rows; counted here, tensor by tensor).
- Parameters and gradients are fp32 and laid out alike (gradients after the step's reduction); AdamW
  keeps exp_avg and exp_avg_sq (fp32, the parameter's layout) and a 4-byte step counter per tensor.
- Gathered parameters (FSDP2 only): each FSDP group (root = embeddings, final norm, head; each
  transformer block; each block's experts and LoRE bank) is all-gathered whole, padding included, in
  bf16 when precision is bfloat16 (the trainer's MixedPrecisionPolicy on GPUs) and in fp32 otherwise.
  Stages 1/2 keep every group gathered from its forward to its backward, so the peak holds them all;
  stage 3 holds the root (gathered for the whole forward and again for the whole backward) and about
  two blocks at a time (the current one and the prefetched next one): the largest adjacent pair.

Not counted: DDP's gradient buckets (one more copy of the gradients DDP reduces, kept for the whole
run), the bf16 weight copies autocast caches under DDP, FSDP2's unsharded gradients of the group being
reduced and its all-gather staging buffer, the optimizer's temporaries (none with the fused AdamW used
on CUDA; the CPU foreach kernel makes some), the CUDA context and the allocator's fragmentation.

Activations (`activation_bytes`) are a rough estimate; see its docstring for what it counts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from megatron.model.build import gpt_config_from_args, moe_settings_from_args
from megatron.model.gpt import GPT
from megatron.model.param_count import count_parameters, vocab_size_of
from megatron.parallel.data_parallel import expert_parameter_names, expert_shard_dim
from megatron.parallel.expert_parallel import experts_per_rank

FP32 = 4
STEP_COUNTER_BYTES = 4  # AdamW's per-tensor `step`, a float32 scalar


@dataclass
class MemoryEstimate:
    params_bytes: int  # persistent parameter bytes on the most loaded rank (fp32 master weights)
    grads_bytes: int  # gradient bytes at rest after the step's reduction
    optimizer_bytes: int  # AdamW exp_avg + exp_avg_sq (+ the step counters, negligible)
    gathered_params_bytes: int  # transient unsharded parameter bytes at the peak of forward/backward (0 for DDP)
    activations_bytes: int  # rough activation estimate at the config's micro-batch (see activation_bytes)

    def state_bytes(self) -> int:
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes

    def peak_bytes(self) -> int:
        return self.state_bytes() + self.gathered_params_bytes + self.activations_bytes


@dataclass(frozen=True)
class ParamShape:
    """One parameter tensor of the full (one-rank) model, as the layout sees it."""

    name: str
    shape: tuple[int, ...]
    expert: bool  # owned by experts: dim 0 runs over the E experts, an equal block of rows each
    block: int | None  # index of the transformer block (its FSDP group, experts included); None: the root


_SHAPES: dict[str, tuple[ParamShape, ...]] = {}


def model_parameters(args) -> tuple[ParamShape, ...]:
    """Every parameter of the config's model, built once per model config on the meta device.

    moe_impl: megablocks stores the same expert weights as [E*F, D]; the native layout is used here (the
    same element counts; only the dim FSDP2 splits differs, D instead of D or F).
    """
    cfg = gpt_config_from_args(args, vocab_size_of(args))
    if cfg.moe is not None:
        cfg.moe = dataclasses.replace(cfg.moe, impl="native")
    key = repr(cfg)
    if key not in _SHAPES:
        with torch.device("meta"):
            model = GPT(cfg)
        experts = expert_parameter_names(model)
        shapes = []
        for name, param in model.named_parameters():
            block = int(name.split(".")[1]) if name.startswith("blocks.") else None
            shapes.append(ParamShape(name, tuple(param.shape), name in experts, block))
        total, expected = sum(math.prod(p.shape) for p in shapes), count_parameters(args).total
        if total != expected:
            raise RuntimeError(f"the model has {total} parameters but param_count says {expected}")
        _SHAPES[key] = tuple(shapes)
    return _SHAPES[key]


def check_layout(args, world_size: int, ep_size: int, zero_stage: int) -> None:
    """One-line ValueErrors for layouts ParallelModel cannot run (FSDP2's own limit is checked later)."""
    if world_size < 1:
        raise ValueError(f"world size {world_size} must be >= 1")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero stage {zero_stage} must be 0, 1, 2 or 3")
    if ep_size < 1 or world_size % ep_size:
        raise ValueError(f"expert-parallel size {ep_size} must divide the world size {world_size}")
    if ep_size > 1 and args.moe_num_experts <= 1:
        raise ValueError(f"expert-parallel size {ep_size} needs an MoE model (moe_num_experts > 1)")
    if ep_size > max(args.moe_num_experts, 1):
        raise ValueError(f"expert-parallel size {ep_size} > moe_num_experts {args.moe_num_experts}: "
                         "every EP rank must hold at least one expert")


def estimate_memory(args, world_size: int, ep_size: int, zero_stage: int) -> MemoryEstimate:
    """Bytes on the most loaded rank for `args`'s model at this layout (args' own zero_stage and
    moe_expert_parallel_size are ignored; its precision, micro-batch and checkpointing are used)."""
    check_layout(args, world_size, ep_size, zero_stage)
    num_experts, local_experts = _experts_on_rank0(args, ep_size)
    sharded = world_size > 1 and zero_stage > 0
    edp = world_size // ep_size
    gathered_dtype = 2 if args.precision == "bfloat16" else FP32

    resident = 0  # elements this rank stores
    unsharded: dict[int | None, int] = {}  # elements all-gathered per FSDP group (block index, None: root)
    params = model_parameters(args)
    for p, shape in zip(params, _local_shapes(params, num_experts, local_experts)):
        numel = math.prod(shape)
        if not sharded:
            resident += numel
            continue
        shards = edp if p.expert else world_size
        dim = expert_shard_dim(shape, shards) if p.expert else 0  # as ParallelModel shards them
        rows = -(-shape[dim] // shards)
        resident += rows * (numel // shape[dim])
        unsharded[p.block] = unsharded.get(p.block, 0) + rows * shards * (numel // shape[dim])

    if not sharded:
        gathered = 0
    elif zero_stage in (1, 2):
        gathered = sum(unsharded.values())
    else:
        blocks = [unsharded.get(i, 0) for i in range(args.num_layers)]
        pairs = [a + b for a, b in zip(blocks, blocks[1:])] or blocks
        gathered = unsharded.get(None, 0) + max(pairs, default=0)
    return MemoryEstimate(
        params_bytes=FP32 * resident,
        grads_bytes=FP32 * resident,
        optimizer_bytes=2 * FP32 * resident + STEP_COUNTER_BYTES * len(params),
        gathered_params_bytes=gathered_dtype * gathered,
        activations_bytes=activation_bytes(args),
    )


def _experts_on_rank0(args, ep_size: int) -> tuple[int, int]:
    """(E, experts held by EP rank 0, the most loaded: ceil(E/EP))."""
    num_experts = args.moe_num_experts
    return num_experts, experts_per_rank(num_experts, ep_size)[0] if num_experts > 1 else 1


def _local_shapes(params: tuple[ParamShape, ...], num_experts: int, local_experts: int) -> list[list[int]]:
    """Each tensor's shape on EP rank 0 before any FSDP2 sharding: expert tensors keep their experts' rows."""
    shapes = []
    for p in params:
        shape = list(p.shape)
        if p.expert:
            shape[0] = shape[0] // num_experts * local_experts
        shapes.append(shape)
    return shapes


def ddp_overhead_bytes(args, world_size: int, ep_size: int, zero_stage: int) -> int:
    """What DDP (stage 0, or one rank) holds beyond `MemoryEstimate`, which leaves it out by design.

    - Gradient buckets (W > 1): DistributedDataParallel (gradient_as_bucket_view=False) keeps flat
      buckets as large as the gradients it reduces, for the whole run: every local parameter with
      EP = 1; the non-expert ones with EP > 1 (expert gradients are reduced by ParallelModel itself).
    - Autocast weight copies (bfloat16/fp16): autocast caches a 16-bit copy of every weight a matmul
      uses until the forward ends, 2 bytes per element of each >= 2-D local parameter (the input
      embedding's rows are looked up, not multiplied, unless the head shares them).
    0 for FSDP2 stages on several ranks: the gathered bf16 copies are the weights autocast uses.
    """
    check_layout(args, world_size, ep_size, zero_stage)
    if world_size > 1 and zero_stage > 0:
        return 0
    params = model_parameters(args)
    shapes = _local_shapes(params, *_experts_on_rank0(args, ep_size))
    buckets = 0
    if world_size > 1:
        buckets = FP32 * sum(math.prod(s) for p, s in zip(params, shapes) if ep_size == 1 or not p.expert)
    copies = 0
    if args.precision in ("bfloat16", "fp16"):
        looked_up = {"pos_embed.weight"} | ({"embed.weight"} if args.no_weight_tying else set())
        copies = 2 * sum(math.prod(s) for p, s in zip(params, shapes) if len(s) >= 2 and p.name not in looked_up)
    return buckets + copies


def activation_bytes(args) -> int:
    """A rough estimate of the activation memory of one micro-batch at the start of backward.

    Counted, in bytes per token (T = micro-batch x seq_length tokens), with a = 2 under bf16/fp16
    autocast and 4 in fp32; the residual stream (embedding output + block outputs) stays fp32:
    - attention: the first norm's input (4D), the qkv input (aD) and output (3aD, v is a view of it),
      the rotated q and k (2aD, with rotary), the attention output and its reshaped copy (2aD);
    - dense MLP: the second norm's input (4D), the up input (aD), the up output and the activation's (2aF);
    - MoE layer: the second norm's input (4D), the router input (aD) and its fp32 logits and probabilities
      (8E); per routed row (K per token, balanced routing assumed): the dispatched row (4D, gathered from
      the fp32 norm output), the expert's up output and activation (2aF), its output (aD); with LoREs the
      rows regrouped by LoRE (aD, top-l = 1; l*aD for l > 1), x A and its pi-weighted copy (2*l*aR), the
      LoRE router's fp32 logits and probabilities (8M);
    - dropout masks (1 byte each, 2D per layer) when hidden_dropout > 0;
    - head: the final norm's input (4D), the head input (aD), and 12 bytes per logit (T x V): the loss's
      fp32 log-softmax output, its gradient and the logits' gradient at the start of backward (the bf16
      logits and their fp32 copy, alive in forward, are about as large).
    With checkpoint_activations each block keeps only its fp32 input (4D) and one block at a time is
    recomputed whole: L*4D + the largest block + the head. Without: every block + the head.
    Not counted: attention scores (flash/memory-efficient SDPA keeps only a logsumexp per head), the
    expert-parallel exchange buffers, routing imbalance, backward's transient gradient buffers.
    """
    tokens = args.train_micro_batch_size_per_gpu * args.seq_length
    d, ffn = args.hidden_size, args.intermediate_size or 4 * args.hidden_size
    a = 2 if args.precision in ("bfloat16", "fp16") else FP32
    rotary = args.pos_emb == "rotary" and args.rotary_pct > 0
    attention = FP32 * d + a * (d + 3 * d + (2 * d if rotary else 0) + 2 * d)
    masks = 2 * d if args.hidden_dropout > 0 else 0
    moe = moe_settings_from_args(args)
    per_layer = []
    for layer in range(args.num_layers):
        if moe is None or not moe.is_moe_layer(layer):
            mlp = FP32 * d + a * (d + 2 * ffn)
        else:
            row = FP32 * d + 2 * a * (moe.ffn_hidden_size or ffn) + a * d
            lore = moe.lore
            if lore is not None:
                routed = lore.mode != "router_free"
                rank = lore.rank if routed else lore.num_lores * lore.rank
                top_l = lore.top_l if routed else 1
                row += (a * d * top_l if routed else 0) + 2 * top_l * a * rank + (8 * lore.num_lores if routed else 0)
            mlp = FP32 * d + a * d + 8 * moe.num_experts + moe.top_k * row
        per_layer.append(tokens * (attention + mlp + masks))
    head = tokens * (FP32 * d + a * d + 12 * vocab_size_of(args))
    if args.checkpoint_activations:
        return args.num_layers * tokens * FP32 * d + max(per_layer) + head
    return sum(per_layer) + head
