"""Hugging Face gpt-oss (`GptOssForCausalLM`, model_type gpt_oss) as our model, and back.

Shape legend: E experts, D hidden, F expert width, H query heads, K key/value heads, Dh head dim, L layers.

gpt-oss is a block our GPT computes once a few pieces are on: RMSNorm before attention and MoE; grouped-query
attention with biases, heads of `head_dim` (64 x 64 = 4096 wide over a 2880 residual stream: our `head_dim`), a
learned sink logit per query head (`attention_sinks`), a sliding window on the layers `layer_types` names
(`sliding_window_width` + `sliding_window_pattern`) and YaRN's scaled RoPE (`rope_scaling: {type: yarn}`); every
layer an MoE whose router is a linear with a bias (`moe_router_bias`), whose gate is a softmax over the top-k
logits (our softmax over all experts, top-k, renormalised: the same numbers), and whose experts have biases
(`moe_use_bias_in_experts`) and apply the clamped SwiGLU (`activation: clamped_swiglu`, swiglu_alpha, swiglu_limit).
What maps where:
- q/k/v_proj (weights and biases) are stacked into our `qkv` ([q | k | v] rows), o_proj is our `dense`, sinks our
  attention's `sinks`;
- the router's weight and bias are our router's gate (a linear D -> E with a bias);
- the experts' gate_up_proj [E, D, 2F] interleaves its columns, gate at even ones and up (the value) at odd ones;
  ours, `w_up_EDF` [E, D, 2F], holds [value | gate] halves: the columns are de-interleaved, and so is
  gate_up_proj_bias [E, 2F]; down_proj [E, F, D] and its bias [E, D] are ours as they are (`w_down_EFD`, `b_down_ED`);
- transformers' sliding_window w counts the query itself; ours (sliding_window_width, GPT-NeoX's) counts the keys
  before it, so ours is w - 1; `layer_types` ("sliding_attention"/"full_attention" per layer) becomes the
  shortest pattern that repeats into it;
- gpt-oss's MLP width F is `intermediate_size` there, our `moe_ffn_hidden_size`.
Published gpt-oss checkpoints hold the experts quantized to MXFP4 (`*_blocks` and `*_scales` tensors, announced by
config.json's quantization_config): refused, naming the field; the dequantized layout (transformers'
`Mxfp4Config(dequantize=True)`, saved again) converts.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron.config import ConfigError
from megatron.hf.fields import ANY, unrepresented
from megatron.hf.llama import rope_parameters, yarn_keys
from megatron.hf.state import Taker
from megatron.model.attention import head_width, layer_window

KINDS = {"sliding_attention": "sliding", "full_attention": "full"}  # transformers' layer_types -> our pattern


def window_from_hf(sliding_window: int) -> int:
    """Our sliding_window_width for transformers' sliding_window w: theirs lets a query see itself and the w - 1
    keys before it (`kv > q - w`), ours itself and the `width` keys before it (`k >= q - width`), so ours is
    w - 1. A window of 1 (each token alone) has no width of ours (ours is at least 1)."""
    if sliding_window < 2:
        raise ValueError(f"sliding_window {sliding_window}: expected 2 or more (it counts the query itself)")
    return sliding_window - 1


def window_to_hf(sliding_window_width: int) -> int:
    """transformers' sliding_window for our sliding_window_width: the inverse of window_from_hf."""
    return sliding_window_width + 1


def shortest_cycle(kinds: list[str]) -> list[str]:
    """The shortest list that, repeated, gives `kinds` (our pattern repeats cyclically over the layers)."""
    return next(kinds[:p] for p in range(1, len(kinds) + 1)
                if all(kinds[i] == kinds[i % p] for i in range(len(kinds))))


def window_keys(where: str, hf: Any) -> dict[str, Any]:
    """sliding_window_width and sliding_window_pattern for transformers' sliding_window and layer_types."""
    types = list(hf.layer_types or [])
    if len(types) != hf.num_hidden_layers or any(kind not in KINDS for kind in types):
        raise ConfigError(f"{where}: layer_types {types}: expected one of {sorted(KINDS)} per layer "
                          f"({hf.num_hidden_layers} layers)")
    kinds = [KINDS[kind] for kind in types]
    if "sliding" not in kinds:  # sliding_window is unused
        return {"sliding_window_width": None, "sliding_window_pattern": None}
    window = hf.sliding_window
    if not isinstance(window, int) or window < 2:
        raise ConfigError(f"{where}: sliding_window {window!r} with sliding_attention layers: expected a window of 2 "
                          "or more tokens (it counts the query itself)")
    pattern = shortest_cycle(kinds)
    return {"sliding_window_width": window_from_hf(window),  # theirs counts the query itself
            "sliding_window_pattern": None if pattern == ["sliding"] else pattern}


