"""Hugging Face DeepSeek-V3 (`DeepseekV3ForCausalLM`, model_type deepseek_v3, and models published in its format)
as our model, and back.

Shape legend: E experts, D hidden, F an expert's width, H heads, N qk_nope_head_dim, R qk_rope_head_dim.

DeepSeek-V3's block is ours with multi-head latent attention (mla.py) and a DeepSeekMoE feed-forward: the first
`first_k_dense_replace` layers dense SwiGLU, every later one routed experts (sigmoid scores, the best `topk_group`
of `n_group` expert groups, the loss-free balancing bias `e_score_correction_bias` choosing, gates normalised and
scaled by `routed_scaling_factor`) plus always-on shared experts. What maps where:
- MLA's projections are renamed (q_a_proj -> q_down, q_a_layernorm -> q_norm, q_b_proj -> q_up, q_proj,
  kv_a_proj_with_mqa -> kv_down, kv_a_layernorm -> kv_norm, kv_b_proj -> kv_up, o_proj -> dense); with
  `rope_interleave` (DeepSeek's published layout) their rotary rows are interleaved pairs (x0, x1), (x2, x3), ...
  and ours are rotate-half pairs (x_i, x_{i+R/2}), so the R rope rows of each query head and of kv_down's shared
  key are permuted: evens first, then odds (transformers' interleaved rotation computes exactly that);
- expert e's up_proj (value) and gate_proj (gate) [F, D] are its slice of our `w_up_EDF` [D, 2F], down_proj its
  `w_down_EFD`; both file layouts are read (per expert `mlp.experts.E.gate_proj/up_proj/down_proj`, as DeepSeek's
  release and save_pretrained write them, and transformers 5's fused `mlp.experts.gate_up_proj` [E, 2F, D] with
  gate rows first, `mlp.experts.down_proj` [E, D, F]); exports are written per expert;
- the router's `gate.weight` is our router's gate, `gate.e_score_correction_bias` our loss-free `expert_bias_E`;
- the shared experts (one MLP n_shared_experts x F wide) are our `mlp.shared_experts`;
- multi-token prediction modules are stored after the last layer, at model.layers.{L + d} (enorm, hnorm, eh_proj,
  a decoder layer, shared_head.norm, and copies of the embedding and of the head); DeepseekV3ForCausalLM does not
  compute them and skips them on load, so they are kept both ways (mapped onto mtp.py's modules).
FP8 checkpoints (a quantization_config, weight_scale_inv tensors) and what transformers computes and we do not
(norm_topk_prob false, another activation, key/value heads unlike the query heads, ...) are refused in one line
naming the field.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron.config import ConfigError
from megatron.hf.fields import ANY, unrepresented
from megatron.hf.llama import experts_from_ours, experts_to_ours, rope_parameters, yarn_keys
from megatron.hf.state import Taker

State = dict[str, torch.Tensor]
MODEL_TYPE = "deepseek_v3"
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")  # one module per expert: gate, up, down


# --- rotary rows: DeepSeek's interleaved pairs <-> our rotate-half pairs ---------------------------------------

def interleaved_order(rope_dims: int) -> torch.Tensor:
    """Row i of the rotate-half layout is row order[i] of the interleaved one: pair j is (2j, 2j + 1) there and
    (j, j + R/2) here, so the evens come first, then the odds."""
    return torch.cat([torch.arange(0, rope_dims, 2), torch.arange(1, rope_dims, 2)])


def rope_rows_interleaved_to_half(t: torch.Tensor, block: int, rope: int) -> torch.Tensor:
    """A weight or bias whose rows are blocks of `block` rows, each ending in `rope` rotary rows in DeepSeek's
    interleaved order (the query: one block [nope N | rope R] per head; kv_down: one block [latent C | shared key
    R]) -> the same rows with each block's rope rows in rotate-half order."""
    if t.shape[0] % block or not 0 < rope <= block:
        raise ValueError(f"{t.shape[0]} rows do not split into blocks of {block} ending in {rope} rotary rows")
    order = torch.cat([torch.arange(block - rope), block - rope + interleaved_order(rope)])
    return t.reshape(-1, block, *t.shape[1:])[:, order].reshape(t.shape)


