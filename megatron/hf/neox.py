"""Our dense GPT <-> Hugging Face GPTNeoXForCausalLM (transformers 5.x names): config and weights.

Shape legend: D hidden, H heads, Dh head dim, J the three of q/k/v.

The fused qkv differs only in row order: ours splits its 3D output rows as [J, H, Dh] (q of every head,
then k, then v), GPT-NeoX's as [H, J, Dh] (each head's q, k, v together). GPT-NeoX always has norm,
attention and MLP biases: ours that are absent are written as zeros, which computes the same function.
Anything else GPT-NeoX cannot express (MoE, RMSNorm, gated MLPs, learned positions, any config field
NEOX_FIELDS does not declare, by the rule of fields.py) makes `neox_blockers` non-empty, and the caller ships
our own code instead (remote.py).
"""

from __future__ import annotations

from typing import Any

import torch

from megatron.hf.fields import ANY, unrepresented

ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "silu": "silu"}  # ours -> transformers' ACT2FN (exact forms)
# The GPTConfig fields GPT-NeoX holds and their values (ANY: every value); every other field must be off
# (fields.py). Absent biases are written as zeros, so the bias switches are free.
NEOX_FIELDS = {
    "vocab_size": ANY, "num_layers": ANY, "hidden_size": ANY, "num_attention_heads": ANY, "intermediate_size": ANY,
    "max_position_embeddings": ANY, "pos_emb": ("rotary",), "rotary_pct": ANY, "rotary_emb_base": ANY,
    "norm": ("layernorm",), "norm_eps": ANY, "use_bias_in_norms": ANY, "use_bias_in_attn_linear": ANY,
    "use_bias_in_mlp": ANY, "activation": tuple(ACTIVATIONS), "gpt_j_residual": ANY, "tie_embeddings": ANY,
}


def rotary_dims(head_dim: int, rotary_pct: float) -> int:
    """Our Rotary's width: the first rotary_pct of the head, rounded down to even."""
    return int(head_dim * rotary_pct) // 2 * 2


def partial_rotary_factor(head_dim: int, dims: int) -> float:
    """A factor GPT-NeoX turns back into exactly `dims` (`int(head_dim * factor)`), safe from rounding."""
    factor = dims / head_dim
    return factor if int(head_dim * factor) == dims else (dims + 0.5) / head_dim


def neox_blockers(cfg: Any) -> list[str]:
    """Why this GPTConfig is not a GPTNeoXForCausalLM, or [] when it is exactly one."""
    reasons = unrepresented(cfg, NEOX_FIELDS)
    if cfg.hidden_size % cfg.num_attention_heads:
        reasons.append("hidden_size not a multiple of num_attention_heads")
    return reasons


def qkv_ours_to_neox(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows [J, H, Dh] -> [H, J, Dh] of a qkv weight [3D, D] or bias [3D]."""
    return t.reshape(3, heads, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def qkv_neox_to_ours(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.reshape(heads, 3, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def _pairs(num_layers: int, tied: bool) -> list[tuple[str, str]]:
    """(our name, GPT-NeoX name) of every tensor."""
    pairs = [("embed.weight", "gpt_neox.embed_in.weight")]
    parts = [("input_norm", "input_layernorm"), ("post_attention_norm", "post_attention_layernorm"),
             ("attention.qkv", "attention.query_key_value"), ("attention.dense", "attention.dense"),
             ("mlp.up", "mlp.dense_h_to_4h"), ("mlp.down", "mlp.dense_4h_to_h")]
    for i in range(num_layers):
        for ours, neox in parts:
            for kind in ("weight", "bias"):
                pairs.append((f"blocks.{i}.{ours}.{kind}", f"gpt_neox.layers.{i}.{neox}.{kind}"))
    pairs += [("final_norm.weight", "gpt_neox.final_layer_norm.weight"),
              ("final_norm.bias", "gpt_neox.final_layer_norm.bias")]
    if not tied:
        pairs.append(("lm_head.weight", "lm_head.weight"))
    return pairs


def neox_config(cfg: Any) -> dict[str, Any]:
    """config.json of the GPTNeoXForCausalLM computing what `cfg` computes."""
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    factor = partial_rotary_factor(head_dim, rotary_dims(head_dim, cfg.rotary_pct))
    return {
        "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads, "intermediate_size": cfg.ffn_size,
        "hidden_act": ACTIVATIONS[cfg.activation], "max_position_embeddings": cfg.max_position_embeddings,
        "layer_norm_eps": cfg.norm_eps, "use_parallel_residual": cfg.gpt_j_residual,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": True,
        "hidden_dropout": cfg.hidden_dropout, "attention_dropout": cfg.attention_dropout,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rotary_emb_base),
                            "partial_rotary_factor": factor},
        "initializer_range": cfg.init_method_std, "use_cache": True, "dtype": "float32",
    }


def ours_to_neox(state: dict[str, torch.Tensor], cfg: Any) -> dict[str, torch.Tensor]:
    """Our state dict -> GPT-NeoX's; every tensor of ours is used, absent biases become zeros."""
    out, used = {}, set()
    for ours, neox in _pairs(cfg.num_layers, cfg.tie_embeddings):
        if ours in state:
            t = state[ours]
            used.add(ours)
        elif ours.endswith(".bias"):
            weight = state[ours.removesuffix("bias") + "weight"]
            t = torch.zeros(weight.shape[0], dtype=weight.dtype)
        else:
            raise ValueError(f"{ours}: missing from the model (expected a dense GPT-NeoX-shaped model)")
        if ".attention.qkv." in ours:
            t = qkv_ours_to_neox(t, cfg.num_attention_heads)
        out[neox] = t.detach().to(torch.float32).contiguous()
    unused = sorted(set(state) - used)
    if unused:
        raise ValueError(f"{unused[0]}: a tensor GPT-NeoX has no place for ({len(unused)} such tensors)")
    return out


def neox_to_ours(state: dict[str, torch.Tensor], cfg: Any) -> dict[str, torch.Tensor]:
    """GPT-NeoX's state dict (transformers 4 or 5 names) -> ours; buffers GPT-NeoX used to save are skipped."""
    state = {("lm_head." + k.removeprefix("embed_out.") if k.startswith("embed_out.") else k): v
             for k, v in state.items()}
    out, used = {}, set()
    for ours, neox in _pairs(cfg.num_layers, cfg.tie_embeddings):
        if neox not in state:
            if ".attention." in neox and neox.endswith(".bias"):  # attention_bias: false
                continue
            raise ValueError(f"{neox}: missing from the GPT-NeoX weights")
        t = state[neox]
        used.add(neox)
        if ".attention.qkv." in ours:
            t = qkv_neox_to_ours(t, cfg.num_attention_heads)
        out[ours] = t.to(torch.float32).contiguous()
    skipped = {k for k in state if k.endswith(("attention.bias", "attention.masked_bias", "rotary_emb.inv_freq"))}
    if cfg.tie_embeddings:
        skipped.add("lm_head.weight")  # a tied copy, when saved
    unused = sorted(set(state) - used - skipped)
    if unused:
        raise ValueError(f"{unused[0]}: a GPT-NeoX tensor this converter does not map ({len(unused)} such)")
    return out