def rope_keys(where: str, hf: Any) -> dict[str, Any]:
    """rotary_emb_base and rope_scaling for transformers' rope_parameters (default, yarn or llama3)."""
    rope = dict(hf.rope_parameters or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", "yarn", "llama3"):
        raise ConfigError(f"{where}: rope_parameters.rope_type {rope_type!r}: only gpt-oss's yarn, Llama-3.1's "
                          "llama3 and the default RoPE are computed here")
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConfigError(f"{where}: rope_parameters.partial_rotary_factor {rope['partial_rotary_factor']} "
                          "(gpt-oss rotates the whole head; expected 1.0)")
    theta = rope["rope_theta"]
    if float(theta) != int(theta):
        raise ConfigError(f"{where}: rope_theta {theta} (expected a whole number)")
    scaling = None
    if rope_type == "yarn":
        scaling = yarn_keys(where, rope, hf.max_position_embeddings)
    elif rope_type == "llama3":
        scaling = {"type": "llama3", "original_max_position_embeddings": int(rope["original_max_position_embeddings"])
                   } | {key: float(rope[key]) for key in ("factor", "low_freq_factor", "high_freq_factor")}
    return {"rotary_emb_base": int(theta), "rope_scaling": scaling}


def gpt_oss_keys(where: str, hf: Any) -> dict[str, Any]:
    """Our config keys for a transformers GptOssConfig; a field we would compute differently is a ConfigError."""
    quantization = getattr(hf, "quantization_config", None)
    if quantization:
        method = (quantization.get("quant_method") if isinstance(quantization, dict)
                  else getattr(quantization, "quant_method", None))
        raise ConfigError(f"{where}: quantization_config (quant_method {method!r}): the experts are quantized; "
                          "dequantize first (transformers: GptOssForCausalLM.from_pretrained(folder, "
                          "quantization_config=Mxfp4Config(dequantize=True)).save_pretrained(new_folder))")
    head_dim = hf.head_dim or hf.hidden_size // hf.num_attention_heads
    return window_keys(where, hf) | rope_keys(where, hf) | {
        "num_layers": hf.num_hidden_layers, "hidden_size": hf.hidden_size,
        "num_attention_heads": hf.num_attention_heads, "num_kv_heads": hf.num_key_value_heads,
        "head_dim": None if head_dim * hf.num_attention_heads == hf.hidden_size else head_dim,
        "attention_sinks": True, "use_bias_in_attn_linear": bool(hf.attention_bias),
        "max_position_embeddings": hf.max_position_embeddings, "seq_length": hf.max_position_embeddings,
        "pos_emb": "rotary", "rotary_pct": 1.0,
        "norm": "rmsnorm", "rms_norm_epsilon": hf.rms_norm_eps, "use_bias_in_norms": False,
        "activation": "clamped_swiglu", "swiglu_alpha": float(hf.swiglu_alpha), "swiglu_limit": float(hf.swiglu_limit),
        "intermediate_size": 3 * hf.intermediate_size, "mlp_multiple_of": 1, "use_bias_in_mlp": False,
        "moe_num_experts": hf.num_local_experts, "moe_top_k": hf.num_experts_per_tok,
        "moe_ffn_hidden_size": hf.intermediate_size, "moe_router_type": "topk", "moe_router_bias": True,
        "moe_use_bias_in_experts": True,
        "moe_renormalize_weights": True, "moe_expert_interval": 1, "moe_first_layer": 0,
        "moe_loss_coeff": float(hf.router_aux_loss_coef),
        "no_weight_tying": not hf.tie_word_embeddings,
        "hidden_dropout": 0.0, "attention_dropout": float(hf.attention_dropout),
        "init_method_std": hf.initializer_range,
    }


def deinterleave(gate_up: torch.Tensor) -> torch.Tensor:
    """gpt-oss's [..., 2F] columns (gate at even ones, up at odd ones) as ours: [up (the value) | gate]."""
    return torch.cat([gate_up[..., 1::2], gate_up[..., 0::2]], dim=-1)


def interleave(value_gate: torch.Tensor) -> torch.Tensor:
    """Ours [..., 2F] ([value | gate]) in gpt-oss's columns: gate at even ones, up (the value) at odd ones."""
    value, gate = value_gate.chunk(2, dim=-1)
    return torch.stack([gate, value], dim=-1).flatten(-2)


# our name (with {i} the layer) -> gpt-oss's (the dequantized layout transformers reads and writes)
LAYER_NAMES = {
    "blocks.{i}.input_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blocks.{i}.post_attention_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blocks.{i}.attention.dense.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blocks.{i}.attention.dense.bias": "model.layers.{i}.self_attn.o_proj.bias",
    "blocks.{i}.attention.sinks": "model.layers.{i}.self_attn.sinks",
    "blocks.{i}.mlp.router.gate.weight": "model.layers.{i}.mlp.router.weight",
    "blocks.{i}.mlp.router.gate.bias": "model.layers.{i}.mlp.router.bias",
    "blocks.{i}.mlp.experts.w_up_EDF": "model.layers.{i}.mlp.experts.gate_up_proj",
    "blocks.{i}.mlp.experts.b_up_EU": "model.layers.{i}.mlp.experts.gate_up_proj_bias",
    "blocks.{i}.mlp.experts.w_down_EFD": "model.layers.{i}.mlp.experts.down_proj",
    "blocks.{i}.mlp.experts.b_down_ED": "model.layers.{i}.mlp.experts.down_proj_bias",
}
INTERLEAVED = ("mlp.experts.w_up_EDF", "mlp.experts.b_up_EU")  # ours whose last dim gpt-oss interleaves
QUANTIZED = ("_blocks", "_scales")  # MXFP4 tensors: the experts' packed 4-bit values and their block scales


def gpt_oss_to_ours(state: dict[str, torch.Tensor], cfg: Any) -> dict[str, torch.Tensor]:
    """GptOssForCausalLM's state dict -> ours; every gpt-oss tensor is used exactly once."""
    quantized = sorted(name for name in state if name.endswith(QUANTIZED))
    if quantized:
        raise ValueError(f"{quantized[0]}: MXFP4-quantized experts ({len(quantized)} such tensors); dequantize "
                         "first (Mxfp4Config(dequantize=True), saved again)")
    take = Taker(state, "gpt-oss")

    out = {"embed.weight": take("model.embed_tokens.weight"), "final_norm.weight": take("model.norm.weight")}
    for i in range(cfg.num_layers):
        layer = f"model.layers.{i}.self_attn"
        out[f"blocks.{i}.attention.qkv.weight"] = torch.cat([take(f"{layer}.{p}_proj.weight") for p in "qkv"])
        if cfg.use_bias_in_attn_linear:
            out[f"blocks.{i}.attention.qkv.bias"] = torch.cat([take(f"{layer}.{p}_proj.bias") for p in "qkv"])
        for ours, theirs in LAYER_NAMES.items():
            ours, theirs = ours.format(i=i), theirs.format(i=i)
            if ours.endswith("attention.dense.bias") and not cfg.use_bias_in_attn_linear:
                continue
            out[ours] = deinterleave(take(theirs)) if ours.endswith(INTERLEAVED) else take(theirs)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = take("lm_head.weight")
    skipped = {"lm_head.weight"} if cfg.tie_embeddings else set()  # a tied copy, when saved
    unused = sorted(set(take.unused()) - skipped)
    if unused:
        raise ValueError(f"{unused[0]}: a gpt-oss tensor this converter does not map ({len(unused)} such)")
    return {name: tensor.contiguous() for name, tensor in out.items()}


def ours_to_gpt_oss(state: dict[str, torch.Tensor], cfg: Any) -> dict[str, torch.Tensor]:
    """Our state dict -> GptOssForCausalLM's (the inverse of gpt_oss_to_ours); every tensor of ours is used."""
    take = Taker(state, "checkpoint's", dtype=None)

    head_dim = head_width(cfg)
    q_width, kv_width = cfg.num_attention_heads * head_dim, (cfg.num_kv_heads or cfg.num_attention_heads) * head_dim
    out = {"model.embed_tokens.weight": take("embed.weight"), "model.norm.weight": take("final_norm.weight")}
    for i in range(cfg.num_layers):
        layer = f"model.layers.{i}.self_attn"
        kinds = ("weight", "bias") if cfg.use_bias_in_attn_linear else ("weight",)
        for kind in kinds:
            q, k, v = take(f"blocks.{i}.attention.qkv.{kind}").split([q_width, kv_width, kv_width], dim=0)
            out |= {f"{layer}.q_proj.{kind}": q, f"{layer}.k_proj.{kind}": k, f"{layer}.v_proj.{kind}": v}
        for ours, theirs in LAYER_NAMES.items():
            ours, theirs = ours.format(i=i), theirs.format(i=i)
            if ours.endswith("attention.dense.bias") and not cfg.use_bias_in_attn_linear:
                continue
            out[theirs] = interleave(take(ours)) if ours.endswith(INTERLEAVED) else take(ours)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = take("lm_head.weight")
    unused = take.unused()
    if unused:
        raise ValueError(f"{unused[0]}: a tensor of ours the gpt-oss layout has no place for ({len(unused)} such)")
    return {name: tensor.detach().to(torch.float32).contiguous() for name, tensor in out.items()}


# The GPTConfig fields gpt-oss holds and their values (ANY: every value); every other field must be off
# (fields.py): a dense layer, shared experts, sigmoid scores, an expert bias for balancing, LoREs, QK-norm, MLA or a
# field added later make the model remote code.
GPT_OSS_FIELDS = {
    "vocab_size": ANY, "num_layers": ANY, "hidden_size": ANY, "num_attention_heads": ANY, "head_dim": ANY,
    "num_kv_heads": ANY, "sliding_window_width": ANY, "sliding_window_pattern": ANY, "attention_sinks": (True,),
    "use_bias_in_attn_linear": ANY,  # attention_bias
    "intermediate_size": ANY, "mlp_multiple_of": ANY,  # the experts' width when moe_ffn_hidden_size is unset
    "use_bias_in_mlp": ANY,  # unused: no dense MLP
    "max_position_embeddings": ANY, "pos_emb": ("rotary",), "rotary_pct": (1.0,), "rotary_emb_base": ANY,
    "rope_scaling": ANY, "rope_scaling.factor": ANY, "rope_scaling.original_max_position_embeddings": ANY,
    "rope_scaling.beta_fast": ANY, "rope_scaling.beta_slow": ANY, "rope_scaling.mscale": ANY,
    "rope_scaling.mscale_all_dim": ANY, "rope_scaling.truncate": ANY, "rope_scaling.low_freq_factor": ANY,
    "rope_scaling.high_freq_factor": ANY,  # Llama-3.1's, which transformers' gpt-oss computes as well
    "norm": ("rmsnorm",), "norm_eps": ANY, "use_bias_in_norms": ANY,  # unused: RMSNorm has no bias
    "activation": ("clamped_swiglu",), "swiglu_alpha": ANY, "swiglu_limit": ANY,
    "gpt_j_residual": (False,), "tie_embeddings": ANY,
    # every layer MoE: a linear router with a bias, softmax over the top-k logits (= renormalised top-k of a softmax)
    "moe": ANY, "moe.num_experts": ANY, "moe.top_k": ANY, "moe.expert_interval": (1,), "moe.first_layer": (0,),
    "moe.ffn_hidden_size": ANY, "moe.renormalize": (True,), "moe.router_type": ("topk",),
    "moe.score_function": ("softmax",), "moe.router_bias": (True,), "moe.expert_biases": (True,),
}


def gpt_oss_blockers(cfg: Any, moe_runtime: Any = None) -> list[str]:
    """Why this GPTConfig is not a GptOssForCausalLM, or [] when it computes exactly one; `moe_runtime` is the
    model's (GPT.moe_runtime), whose megablocks experts hold their weights in another layout."""
    reasons = unrepresented(cfg, GPT_OSS_FIELDS)
    if cfg.moe is None:
        reasons.append("moe: None (expected an MoE model: every gpt-oss layer is one)")
    if cfg.moe is not None and moe_runtime is not None and moe_runtime.impl == "megablocks":
        reasons.append("moe_impl: megablocks (another expert weight layout)")
    return reasons


def gpt_oss_config(cfg: Any) -> dict[str, Any]:
    """config.json of the GptOssForCausalLM computing what `cfg` computes."""
    windows = [layer_window(cfg, i) for i in range(cfg.num_layers)]
    return {
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_kv_heads or cfg.num_attention_heads,
        "head_dim": head_width(cfg),
        "intermediate_size": cfg.moe.ffn_hidden_size or cfg.ffn_size,
        "num_local_experts": cfg.moe.num_experts, "num_experts_per_tok": cfg.moe.top_k,
        "layer_types": ["full_attention" if w is None else "sliding_attention" for w in windows],
        # transformers counts the query itself; it builds a sliding mask even when no layer uses it, so a window
        # is written in any case (the whole context when no layer slides)
        "sliding_window": (cfg.max_position_embeddings if cfg.sliding_window_width is None
                           else window_to_hf(cfg.sliding_window_width)),
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": rope_parameters(cfg), "attention_bias": cfg.use_bias_in_attn_linear,
        "swiglu_alpha": cfg.swiglu_alpha, "swiglu_limit": cfg.swiglu_limit, "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": cfg.attention_dropout,
        "initializer_range": cfg.init_method_std, "output_router_logits": False, "use_cache": True,
        "dtype": "float32",
    }
