"""Memory per rank of a config at a layout (world size W, expert-parallel size EP, ZeRO stage), on paper.

Shape legend: T tokens per micro-batch (micro-batch x seq_length), D hidden, F MLP width, E experts,
K experts per token, M LoREs per expert, R LoRE rank, V padded vocabulary, L layers.

The layout follows `ParallelModel` (megatron/parallel/data_parallel.py) tensor by tensor. The
parameter shapes come from the model itself, built on the meta device (no memory), and are checked
against the closed-form count of `megatron.sizing.params`; which tensors belong to experts is
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

import math
from dataclasses import dataclass

import torch

from megatron.data.tokenizer import vocab_size_of
from megatron.model.activations import is_gated, up_width
from megatron.model.attention import head_width
from megatron.model.build import gpt_config_from_args, moe_architecture_from_args
from megatron.model.gpt import GPT, mlp_width
from megatron.model.moe import MoERuntime
from megatron.parallel.data_parallel import expert_parameter_names, expert_shard_dim
from megatron.parallel.expert_parallel import check_ep_layout, experts_per_rank
from megatron.sizing.params import count_parameters

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
    key = repr(cfg)
    if key not in _SHAPES:
        with torch.device("meta"):
            model = GPT(cfg, MoERuntime(impl="native"))
        experts = expert_parameter_names(model)
        shapes = []
        for name, param in model.named_parameters():
            block = fsdp_unit(name, args.num_layers)
            shapes.append(ParamShape(name, tuple(param.shape), name in experts, block))
        total, expected = sum(math.prod(p.shape) for p in shapes), count_parameters(args).total_with_mtp
        if total != expected:
            raise RuntimeError(f"the model has {total} parameters but sizing.params says {expected}")
        _SHAPES[key] = tuple(shapes)
    return _SHAPES[key]


def fsdp_unit(name: str, num_layers: int) -> int | None:
    """The FSDP2 unit a parameter is gathered with: block i (blocks.i.*), MTP module k as unit num_layers + k
    (mtp.k.*, each module one unit, after the blocks), None for the root."""
    if name.startswith("blocks."):
        return int(name.split(".")[1])
    if name.startswith("mtp."):
        return num_layers + int(name.split(".")[1])
    return None


def check_layout(args, world_size: int, ep_size: int, zero_stage: int) -> None:
    """One-line ValueErrors for layouts ParallelModel cannot run (FSDP2's own limit is checked later)."""
    if world_size < 1:
        raise ValueError(f"world size {world_size} must be >= 1")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero stage {zero_stage} must be 0, 1, 2 or 3")
    check_ep_layout(ep_size, args.moe_num_experts, world_size, "expert-parallel size", "the world size")


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
        blocks = [unsharded.get(i, 0) for i in range(args.num_layers + args.mtp_num_modules)]
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


def activation_element_bytes(args) -> int:
    """Bytes of an activation element autocast produces: 2 under bf16/fp16, 4 in fp32."""
    return 2 if args.precision in ("bfloat16", "fp16") else FP32


def block_activation_bytes(args, layers: range | None = None) -> list[int]:
    """What each transformer block's forward keeps for backward, one micro-batch (T = micro-batch x seq_length
    tokens), in bytes, from the shapes alone; `layers`: the layer indices (default: the model's; MTP modules' blocks
    are layers num_layers + k). `a` = 2 bytes under bf16/fp16 autocast and 4 in fp32; the residual
    stream and the norms' inputs stay fp32. Per token, with Q = H Dh query and K Dh key/value widths (K the K/V
    heads, Dh the head dim: head_dim, or D / H):

    - attention: the first norm's input (4D) and what the norm keeps besides (8 for LayerNorm's mean and
      1/std; 4D + 4 for RMSNorm's normalised input and 1/rms, as torch's composite RMSNorm keeps them, an
      upper bound where a fused kernel keeps only 1/rms; the same for every norm below), the qkv input (aD)
      and output (a(Q + 2 K Dh), v is a view of it), the rotated q and k (a(Q + K Dh), with rotary), the attention
      output and its reshaped copy (2aQ), and the fp32 logsumexp per head (4H);
    - with attention_sinks (attention.py's explicit softmax, rotary assumed): the first norm's, the qkv input, the
      rotated q (aQ), keys and values copied to all H heads by the batched matmuls (2aQ), the fp32 softmax over
      the T keys and the sink (4H(T + 1), T = seq_length), under autocast its half-precision copy (aHT), and the
      reshaped output (aQ);
    - multi-head latent attention (kv_lora_rank C, q_lora_rank Q', head dims N, R, V; mla.py): the first norm's, the
      projections' input (aD; under autocast each of the two projections casts its own: 2aD), the latents' RMSNorms
      (each: its fp32 input, 4 for 1/rms, the normalised fp32 latent and the output the up-projection reads, a per
      latent dim; the key/value latent's fp32 input is the down-projection's whole C + R output in fp32), the
      query and key with their rope parts (2aH(N + R)), the key/value up-projection's output that the values view
      (aH(N + V)), the attention output and its reshaped copy (2aHV) and the logsumexp (4H): what the fused
      (memory-efficient) kernel keeps; without one, torch's math path keeps the probabilities instead (4HT);
    - dense MLP: the second norm's input (4D), the up input (aD) and the activation's tensors: the up output
      and act output (2aF), or, gated, the 2F-wide up output, act(gate) and the product (4aF), or for
      clamped_swiglu the 2F-wide up output, the clamped gate, its sigmoid, their product, value + 1 and the
      output (7aF);
    - MoE layer: the second norm's input (4D), the router input (aD) and its fp32 logits and probabilities
      (8E), the top-k expert ids (8K) and the z-loss's logsumexp (4); per routed row (K per token, balanced
      routing assumed) the dispatched row (aD: the dispatcher casts it to the compute dtype), the expert's activation
      tensors (2aF, 4aF or 7aF as above), its output (aD) and its gate-weighted fp32 copy (4D, which the combine's
      index_add keeps), the gate (4) and two int64 row indices (16), with the experts' biases (moe_use_bias_in_experts)
      each row's expert (8) that adds them; with
      routed LoREs the LoRE router's fp32 probabilities (4M) and per chosen LoRE (l per row) x A and its
      pi-weighted copy (2aR) and pi (4); for l = 1 the rows regrouped by LoRE (aD), the output put back in
      expert order (aD) and int64 ids and orders (24); for l > 1 per slot the row's copy (aD), the LoRE term
      that index_add keeps (aU, U the up-projection's width, or D standalone) and int64 ids and orders (24),
      plus 8; router-free: x A of the one rank-M r LoRE (aMr); shared experts, one MLP S x F wide on every
      token (2aSF, 4aSF or 7aSF), and under autocast their own half-precision copy of the input (aD);
    - dropout masks (1 byte each, 2D per layer) when hidden_dropout > 0.
    Not counted: the expert-parallel exchange buffers, routing imbalance, autocast's half-precision copies
    of rows gathered in fp32, the few router tensors of sigmoid scores and group-limited routing beyond the softmax
    router's (tens of bytes per token, a row's expert activations are thousands).
    tests/integration/test_memory.py checks these sums against the tensors autograd saves.
    """
    tokens = args.train_micro_batch_size_per_gpu * args.seq_length
    d = args.hidden_size
    a = activation_element_bytes(args)
    saved_per_width = 7 if args.activation == "clamped_swiglu" else 4 if is_gated(args.activation) else 2
    act = lambda width: a * saved_per_width * width  # noqa: E731  (the activation's saved tensors)
    stats = 2 * FP32 if args.norm == "layernorm" else FP32 * d + FP32
    attention = attention_activation_bytes(args)
    masks = 2 * d if args.hidden_dropout > 0 else 0
    dense_width = mlp_width(args.activation, args.intermediate_size, d, args.mlp_multiple_of)
    moe = moe_architecture_from_args(args)
    per_layer = []
    for layer in range(args.num_layers) if layers is None else layers:
        if moe is None or not moe.is_moe_layer(layer):
            mlp = FP32 * d + stats + a * d + act(dense_width)
        else:
            expert_width = moe.ffn_hidden_size or dense_width
            row = a * d + act(expert_width) + a * d + FP32 * d + FP32 + 16 + (8 if moe.expert_biases else 0)
            lore = moe.lore
            if lore is not None and lore.mode == "router_free":
                row += a * lore.num_lores * lore.rank  # x A of the one always-on LoRE
            elif lore is not None:
                top_l = lore.top_l
                row += FP32 * lore.num_lores + top_l * (2 * a * lore.rank + FP32)  # probs; x A, pi x A, pi
                if top_l == 1:  # rows regrouped by LoRE, output put back in expert order, int64 ids and orders
                    row += a * d + a * d + 24
                else:  # per slot: the row's copy and the LoRE term index_add keeps; int64 ids and slot orders
                    term = up_width(args.activation, expert_width) if lore.mode == "entangled" else d
                    row += top_l * (a * d + a * term + 24) + 8
            shared = 0
            if moe.num_shared_experts:  # under autocast their input is cast (and kept) once more, beside the router's
                shared = act(moe.num_shared_experts * expert_width) + (a * d if a < FP32 else 0)
            router = 8 * moe.num_experts + 8 * moe.top_k + FP32
            mlp = FP32 * d + stats + a * d + router + moe.top_k * row + shared
        per_layer.append(tokens * (attention + mlp + masks))
    return per_layer


def attention_activation_bytes(args) -> int:
    """The attention's share of block_activation_bytes, per token (see there)."""
    d, heads = args.hidden_size, args.num_attention_heads
    a = activation_element_bytes(args)
    norm = FP32 * d + (2 * FP32 if args.norm == "layernorm" else FP32 * d + FP32)
    if args.kv_lora_rank is not None:
        c, q_rank = args.kv_lora_rank, args.q_lora_rank
        n, r, v = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        inputs = a * d * (2 if a < FP32 else 1)  # autocast casts the input once per projection
        latent = lambda width, fp32_input: FP32 * fp32_input + FP32 + FP32 * width + a * width  # noqa: E731
        query_latent = 0 if q_rank is None else latent(q_rank, q_rank)
        kv_latent = latent(c, c if a < FP32 else c + r)  # in fp32 the norm reads a view of kv_down's whole output
        return (norm + inputs + query_latent + kv_latent + 2 * a * heads * (n + r) + a * heads * (n + v)
                + 2 * a * heads * v + FP32 * heads)
    head_dim = head_width(args)
    q, kv = heads * head_dim, (args.num_kv_heads or heads) * head_dim
    if args.attention_sinks:
        keys = args.seq_length
        return (norm + a * d + a * q + 2 * a * q + FP32 * heads * (keys + 1) + (a * heads * keys if a < FP32 else 0)
                + a * q)
    rotary = args.pos_emb == "rotary" and args.rotary_pct > 0
    return norm + a * (d + (q + 2 * kv) + (q + kv if rotary else 0) + 2 * q) + FP32 * heads


def kv_cache_bytes_per_token(args, element_bytes: int = 2) -> int:
    """Bytes one token adds to a generation cache over all layers (KVCache, attention.py, which keeps every token
    on every layer: a sliding window masks, it does not trim): 2 K Dh numbers per layer (its keys and values),
    or with multi-head latent attention kv_lora_rank + qk_rope_head_dim (its latent and shared rope key, mla.py)."""
    if args.kv_lora_rank is not None:
        per_layer = args.kv_lora_rank + args.qk_rope_head_dim
    else:
        per_layer = 2 * (args.num_kv_heads or args.num_attention_heads) * head_width(args)
    return per_layer * args.num_layers * element_bytes


def mtp_activation_bytes(args) -> int:
    """What the multi-token prediction modules (mtp.py) keep for backward, one micro-batch: module d runs on
    B (S - d) tokens and keeps per token its embedding's fp32 copy (4D) and the two input norms' own tensors, the
    concatenation the projection reads (2aD), its block (block_activation_bytes at layer num_layers + d - 1), its
    final norm's input and own tensors, the head's share (head_token_bytes) and, without loss_chunk_tokens, a copy
    of its targets (8: a slice of the batch's, copied when flattened); the fp32 hidden state each module reads (the
    model's final-normed output, or the previous module's output, on B (S - d + 1) tokens) only under autocast,
    where the heads keep half-precision copies (in fp32 the head's input is that state). With checkpoint_activations
    each module
    keeps its inputs, the embedding and (d > 1) the previous module's output on B (S - d + 1) tokens, and what the
    head keeps (the module's block is recomputed, counted with the largest block)."""
    d, layers = args.hidden_size, args.num_layers
    a = activation_element_bytes(args)
    stats = 2 * FP32 if args.norm == "layernorm" else FP32 * d + FP32
    total = 0
    for depth in range(1, args.mtp_num_modules + 1):
        tokens = args.train_micro_batch_size_per_gpu * (args.seq_length - depth)
        head = head_token_bytes(args, tokens) + (0 if args.loss_chunk_tokens else 8 * tokens)
        if args.checkpoint_activations:
            previous = args.train_micro_batch_size_per_gpu * (args.seq_length - depth + 1) if depth > 1 else 0
            total += tokens * FP32 * d + previous * FP32 * d + head
            continue
        block = block_activation_bytes(args, range(layers + depth - 1, layers + depth))[0]
        block = block * tokens // (args.train_micro_batch_size_per_gpu * args.seq_length)
        # under autocast the heads read half-precision copies, so the fp32 state a module reads (the main model's
        # final-normed output, or the previous module's output) is kept by its hnorm alone
        read = args.train_micro_batch_size_per_gpu * (args.seq_length - depth + 1) * FP32 * d if a < FP32 else 0
        total += tokens * (FP32 * d + 2 * stats + 2 * a * d + FP32 * d + stats) + block + head + read
    return total


def head_token_bytes(args, tokens: int) -> int:
    """The head's share for `tokens` tokens (after the final norm's input and stats): the head input (aD) and 12
    bytes per logit (T x V), or with loss_chunk_tokens C the per-token log-sum-exp and target (12) and one chunk's
    fp32 logits (4 C V)."""
    a, d, vocab = activation_element_bytes(args), args.hidden_size, vocab_size_of(args)
    if args.loss_chunk_tokens:  # only one chunk's fp32 logits exist at a time (model/loss.py)
        return tokens * (a * d + 12) + FP32 * min(args.loss_chunk_tokens, tokens) * vocab
    return tokens * (a * d + 12 * vocab)


def activation_bytes(args) -> int:
    """A rough estimate of the activation memory of one micro-batch at the start of backward: the blocks'
    saved tensors (`block_activation_bytes`), the head's: the final norm's input (4D), the head input (aD)
    and 12 bytes per logit (T x V): the loss's fp32 log-softmax output, its gradient and the logits' gradient
    (the bf16 logits and their fp32 copy, alive in forward, are about as large); with loss_chunk_tokens C, the
    per-token log-sum-exp and target (12) and one chunk's fp32 logits (4 C V); and the multi-token prediction
    modules' (`mtp_activation_bytes`: their blocks and their passes through the head).
    With checkpoint_activations each block keeps only its fp32 input (4D) and one block at a time is
    recomputed whole: L*4D + the largest block + the head. Without: every block + the head.
    Not counted: attention scores (flash/memory-efficient SDPA keeps only a logsumexp per head; attention sinks'
    explicit softmax is counted in the blocks), backward's transient gradient buffers.
    """
    tokens = args.train_micro_batch_size_per_gpu * args.seq_length
    per_layer = block_activation_bytes(args)
    head = tokens * FP32 * args.hidden_size + head_token_bytes(args, tokens)
    mtp = mtp_activation_bytes(args)
    if args.checkpoint_activations:
        return args.num_layers * tokens * FP32 * args.hidden_size + max(per_layer) + head + mtp
    return sum(per_layer) + head + mtp
