"""Hugging Face Llama (`LlamaForCausalLM`: Llama-2, Llama-3, Llama-3.1's scaled RoPE, Llama-3.2's tied
embeddings), Mistral (Llama with a sliding window), Mixtral (the same block with every MLP a sparse MoE), Qwen3
and Qwen3-MoE (QK-norm) as our model, and back.

Shape legend: E experts, D hidden, F expert width.

Llama is a block our GPT already computes: RMSNorm before attention and MLP, rotary on the whole head in the
rotate-half form (GPT-NeoX's), grouped-query attention, a SwiGLU MLP `down(silu(gate x) * up x)` and no biases.
What maps where:
- q/k/v_proj are stacked into our `qkv` ([q | k | v] rows, k and v num_kv_heads wide);
- gate_proj and up_proj into our gated `up` ([value | gate] rows: up_proj is the value, gate_proj the gate);
- Llama's MLP width F is `intermediate_size` there; GPT-NeoX's rule reads a gated width as 2/3 of its key, so
  ours is 3 F (with mlp_multiple_of 1);
- Mixtral's router `gate` is our router's gate; its top-k of a softmax over all experts, renormalised, is our
  top-k router with `moe_renormalize_weights`; expert e's `w3` (up) and `w1` (gate) [F, D] become its slice of
  our `w_up_EDF` [D, 2F] (value = up columns, then gate), `w2` [D, F] its `w_down_EFD` [F, D] (Mixtral's file
  layout, `block_sparse_moe.experts.E.wN`; transformers 5's fused `gate_up_proj` is read too);
- Mistral's sliding_window w counts the query itself; ours (sliding_window_width, GPT-NeoX's) counts the keys
  before it, so ours is w - 1;
- rope_theta is our rotary_emb_base, and Llama-3.1's rope scaling (rope_type llama3) or YaRN's (rope_type yarn,
  every field of transformers' but an explicit attention_factor) our `rope_scaling`; other scaled RoPEs (linear,
  dynamic, longrope) are not computed here: such a folder is refused, naming the field, never converted into
  another model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from megatron.config import ConfigError
from megatron.hf.fields import ANY, unrepresented
from megatron.hf.state import Taker
from megatron.model.rope import YarnRopeScaling

LLAMA_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen3", "qwen3_moe")
# each MoE family's names in its files: (the MoE module, expert e's gate, up and down projections)
EXPERT_NAMES = {"mixtral": ("block_sparse_moe", "w1", "w3", "w2"),
                "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj")}


def llama_keys(where: str, hf: Any) -> dict[str, Any]:
    """Our config keys for a transformers LlamaConfig; a field we would compute differently is a ConfigError."""
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", "llama3", "yarn"):
        raise ConfigError(f"{where}: rope_parameters.rope_type {rope_type!r}: only the default RoPE, Llama-3.1's "
                          "llama3 scaling and yarn are computed here")
    scaling = None
    if rope_type == "yarn":
        scaling = yarn_keys(where, rope, hf.max_position_embeddings)
    if rope_type == "llama3":
        scaling = {"type": "llama3", "factor": float(rope["factor"]), "low_freq_factor": float(rope["low_freq_factor"]),
                   "high_freq_factor": float(rope["high_freq_factor"]), "original_max_position_embeddings":
                   int(rope.get("original_max_position_embeddings") or hf.max_position_embeddings)}
    theta = rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    if float(theta) != int(theta):
        raise ConfigError(f"{where}: rope_theta {theta} (expected a whole number)")
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    if head_dim * hf.num_attention_heads != hf.hidden_size:
        raise ConfigError(f"{where}: head_dim {head_dim} x {hf.num_attention_heads} heads != hidden_size "
                          f"{hf.hidden_size} (ours splits hidden_size evenly over the heads)")
    if hf.hidden_act != "silu":
        raise ConfigError(f"{where}: hidden_act {hf.hidden_act!r} (Llama's SwiGLU uses silu)")
    for field in ("attention_bias", "mlp_bias"):
        if getattr(hf, field, False):
            raise ConfigError(f"{where}: {field}: true (ours has no biases in a Llama-shaped block)")
    window = getattr(hf, "sliding_window", None) if getattr(hf, "use_sliding_window", True) else None
    if window is not None and (hf.model_type not in ("mistral", "mixtral") or window < 2):
        raise ConfigError(f"{where}: sliding_window {window}: not converted (only Mistral's and Mixtral's window "
                          "of 2 or more, on every layer; set it to null if unused)")
    moe = {}
    if hf.model_type == "mixtral":
        jitter = float(getattr(hf, "router_jitter_noise", 0.0) or 0.0)
        moe = {"moe_num_experts": hf.num_local_experts, "moe_top_k": hf.num_experts_per_tok,
               "moe_ffn_hidden_size": hf.intermediate_size, "moe_router_type": "topk",
               "moe_renormalize_weights": True, "moe_expert_interval": 1, "moe_first_layer": 0,
               "moe_jitter_eps": jitter or None, "moe_loss_coeff": float(getattr(hf, "router_aux_loss_coef", 0.02))}
    if hf.model_type == "qwen3_moe":  # layer i is MoE when (i + 1) % decoder_sparse_step == 0: ours from step - 1
        if hf.mlp_only_layers:
            raise ConfigError(f"{where}: mlp_only_layers {hf.mlp_only_layers}: not converted (ours places MoE layers "
                              "every moe_expert_interval from moe_first_layer)")
        step = hf.decoder_sparse_step
        moe = {"moe_num_experts": hf.num_experts, "moe_top_k": hf.num_experts_per_tok,
               "moe_ffn_hidden_size": hf.moe_intermediate_size, "moe_router_type": "topk",
               "moe_renormalize_weights": bool(hf.norm_topk_prob), "moe_expert_interval": step,
               "moe_first_layer": step - 1, "moe_loss_coeff": float(getattr(hf, "router_aux_loss_coef", 0.001))}
    if hf.model_type in ("qwen3", "qwen3_moe"):
        moe["qk_norm"] = True  # per-head RMSNorm of q and k before rotary
    return moe | {
        "num_layers": hf.num_hidden_layers, "hidden_size": hf.hidden_size,
        "num_attention_heads": hf.num_attention_heads, "num_kv_heads": hf.num_key_value_heads,
        "intermediate_size": 3 * hf.intermediate_size, "mlp_multiple_of": 1, "activation": "swiglu",
        "max_position_embeddings": hf.max_position_embeddings, "seq_length": hf.max_position_embeddings,
        "pos_emb": "rotary", "rotary_pct": 1.0, "rotary_emb_base": int(theta), "rope_scaling": scaling,
        "sliding_window_width": None if window is None else window - 1,  # theirs counts the query itself
        "norm": "rmsnorm", "rms_norm_epsilon": hf.rms_norm_eps, "use_bias_in_norms": False,
        "use_bias_in_attn_linear": False, "use_bias_in_mlp": False, "no_weight_tying": not hf.tie_word_embeddings,
        "hidden_dropout": 0.0, "attention_dropout": float(getattr(hf, "attention_dropout", 0.0)),
        "init_method_std": hf.initializer_range,
    }


def yarn_keys(where: str, rope: dict[str, Any], max_position_embeddings: int) -> dict[str, Any]:
    """Our rope_scaling block for transformers' yarn rope_parameters, with transformers' defaults and rules: factor
    unset is max_position_embeddings / original; mscale acts only beside a non-zero mscale_all_dim."""
    if rope.get("attention_factor") is not None:
        raise ConfigError(f"{where}: rope_parameters.attention_factor {rope['attention_factor']}: not converted (ours "
                          "derives it from factor, mscale and mscale_all_dim, as transformers does when it is unset)")
    original = int(rope.get("original_max_position_embeddings") or max_position_embeddings)
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    if not (mscale and mscale_all_dim):  # transformers then scales by mscale(factor) alone: ours with (1, 0)
        mscale, mscale_all_dim = 1.0, 0.0
    return {"type": "yarn", "factor": float(rope.get("factor") or max_position_embeddings / original),
            "original_max_position_embeddings": original, "beta_fast": float(rope.get("beta_fast") or 32.0),
            "beta_slow": float(rope.get("beta_slow") or 1.0), "mscale": float(mscale),
            "mscale_all_dim": float(mscale_all_dim), "truncate": bool(rope.get("truncate", True))}


def experts_to_ours(take: Taker, experts: str, names: Sequence[str], num_experts: int, ours: str
                    ) -> dict[str, torch.Tensor]:
    """A MoE layer's experts -> our `{ours}.experts.w_up_EDF` ([value = up | gate] columns) and `w_down_EFD`, from
    transformers 5's fused `{experts}.gate_up_proj` [E, 2F, D] (gate rows first) and `down_proj` [E, D, F] when the
    file has them, else from one module per expert, `{experts}.{e}.{gate|up|down}.weight` with `names` (gate, up,
    down): Mixtral's w1/w3/w2, gate_proj/up_proj/down_proj for Qwen3-MoE and DeepSeek-V3."""
    if take.has(f"{experts}.gate_up_proj"):
        gate_EFD, up_EFD = take(f"{experts}.gate_up_proj").chunk(2, dim=1)
        down_EDF = take(f"{experts}.down_proj")
    else:
        gate_EFD, up_EFD, down_EDF = (torch.stack([take(f"{experts}.{e}.{name}.weight") for e in range(num_experts)])
                                      for name in names)
    return {f"{ours}.experts.w_up_EDF": torch.cat([up_EFD, gate_EFD], dim=1).transpose(1, 2),
            f"{ours}.experts.w_down_EFD": down_EDF.transpose(1, 2)}