def rope_rows_half_to_interleaved(t: torch.Tensor, block: int, rope: int) -> torch.Tensor:
    """The inverse of rope_rows_interleaved_to_half."""
    if t.shape[0] % block or not 0 < rope <= block:
        raise ValueError(f"{t.shape[0]} rows do not split into blocks of {block} ending in {rope} rotary rows")
    order = torch.cat([torch.arange(block - rope), block - rope + torch.argsort(interleaved_order(rope))])
    return t.reshape(-1, block, *t.shape[1:])[:, order].reshape(t.shape)


# --- config.json -> our keys --------------------------------------------------------------------------------------

def deepseek_keys(where: str, hf: Any) -> dict[str, Any]:
    """Our config keys for a transformers DeepseekV3Config; what we would compute differently is a ConfigError
    naming the field."""
    quantization = getattr(hf, "quantization_config", None)
    if quantization:
        method = (quantization.get("quant_method", "?") if isinstance(quantization, dict)
                  else type(quantization).__name__)
        raise ConfigError(f"{where}: quantization_config (quant_method {method!r}): quantized (FP8) checkpoints are "
                          "not converted; expected bf16 or fp32 weights (dequantize them first)")
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", "yarn"):
        raise ConfigError(f"{where}: rope_parameters.rope_type {rope_type!r}: only the default RoPE and YaRN are "
                          "computed here")
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConfigError(f"{where}: rope_parameters.partial_rotary_factor {rope['partial_rotary_factor']} (expected "
                          "1.0: MLA rotates all qk_rope_head_dim dims)")
    theta = rope.get("rope_theta", 10000.0)
    if float(theta) != int(theta):
        raise ConfigError(f"{where}: rope_theta {theta} (expected a whole number)")
    if hf.hidden_act != "silu":
        raise ConfigError(f"{where}: hidden_act {hf.hidden_act!r} (expected silu: DeepSeek-V3's SwiGLU)")
    if hf.num_key_value_heads != hf.num_attention_heads:
        raise ConfigError(f"{where}: num_key_value_heads {hf.num_key_value_heads} (expected num_attention_heads "
                          f"{hf.num_attention_heads}: MLA gives every head its own key and value)")
    keys = {
        "num_layers": hf.num_hidden_layers, "hidden_size": hf.hidden_size,
        "num_attention_heads": hf.num_attention_heads,
        "kv_lora_rank": hf.kv_lora_rank, "q_lora_rank": hf.q_lora_rank, "qk_nope_head_dim": hf.qk_nope_head_dim,
        "qk_rope_head_dim": hf.qk_rope_head_dim, "v_head_dim": hf.v_head_dim,
        "intermediate_size": 3 * hf.intermediate_size, "mlp_multiple_of": 1, "activation": "swiglu",
        "max_position_embeddings": hf.max_position_embeddings, "seq_length": hf.max_position_embeddings,
        "pos_emb": "rotary", "rotary_pct": 1.0, "rotary_emb_base": int(theta),
        "rope_scaling": yarn_keys(where, rope, hf.max_position_embeddings) if rope_type == "yarn" else None,
        "norm": "rmsnorm", "rms_norm_epsilon": hf.rms_norm_eps, "use_bias_in_norms": False,
        "use_bias_in_attn_linear": bool(hf.attention_bias), "use_bias_in_mlp": False,
        "no_weight_tying": not hf.tie_word_embeddings, "hidden_dropout": 0.0,
        "attention_dropout": float(hf.attention_dropout or 0.0), "init_method_std": hf.initializer_range,
    }
    first_dense = hf.first_k_dense_replace or 0
    if first_dense >= hf.num_hidden_layers:  # every layer dense: no MoE keys (they would ask for experts)
        return keys
    if not hf.norm_topk_prob:
        raise ConfigError(f"{where}: norm_topk_prob false (ours normalises the chosen sigmoid gates to sum to 1; "
                          "expected true)")
    if not hf.n_group or hf.n_routed_experts % hf.n_group:
        raise ConfigError(f"{where}: n_group {hf.n_group} (expected a whole number of groups dividing n_routed_experts "
                          f"{hf.n_routed_experts})")
    return keys | {
        "moe_num_experts": hf.n_routed_experts, "moe_top_k": hf.num_experts_per_tok,
        "moe_ffn_hidden_size": hf.moe_intermediate_size, "moe_num_shared_experts": hf.n_shared_experts,
        "moe_expert_interval": 1, "moe_first_layer": first_dense, "moe_router_type": "topk",
        "moe_router_score_function": "sigmoid",  # sigmoid gates are always normalised (norm_topk_prob)
        "moe_router_enable_expert_bias": True, "moe_router_num_groups": hf.n_group,
        "moe_router_group_top_k": hf.topk_group, "moe_router_scaling_factor": float(hf.routed_scaling_factor),
        # DeepSeek's config.json (not transformers') names the sequence-wise balance loss's weight aux_loss_alpha
        "moe_loss_coeff": float(getattr(hf, "aux_loss_alpha", None) or 0.0001), "moe_lbl_scope": "sequence",
    }


