"""Closed-form parameter counts of a config, total and active per token, without building the model.

What a token is counted as using ("active"): every parameter but the routed experts (and LoREs) it was not
sent to, the input embedding table included (the convention GPT-NeoX's and Megatron's logs use). Published
"activated" figures leave out the input embedding, a lookup of one row (DeepSeek-V3's 37B, gpt-oss's 5.1B):
`active_without_input_embeddings` is that figure. Multi-token prediction modules (DeepSeek-V3) are training-only
and counted apart (`mtp`, `active_mtp`): `total` is the model that generates, as published totals count it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from megatron.data.tokenizer import vocab_size_of
from megatron.model.activations import is_gated, up_width
from megatron.model.attention import head_width
from megatron.model.build import moe_architecture_from_args
from megatron.model.gpt import mlp_width
from megatron.model.moe import MoEArchitecture, moe_param_counts


@dataclass
class ParamCounts:
    embeddings: int = 0
    attention: int = 0
    norms: int = 0
    dense_mlp: int = 0
    experts: int = 0
    lores: int = 0
    routers: int = 0
    shared_experts: int = 0  # always on: every token uses all of them
    active_experts: int = 0
    active_lores: int = 0
    lookups: int = 0  # of `embeddings`, the tables a token looks one row up in: untied input embedding, positions
    mtp: int = 0  # multi-token prediction modules (training only), beside `total`
    active_mtp: int = 0

    @property
    def total(self) -> int:
        return (self.embeddings + self.attention + self.norms + self.dense_mlp + self.experts + self.lores
                + self.routers + self.shared_experts)

    @property
    def active(self) -> int:
        """What one token computes with: everything but the experts and LoREs it was not routed to."""
        return self.total - self.experts - self.lores + self.active_experts + self.active_lores

    @property
    def active_without_input_embeddings(self) -> int:
        """`active` less the tables looked up rather than multiplied: how published "activated" counts go."""
        return self.active - self.lookups

    @property
    def total_with_mtp(self) -> int:
        return self.total + self.mtp

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total, "active": self.active,
                "active_without_input_embeddings": self.active_without_input_embeddings,
                "total_with_mtp": self.total_with_mtp}


def attention_parameters(args) -> tuple[int, int]:
    """(projections, sinks and biases; norm weights) of one layer's attention.

    Multi-head latent attention (kv_lora_rank set, megatron/model/mla.py): the query from the hidden state
    (D x H(N+R)) or through its latent (D x Q, RMSNorm Q, Q x H(N+R)), the key/value latent and shared rope key
    (D x (C+R), RMSNorm C), the heads' keys and values from the latent (C x H(N+V)), the output (HV x D); with
    use_bias_in_attn_linear the query latent, the key/value latent and the output have biases (as transformers'
    attention_bias). Otherwise: the query (D x H Dh), keys and values (D x K Dh each), the output (H Dh x D),
    biases on all four with use_bias_in_attn_linear, a sink logit per query head, qk_norm's two Dh weights."""
    d, heads, bias = args.hidden_size, args.num_attention_heads, args.use_bias_in_attn_linear
    if args.kv_lora_rank is not None:
        c, q_rank = args.kv_lora_rank, args.q_lora_rank
        n, r, v = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        query = d * heads * (n + r)
        if q_rank is not None:  # through the query latent
            query = d * q_rank + q_rank * heads * (n + r) + (q_rank if bias else 0)
        keys_values = d * (c + r) + c * heads * (n + v) + (c + r if bias else 0)
        out = heads * v * d + (d if bias else 0)
        return query + keys_values + out, c + (q_rank or 0)
    head_dim = head_width(args)
    qkv = (heads + 2 * (args.num_kv_heads or heads)) * head_dim  # grouped-query attention: fewer K/V heads
    projections = d * qkv + heads * head_dim * d + (qkv + d if bias else 0)
    sinks = heads if args.attention_sinks else 0
    return projections + sinks, 2 * head_dim if args.qk_norm else 0


def count_parameters(args) -> ParamCounts:
    if getattr(args, "model_type", "gpt") != "gpt":
        raise ValueError(f"model_type {args.model_type}: closed-form counts are for GPT models (train.py logs "
                         "a DiT's parameter count at start)")
    d, layers = args.hidden_size, args.num_layers
    vocab = vocab_size_of(args)
    counts = ParamCounts()
    counts.embeddings = vocab * d * (1 if not args.no_weight_tying else 2)
    counts.lookups = vocab * d if args.no_weight_tying else 0  # tied: the head multiplies by the same table
    if args.pos_emb == "learned":
        counts.embeddings += args.max_position_embeddings * d
        counts.lookups += args.max_position_embeddings * d
    norm = norm_size(args)
    moe = moe_architecture_from_args(args)
    for layer in range(layers):
        add_block(counts, args, moe, layer)
    counts.norms += norm  # the final norm
    for module in range(args.mtp_num_modules):
        # DeepSeek-V3's module: RMSNorms of the hidden state and of the next token's embedding, a (2D -> D)
        # projection of the two, one more block (its feed-forward as the layer after the last one would be), and
        # a final norm; the embedding and the head are the model's own
        block = ParamCounts()
        add_block(block, args, moe, layers + module)
        own = 2 * norm + 2 * d * d + norm
        counts.mtp += block.total + own
        counts.active_mtp += block.active + own
    return counts


def norm_size(args) -> int:
    return args.hidden_size * (2 if args.norm == "layernorm" and args.use_bias_in_norms else 1)


def add_block(counts: ParamCounts, args, moe: MoEArchitecture | None, layer: int) -> None:
    """Adds one transformer block (its two norms, attention and feed-forward) to `counts`."""
    d = args.hidden_size
    attention, attention_norms = attention_parameters(args)
    counts.attention += attention
    counts.norms += 2 * norm_size(args) + attention_norms
    if moe is None or not moe.is_moe_layer(layer):
        width = mlp_width(args.activation, args.intermediate_size, d, args.mlp_multiple_of)
        up = up_width(args.activation, width)  # 2 F for a gated MLP: value and gate
        counts.dense_mlp += d * up + width * d + (up + d if args.use_bias_in_mlp else 0)
        return
    expert_ffn = moe.ffn_hidden_size or args.intermediate_size or 4 * d
    per_layer = moe_param_counts(d, expert_ffn, moe.num_experts, moe.lore, is_gated(args.activation),
                                 moe.num_shared_experts, moe.expert_biases, moe.router_bias)
    counts.experts += per_layer["experts"]
    counts.lores += per_layer["lores"]
    counts.routers += per_layer["routers"]
    counts.shared_experts += per_layer["shared"]
    counts.active_experts += moe.top_k * per_layer["experts"] // moe.num_experts
    if moe.lore is not None:
        share = 1.0 if moe.lore.mode == "router_free" else moe.lore.top_l / moe.lore.num_lores
        counts.active_lores += round(moe.top_k * share * per_layer["lores"] / moe.num_experts)