def experts_from_ours(take: Taker, ours: str, experts: str, names: Sequence[str], num_experts: int
                      ) -> dict[str, torch.Tensor]:
    """The inverse of experts_to_ours, one module per expert (the families' published layout)."""
    value_EDF, gate_EDF = take(f"{ours}.experts.w_up_EDF").chunk(2, dim=2)
    down_EFD = take(f"{ours}.experts.w_down_EFD")
    gate, up, down = names
    out = {}
    for e in range(num_experts):
        out |= {f"{experts}.{e}.{gate}.weight": gate_EDF[e].T, f"{experts}.{e}.{up}.weight": value_EDF[e].T,
                f"{experts}.{e}.{down}.weight": down_EFD[e].T}
    return out


def llama_to_ours(state: dict[str, torch.Tensor], cfg: Any) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM's state dict -> ours; every Llama tensor is used exactly once."""
    take = Taker(state, "Llama")

    out = {"embed.weight": take("model.embed_tokens.weight"), "final_norm.weight": take("model.norm.weight")}
    for i in range(cfg.num_layers):
        layer = f"model.layers.{i}"
        attention = [take(f"{layer}.self_attn.{p}_proj.weight") for p in "qkv"]
        out |= {
            f"blocks.{i}.input_norm.weight": take(f"{layer}.input_layernorm.weight"),
            f"blocks.{i}.post_attention_norm.weight": take(f"{layer}.post_attention_layernorm.weight"),
            f"blocks.{i}.attention.qkv.weight": torch.cat(attention, dim=0),
            f"blocks.{i}.attention.dense.weight": take(f"{layer}.self_attn.o_proj.weight"),
        }
        if cfg.qk_norm:
            out |= {f"blocks.{i}.attention.q_norm.weight": take(f"{layer}.self_attn.q_norm.weight"),
                    f"blocks.{i}.attention.k_norm.weight": take(f"{layer}.self_attn.k_norm.weight")}
        files = next((names for names in EXPERT_NAMES.values()
                      if f"{layer}.{names[0]}.experts.0.{names[1]}.weight" in state), None)
        if cfg.moe is None or not cfg.moe.is_moe_layer(i):
            out |= {f"blocks.{i}.mlp.up.weight": torch.cat([take(f"{layer}.mlp.up_proj.weight"),
                                                             take(f"{layer}.mlp.gate_proj.weight")], dim=0),
                    f"blocks.{i}.mlp.down.weight": take(f"{layer}.mlp.down_proj.weight")}
        else:  # the families' files (one gate, up and down projection per expert), else transformers 5's fused layout
            moe, *names = files or ("mlp", "gate_proj", "up_proj", "down_proj")
            out |= {f"blocks.{i}.mlp.router.gate.weight": take(f"{layer}.{moe}.gate.weight"),
                    **experts_to_ours(take, f"{layer}.{moe}.experts", names, cfg.moe.num_experts, f"blocks.{i}.mlp")}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = take("lm_head.weight")
    skipped = {"lm_head.weight"} if cfg.tie_embeddings else set()  # a tied copy, when saved
    unused = sorted(set(take.unused()) - skipped - {k for k in state if k.endswith("rotary_emb.inv_freq")})
    if unused:
        raise ValueError(f"{unused[0]}: a Llama tensor this converter does not map ({len(unused)} such)")
    return {name: tensor.contiguous() for name, tensor in out.items()}