def mtp_layers_in(state: State, num_layers: int) -> int:
    """How many multi-token prediction modules the weights hold: model.layers.L, L + 1, ... (L the main layers)."""
    count = 0
    while any(name.startswith(f"model.layers.{num_layers + count}.") for name in state):
        count += 1
    return count


def deepseek_prepare(where: str, hf: Any, state: State) -> tuple[dict[str, Any], State]:
    """What the weights decide and the weights as deepseek_to_ours reads them: the MTP modules they hold
    (transformers' own save_pretrained writes none, whatever num_nextn_predict_layers says, so config.json alone
    cannot tell), and with rope_interleave every layer's rope rows in our rotate-half order. `where`: the weights'
    file, for the errors."""
    scales = sorted(name for name in state if name.endswith("weight_scale_inv"))
    if scales:
        raise ConfigError(f"{where}: holds FP8 scales ({scales[0]}, {len(scales)} such): quantized checkpoints are "
                          "not converted; expected bf16 or fp32 weights (dequantize them first)")
    modules = mtp_layers_in(state, hf.num_hidden_layers)
    declared = getattr(hf, "num_nextn_predict_layers", 0) or 0
    if modules > declared:
        raise ConfigError(f"{where}: holds {modules} multi-token prediction modules after the last layer "
                          f"(model.layers.{hf.num_hidden_layers}..), but config.json's num_nextn_predict_layers is "
                          f"{declared}; expected at most that many")
    if hf.rope_interleave:
        N, R, C = hf.qk_nope_head_dim, hf.qk_rope_head_dim, hf.kv_lora_rank
        blocks = {"self_attn.q_proj.weight": N + R, "self_attn.q_b_proj.weight": N + R,
                  "self_attn.kv_a_proj_with_mqa.weight": C + R, "self_attn.kv_a_proj_with_mqa.bias": C + R}
        state = {name: next((rope_rows_interleaved_to_half(t, block, R) for suffix, block in blocks.items()
                             if name.endswith(f".{suffix}")), t) for name, t in state.items()}
    return ({"mtp_num_modules": modules} if modules else {}), state


# --- weights -------------------------------------------------------------------------------------------------------

def attention_to_ours(take: Taker, hf: str, ours: str, cfg: Any) -> State:
    """One layer's DeepseekV3Attention -> our MultiHeadLatentAttention (rope rows already in rotate-half order:
    deepseek_prepare)."""
    mla = cfg.mla
    out = {f"{ours}.kv_down.weight": take(f"{hf}.kv_a_proj_with_mqa.weight"),
           f"{ours}.kv_norm.weight": take(f"{hf}.kv_a_layernorm.weight"),
           f"{ours}.kv_up.weight": take(f"{hf}.kv_b_proj.weight"),
           f"{ours}.dense.weight": take(f"{hf}.o_proj.weight")}
    if mla.q_lora_rank is None:
        out[f"{ours}.q_proj.weight"] = take(f"{hf}.q_proj.weight")
    else:
        out |= {f"{ours}.q_down.weight": take(f"{hf}.q_a_proj.weight"),
                f"{ours}.q_norm.weight": take(f"{hf}.q_a_layernorm.weight"),
                f"{ours}.q_up.weight": take(f"{hf}.q_b_proj.weight")}
    if cfg.use_bias_in_attn_linear:  # attention_bias: q_a_proj, kv_a_proj_with_mqa and o_proj
        out |= {f"{ours}.kv_down.bias": take(f"{hf}.kv_a_proj_with_mqa.bias"),
                f"{ours}.dense.bias": take(f"{hf}.o_proj.bias")}
        if mla.q_lora_rank is not None:
            out[f"{ours}.q_down.bias"] = take(f"{hf}.q_a_proj.bias")
    return out


