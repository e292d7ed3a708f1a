"""Closed-form parameter counts of a config, total and active per token, without building the model."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from megatron.data.tokenizer import vocab_size_of
from megatron.model.activations import is_gated, up_width
from megatron.model.build import moe_architecture_from_args
from megatron.model.gpt import mlp_width
from megatron.model.moe import moe_param_counts


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

    @property
    def total(self) -> int:
        return (self.embeddings + self.attention + self.norms + self.dense_mlp + self.experts + self.lores
                + self.routers + self.shared_experts)

    @property
    def active(self) -> int:
        """What one token computes with: everything but the experts and LoREs it was not routed to."""
        return self.total - self.experts - self.lores + self.active_experts + self.active_lores

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total, "active": self.active}



def count_parameters(args) -> ParamCounts:
    if getattr(args, "model_type", "gpt") != "gpt":
        raise ValueError(f"model_type {args.model_type}: closed-form counts are for GPT models (train.py logs "
                         "a DiT's parameter count at start)")
    d, layers = args.hidden_size, args.num_layers
    vocab = vocab_size_of(args)
    counts = ParamCounts()
    counts.embeddings = vocab * d * (1 if not args.no_weight_tying else 2)
    if args.pos_emb == "learned":
        counts.embeddings += args.max_position_embeddings * d
    kv_width = (args.num_kv_heads or args.num_attention_heads) * (d // args.num_attention_heads)
    qkv = d + 2 * kv_width  # grouped-query attention: K and V have fewer heads than Q
    attention = d * qkv + d * d + (qkv + d if args.use_bias_in_attn_linear else 0)
    width = mlp_width(args.activation, args.intermediate_size, d, args.mlp_multiple_of)
    up = up_width(args.activation, width)  # 2 F for a gated MLP: value and gate
    dense_mlp = d * up + width * d + (up + d if args.use_bias_in_mlp else 0)
    norm_size = d if args.norm == "rmsnorm" else (2 * d if args.use_bias_in_norms else d)
    head_dim = d // args.num_attention_heads
    counts.norms = (2 * layers + 1) * norm_size + (2 * head_dim * layers if args.qk_norm else 0)
    moe = moe_architecture_from_args(args)
    ffn = args.intermediate_size or 4 * d
    for layer in range(layers):
        counts.attention += attention
        if moe is None or not moe.is_moe_layer(layer):
            counts.dense_mlp += dense_mlp
            continue
        expert_ffn = moe.ffn_hidden_size or ffn
        per_layer = moe_param_counts(d, expert_ffn, moe.num_experts, moe.lore, is_gated(args.activation),
                                     moe.num_shared_experts)
        counts.experts += per_layer["experts"]
        counts.lores += per_layer["lores"]
        counts.routers += per_layer["routers"]
        counts.shared_experts += per_layer["shared"]
        counts.active_experts += moe.top_k * per_layer["experts"] // moe.num_experts
        if moe.lore is not None:
            share = 1.0 if moe.lore.mode == "router_free" else moe.lore.top_l / moe.lore.num_lores
            counts.active_lores += round(moe.top_k * share * per_layer["lores"] / moe.num_experts)
    return counts