# The GPTConfig fields the Llama family holds and their values (ANY: every value); every other field must be off
# (fields.py): a field added later, an expert bias or sigmoid scores make the model remote code. Which class
# holds which combination (Mixtral's MoE layers, Qwen3-MoE's) is checked in llama_blockers.
LLAMA_FIELDS = {
    "vocab_size": ANY, "num_layers": ANY, "hidden_size": ANY, "num_attention_heads": ANY, "num_kv_heads": ANY,
    "sliding_window_width": ANY,  # Mistral's and Mixtral's sliding_window
    "qk_norm": ANY,  # Qwen3 and Qwen3-MoE
    "intermediate_size": ANY, "mlp_multiple_of": ANY,  # written as the width F they give
    "use_bias_in_mlp": (False,), "use_bias_in_attn_linear": (False,),
    "use_bias_in_norms": ANY,  # unused: RMSNorm has no bias
    "max_position_embeddings": ANY, "pos_emb": ("rotary",), "rotary_pct": (1.0,), "rotary_emb_base": ANY,
    "rope_scaling": ANY, "rope_scaling.factor": ANY, "rope_scaling.low_freq_factor": ANY,
    "rope_scaling.high_freq_factor": ANY, "rope_scaling.original_max_position_embeddings": ANY,
    "rope_scaling.beta_fast": ANY, "rope_scaling.beta_slow": ANY, "rope_scaling.mscale": ANY,  # yarn
    "rope_scaling.mscale_all_dim": ANY, "rope_scaling.truncate": ANY,
    "norm": ("rmsnorm",), "norm_eps": ANY, "activation": ("swiglu",), "gpt_j_residual": (False,),
    "tie_embeddings": ANY,
    # Mixtral and Qwen3-MoE: the top-k of a softmax over the experts' gate logits, no bias, no shared experts, no
    # LoREs (moe.balancing and moe.lore are left undeclared: off)
    "moe": ANY, "moe.num_experts": ANY, "moe.top_k": ANY, "moe.expert_interval": ANY, "moe.first_layer": ANY,
    "moe.ffn_hidden_size": ANY, "moe.renormalize": ANY, "moe.router_type": ("topk",),
    "moe.score_function": ("softmax",),
}