def feedforward_to_ours(take: Taker, hf: str, ours: str, moe_layer: bool, num_experts: int) -> State:
    """One layer's dense MLP or DeepseekV3MoE (either experts layout) -> ours."""
    def gated(prefix: str) -> State:  # a SwiGLU MLP: our up rows are [value (up_proj) | gate (gate_proj)]
        return {f"{ours}.up.weight": torch.cat([take(f"{hf}.{prefix}up_proj.weight"),
                                                take(f"{hf}.{prefix}gate_proj.weight")], dim=0),
                f"{ours}.down.weight": take(f"{hf}.{prefix}down_proj.weight")}

    if not moe_layer:
        return gated("")
    out = {f"{ours}.router.gate.weight": take(f"{hf}.gate.weight"),
           f"{ours}.router.expert_bias_E": take(f"{hf}.gate.e_score_correction_bias"),
           **experts_to_ours(take, f"{hf}.experts", EXPERT_PROJECTIONS, num_experts, ours)}  # either layout
    if take.has(f"{hf}.shared_experts.up_proj.weight"):
        shared = gated("shared_experts.")
        out |= {f"{ours}.shared_experts.{k.rsplit('.', 2)[-2]}.weight": v for k, v in shared.items()}
    return out


def block_to_ours(take: Taker, hf: str, ours: str, cfg: Any, moe_layer: bool) -> State:
    """One decoder layer (norms, attention, feed-forward)."""
    num_experts = cfg.moe.num_experts if cfg.moe is not None else 0
    return {f"{ours}.input_norm.weight": take(f"{hf}.input_layernorm.weight"),
            f"{ours}.post_attention_norm.weight": take(f"{hf}.post_attention_layernorm.weight"),
            **attention_to_ours(take, f"{hf}.self_attn", f"{ours}.attention", cfg),
            **feedforward_to_ours(take, f"{hf}.mlp", f"{ours}.mlp", moe_layer, num_experts)}


def is_moe_layer(cfg: Any, layer: int) -> bool:
    return cfg.moe is not None and cfg.moe.is_moe_layer(layer)


def deepseek_to_ours(state: State, cfg: Any) -> State:
    """DeepseekV3ForCausalLM's state dict (prepared by deepseek_prepare) -> ours; every tensor is used exactly once
    (an MTP module's copies of the embedding and head are checked equal to the model's)."""
    take = Taker(state, "DeepSeek-V3")
    out = {"embed.weight": take("model.embed_tokens.weight"), "final_norm.weight": take("model.norm.weight")}
    for i in range(cfg.num_layers):
        out |= block_to_ours(take, f"model.layers.{i}", f"blocks.{i}", cfg, is_moe_layer(cfg, i))
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = take("lm_head.weight")
    for d in range(cfg.mtp_num_modules):
        out |= mtp_to_ours(take, cfg, d, out)
    skipped = {"lm_head.weight"} if cfg.tie_embeddings else set()  # a tied copy, when saved
    unused = sorted(set(take.unused()) - skipped - {k for k in state if k.endswith("rotary_emb.inv_freq")})
    if unused:
        raise ValueError(f"{unused[0]}: a DeepSeek-V3 tensor this converter does not map ({len(unused)} such)")
    return {name: tensor.contiguous() for name, tensor in out.items()}