def llama_blockers(cfg: Any, moe_runtime: Any = None) -> list[str]:
    """Why this GPTConfig is not a Llama-family model, or [] when it computes exactly one; `moe_runtime` is the
    model's (GPT.moe_runtime), whose megablocks experts hold their weights in another layout."""
    reasons = unrepresented(cfg, LLAMA_FIELDS)
    moe = cfg.moe
    if moe is not None and cfg.qk_norm:  # Qwen3-MoE: layers step - 1, 2 step - 1, ...; renormalised or not
        if moe.first_layer != moe.expert_interval - 1:
            reasons.append(f"moe.first_layer: {moe.first_layer} with moe.expert_interval {moe.expert_interval} "
                           "(expected interval - 1: Qwen3-MoE's MoE layers are interval - 1, 2 interval - 1, ...)")
    elif moe is not None:  # Mixtral: every layer MoE, gates renormalised
        wanted = {"expert_interval": 1, "first_layer": 0, "renormalize": True}
        reasons += [f"moe.{key}: {getattr(moe, key)!r} (expected {value!r}: Mixtral)" for key, value in wanted.items()
                    if getattr(moe, key) != value]
    if moe is not None and moe_runtime is not None and moe_runtime.impl == "megablocks":
        reasons.append("moe_impl: megablocks (another expert weight layout)")
    if cfg.sliding_window_width is not None and cfg.qk_norm:
        reasons.append("sliding_window_width with qk_norm (Qwen3 windows only some layers)")
    if cfg.hidden_size % cfg.num_attention_heads:
        reasons.append("hidden_size not a multiple of num_attention_heads")
    return reasons