def mtp_to_ours(take: Taker, cfg: Any, d: int, main: State) -> State:
    """MTP module d, stored as model.layers.{L + d}, -> our mtp.{d} (mtp.py): its norms, projection, decoder layer
    and shared_head.norm (our final_norm); its copies of the embedding and head must be the model's (ours shares
    them), else this is one line naming the copy."""
    hf, ours = f"model.layers.{cfg.num_layers + d}", f"mtp.{d}"
    head = "embed.weight" if cfg.tie_embeddings else "lm_head.weight"
    for name, what in ((f"{hf}.shared_head.head.weight", head), (f"{hf}.embed_tokens.weight", "embed.weight")):
        if take.has(name) and not torch.equal(take(name), main[what]):
            theirs = {"embed.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight"}[what]
            raise ValueError(f"{name}: differs from {theirs} (ours shares the model's; expected a copy of it)")
    return {f"{ours}.enorm.weight": take(f"{hf}.enorm.weight"), f"{ours}.hnorm.weight": take(f"{hf}.hnorm.weight"),
            f"{ours}.eh_proj.weight": take(f"{hf}.eh_proj.weight"),
            f"{ours}.final_norm.weight": take(f"{hf}.shared_head.norm.weight"),
            **block_to_ours(take, hf, f"{ours}.block", cfg, is_moe_layer(cfg, cfg.num_layers + d))}


# --- ours -> DeepSeek-V3 -------------------------------------------------------------------------------------------

# The GPTConfig fields DeepSeek-V3 holds and their values (ANY: every value); every other field must be off
# (fields.py). Which combinations it holds is checked in deepseek_blockers.
DEEPSEEK_FIELDS = {
    "vocab_size": ANY, "num_layers": ANY, "hidden_size": ANY, "num_attention_heads": ANY,
    "intermediate_size": ANY, "mlp_multiple_of": ANY,  # written as the dense layers' width F
    "use_bias_in_mlp": (False,), "use_bias_in_attn_linear": ANY,  # attention_bias
    "use_bias_in_norms": ANY,  # unused: RMSNorm has no bias
    "max_position_embeddings": ANY, "pos_emb": ("rotary",), "rotary_pct": (1.0,), "rotary_emb_base": ANY,
    "rope_scaling": ANY, "rope_scaling.factor": ANY, "rope_scaling.original_max_position_embeddings": ANY,
    "rope_scaling.beta_fast": ANY, "rope_scaling.beta_slow": ANY, "rope_scaling.mscale": ANY,
    "rope_scaling.mscale_all_dim": ANY, "rope_scaling.truncate": ANY,  # YaRN only (deepseek_blockers)
    "norm": ("rmsnorm",), "norm_eps": ANY, "activation": ("swiglu",), "gpt_j_residual": (False,),
    "tie_embeddings": ANY,
    "mla": ANY, "mla.kv_lora_rank": ANY, "mla.qk_nope_head_dim": ANY, "mla.qk_rope_head_dim": ANY,
    "mla.v_head_dim": ANY, "mla.q_lora_rank": ANY,
    # DeepSeekMoE: every layer from first_layer on, sigmoid scores (always normalised: renormalize is moot), the
    # loss-free bias or none (written as zeros), shared experts; no LoREs
    "moe": ANY, "moe.num_experts": ANY, "moe.top_k": ANY, "moe.expert_interval": (1,), "moe.first_layer": ANY,
    "moe.ffn_hidden_size": ANY, "moe.renormalize": ANY, "moe.router_type": ("topk",),
    "moe.score_function": ("sigmoid",), "moe.num_shared_experts": ANY, "moe.balancing": ANY,
    "moe.balancing.bias": ANY, "moe.num_groups": ANY, "moe.group_top_k": ANY, "moe.scaling_factor": ANY,
    "mtp_num_modules": ANY,
}


def deepseek_blockers(cfg: Any, moe_runtime: Any = None) -> list[str]:
    """Why this GPTConfig is not a DeepseekV3ForCausalLM, or [] when it computes exactly one."""
    reasons = unrepresented(cfg, DEEPSEEK_FIELDS)
    if cfg.mla is None:
        reasons.append("mla: None (expected multi-head latent attention: kv_lora_rank)")
    if cfg.rope_scaling is not None and not hasattr(cfg.rope_scaling, "mscale_all_dim"):
        reasons.append(f"rope_scaling: {type(cfg.rope_scaling).__name__} (expected YaRN's or none)")
    if cfg.moe is not None and moe_runtime is not None and moe_runtime.impl == "megablocks":
        reasons.append("moe_impl: megablocks (another expert weight layout)")
    return reasons