def llama_config(cfg: Any) -> dict[str, Any]:
    """config.json of the family model computing what `cfg` computes: LlamaForCausalLM, Qwen3ForCausalLM (QK-norm),
    MixtralForCausalLM (MoE) or Qwen3MoeForCausalLM (MoE with QK-norm)."""
    moe = cfg.moe
    if moe is not None and cfg.qk_norm:
        return llama_config(dataclasses.replace(cfg, moe=None)) | {
            "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
            "num_experts": moe.num_experts, "num_experts_per_tok": moe.top_k,
            "moe_intermediate_size": moe.ffn_hidden_size or cfg.ffn_size, "norm_topk_prob": moe.renormalize,
            "decoder_sparse_step": moe.expert_interval, "mlp_only_layers": [], "output_router_logits": False}
    if moe is not None:
        return llama_config(dataclasses.replace(cfg, moe=None)) | {
            "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            "num_local_experts": moe.num_experts, "num_experts_per_tok": moe.top_k,
            "intermediate_size": moe.ffn_hidden_size or cfg.ffn_size, "router_jitter_noise": moe.jitter_eps or 0.0,
            "sliding_window": hf_window(cfg), "output_router_logits": False}
    if cfg.qk_norm:
        return llama_config(dataclasses.replace(cfg, qk_norm=False)) | {
            "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "use_sliding_window": False,
            "sliding_window": None}
    if cfg.sliding_window_width is not None:
        return llama_config(dataclasses.replace(cfg, sliding_window_width=None)) | {
            "architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": hf_window(cfg)}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_kv_heads or cfg.num_attention_heads,
        "head_dim": cfg.hidden_size // cfg.num_attention_heads, "intermediate_size": cfg.ffn_size,
        "hidden_act": "silu", "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": rope_parameters(cfg),
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "attention_dropout": cfg.attention_dropout, "initializer_range": cfg.init_method_std, "use_cache": True,
        "dtype": "float32",
    }


def hf_window(cfg: Any) -> int | None:
    """transformers' sliding_window counts the query itself: a query sees the w - 1 keys before it."""
    return None if cfg.sliding_window_width is None else cfg.sliding_window_width + 1


def rope_parameters(cfg: Any) -> dict[str, Any]:
    """transformers' rope_parameters for our rotary settings (plain, Llama-3.1's llama3 scaling or yarn)."""
    if cfg.rope_scaling is None:
        return {"rope_type": "default", "rope_theta": float(cfg.rotary_emb_base)}
    rope_type = "yarn" if isinstance(cfg.rope_scaling, YarnRopeScaling) else "llama3"
    return {"rope_type": rope_type, "rope_theta": float(cfg.rotary_emb_base)} | dataclasses.asdict(cfg.rope_scaling)


def ours_to_llama(state: dict[str, torch.Tensor], cfg: Any) -> dict[str, torch.Tensor]:
    """Our state dict -> LlamaForCausalLM's (the inverse of llama_to_ours); every tensor of ours is used."""
    take = Taker(state, "checkpoint's", dtype=None)

    d, heads = cfg.hidden_size, cfg.num_attention_heads
    kv_width = d * (cfg.num_kv_heads or heads) // heads
    out = {"model.embed_tokens.weight": take("embed.weight"), "model.norm.weight": take("final_norm.weight")}
    for i in range(cfg.num_layers):
        layer = f"model.layers.{i}"
        q, k, v = take(f"blocks.{i}.attention.qkv.weight").split([d, kv_width, kv_width], dim=0)
        out |= {
            f"{layer}.input_layernorm.weight": take(f"blocks.{i}.input_norm.weight"),
            f"{layer}.post_attention_layernorm.weight": take(f"blocks.{i}.post_attention_norm.weight"),
            f"{layer}.self_attn.q_proj.weight": q, f"{layer}.self_attn.k_proj.weight": k,
            f"{layer}.self_attn.v_proj.weight": v,
            f"{layer}.self_attn.o_proj.weight": take(f"blocks.{i}.attention.dense.weight"),
        }
        if cfg.qk_norm:
            out |= {f"{layer}.self_attn.q_norm.weight": take(f"blocks.{i}.attention.q_norm.weight"),
                    f"{layer}.self_attn.k_norm.weight": take(f"blocks.{i}.attention.k_norm.weight")}
        if cfg.moe is None or not cfg.moe.is_moe_layer(i):
            value, gate = take(f"blocks.{i}.mlp.up.weight").chunk(2, dim=0)
            out |= {f"{layer}.mlp.up_proj.weight": value, f"{layer}.mlp.gate_proj.weight": gate,
                    f"{layer}.mlp.down_proj.weight": take(f"blocks.{i}.mlp.down.weight")}
        else:  # the family's file layout (what its published checkpoints hold and transformers reads)
            moe, *names = EXPERT_NAMES["qwen3_moe" if cfg.qk_norm else "mixtral"]
            out[f"{layer}.{moe}.gate.weight"] = take(f"blocks.{i}.mlp.router.gate.weight")
            out |= experts_from_ours(take, f"blocks.{i}.mlp", f"{layer}.{moe}.experts", names, cfg.moe.num_experts)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = take("lm_head.weight")
    unused = take.unused()
    if unused:
        raise ValueError(f"{unused[0]}: a tensor of ours the Llama layout has no place for ({len(unused)} such)")
    return {name: tensor.contiguous() for name, tensor in out.items()}