def deepseek_config(cfg: Any) -> dict[str, Any]:
    """config.json of the DeepseekV3ForCausalLM computing what `cfg` computes (rope rows written interleaved, as
    DeepSeek publishes them)."""
    mla, moe = cfg.mla, cfg.moe
    config = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": MODEL_TYPE,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_attention_heads,
        "intermediate_size": cfg.ffn_size, "hidden_act": "silu",
        "kv_lora_rank": mla.kv_lora_rank, "q_lora_rank": mla.q_lora_rank, "qk_nope_head_dim": mla.qk_nope_head_dim,
        "qk_rope_head_dim": mla.qk_rope_head_dim, "v_head_dim": mla.v_head_dim,
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": rope_parameters(cfg), "rope_interleave": True,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": cfg.use_bias_in_attn_linear,
        "attention_dropout": cfg.attention_dropout, "initializer_range": cfg.init_method_std,
        "num_nextn_predict_layers": cfg.mtp_num_modules, "use_cache": True, "dtype": "float32",
    }
    if moe is None:  # every layer dense; the MoE sizes are never built
        return config | {"first_k_dense_replace": cfg.num_layers, "n_routed_experts": 1, "num_experts_per_tok": 1,
                         "n_group": 1, "topk_group": 1, "n_shared_experts": 0, "moe_intermediate_size": cfg.ffn_size}
    return config | {
        "first_k_dense_replace": moe.first_layer, "n_routed_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k, "moe_intermediate_size": moe.ffn_hidden_size or cfg.ffn_size,
        "n_shared_experts": moe.num_shared_experts, "norm_topk_prob": True,
        "n_group": moe.num_groups, "topk_group": moe.group_top_k, "routed_scaling_factor": moe.scaling_factor,
        "output_router_logits": False,
    }


def attention_to_deepseek(take: Taker, ours: str, hf: str, cfg: Any) -> State:
    """The inverse of attention_to_ours, rope rows interleaved."""
    mla = cfg.mla
    N, R, C = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.kv_lora_rank
    kv_down = rope_rows_half_to_interleaved(take(f"{ours}.kv_down.weight"), C + R, R)
    out = {f"{hf}.kv_a_proj_with_mqa.weight": kv_down,
           f"{hf}.kv_a_layernorm.weight": take(f"{ours}.kv_norm.weight"),
           f"{hf}.kv_b_proj.weight": take(f"{ours}.kv_up.weight"),
           f"{hf}.o_proj.weight": take(f"{ours}.dense.weight")}
    if mla.q_lora_rank is None:
        out[f"{hf}.q_proj.weight"] = rope_rows_half_to_interleaved(take(f"{ours}.q_proj.weight"), N + R, R)
    else:
        out |= {f"{hf}.q_a_proj.weight": take(f"{ours}.q_down.weight"),
                f"{hf}.q_a_layernorm.weight": take(f"{ours}.q_norm.weight"),
                f"{hf}.q_b_proj.weight": rope_rows_half_to_interleaved(take(f"{ours}.q_up.weight"), N + R, R)}
    if cfg.use_bias_in_attn_linear:
        out |= {f"{hf}.kv_a_proj_with_mqa.bias": rope_rows_half_to_interleaved(take(f"{ours}.kv_down.bias"),
                                                                              C + R, R),
                f"{hf}.o_proj.bias": take(f"{ours}.dense.bias")}
        if mla.q_lora_rank is not None:
            out[f"{hf}.q_a_proj.bias"] = take(f"{ours}.q_down.bias")
    return out


def feedforward_to_deepseek(take: Taker, ours: str, hf: str, moe_layer: bool, cfg: Any) -> State:
    """The inverse of feedforward_to_ours, experts one module each (DeepSeek's published layout)."""
    def gated(prefix: str, up: str, down: str) -> State:
        value, gate = take(up).chunk(2, dim=0)
        return {f"{hf}.{prefix}up_proj.weight": value, f"{hf}.{prefix}gate_proj.weight": gate,
                f"{hf}.{prefix}down_proj.weight": take(down)}

    if not moe_layer:
        return gated("", f"{ours}.up.weight", f"{ours}.down.weight")
    bias = f"{ours}.router.expert_bias_E"  # none: the same choices as a zero bias
    out = {f"{hf}.gate.weight": take(f"{ours}.router.gate.weight"),
           f"{hf}.gate.e_score_correction_bias": take(bias) if take.has(bias) else torch.zeros(cfg.moe.num_experts),
           **experts_from_ours(take, ours, f"{hf}.experts", EXPERT_PROJECTIONS, cfg.moe.num_experts)}
    if cfg.moe.num_shared_experts:
        out |= gated("shared_experts.", f"{ours}.shared_experts.up.weight", f"{ours}.shared_experts.down.weight")
    return out


def block_to_deepseek(take: Taker, ours: str, hf: str, cfg: Any, moe_layer: bool) -> State:
    return {f"{hf}.input_layernorm.weight": take(f"{ours}.input_norm.weight"),
            f"{hf}.post_attention_layernorm.weight": take(f"{ours}.post_attention_norm.weight"),
            **attention_to_deepseek(take, f"{ours}.attention", f"{hf}.self_attn", cfg),
            **feedforward_to_deepseek(take, f"{ours}.mlp", f"{hf}.mlp", moe_layer, cfg)}


def ours_to_deepseek(state: State, cfg: Any) -> State:
    """Our state dict -> DeepseekV3ForCausalLM's (the inverse of deepseek_to_ours); every tensor of ours is used."""
    take = Taker(state, "checkpoint's")
    out = {"model.embed_tokens.weight": take("embed.weight"), "model.norm.weight": take("final_norm.weight")}
    for i in range(cfg.num_layers):
        out |= block_to_deepseek(take, f"blocks.{i}", f"model.layers.{i}", cfg, is_moe_layer(cfg, i))
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = take("lm_head.weight")
    for d in range(cfg.mtp_num_modules):
        out |= mtp_to_deepseek(take, cfg, d, out)
    unused = take.unused()
    if unused:
        raise ValueError(f"{unused[0]}: a tensor of ours the DeepSeek-V3 layout has no place for ({len(unused)} such)")
    return {name: tensor.contiguous() for name, tensor in out.items()}


def mtp_to_deepseek(take: Taker, cfg: Any, d: int, main: State) -> State:
    """Our mtp.{d} -> model.layers.{L + d}, DeepSeek-V3's layout (with copies of the embedding and head, as its
    release has them; copies, so that safetensors writes each once)."""
    hf, ours = f"model.layers.{cfg.num_layers + d}", f"mtp.{d}"
    head = main["model.embed_tokens.weight"] if cfg.tie_embeddings else main["lm_head.weight"]
    return {f"{hf}.enorm.weight": take(f"{ours}.enorm.weight"), f"{hf}.hnorm.weight": take(f"{ours}.hnorm.weight"),
            f"{hf}.eh_proj.weight": take(f"{ours}.eh_proj.weight"),
            f"{hf}.shared_head.norm.weight": take(f"{ours}.final_norm.weight"),
            f"{hf}.shared_head.head.weight": head.clone(),
            f"{hf}.embed_tokens.weight": main["model.embed_tokens.weight"].clone(),
            **block_to_deepseek(take, f"{ours}.block", hf, cfg, is_moe_layer(cfg, cfg.num_layers + d))}


def deepseek_notes(cfg: Any) -> list[str]:
    """The export report's line on the MTP modules: in the folder, not computed by the class it names."""
    if not cfg.mtp_num_modules:
        return []
    last = cfg.num_layers + cfg.mtp_num_modules - 1
    return [f"{cfg.mtp_num_modules} multi-token prediction module(s) written as model.layers.{cfg.num_layers}"
            f"{'' if last == cfg.num_layers else f'..{last}'} (DeepSeek-V3's layout, read back by convert_from_hf); "
            "DeepseekV3ForCausalLM skips them on load and computes the main model alone"]
