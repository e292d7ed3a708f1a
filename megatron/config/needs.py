"""Options that act only in some models: one rule refuses a setting the configured model cannot use.

A key set away from its default, in a model where it cannot act (an expert bias on a dense model, a LoRE loss
without LoREs, a LoRE bias on the router-free ablation that has no LoRE router), would train with exit 0 and
no word, and the user would believe the run used it. Each entry of `NEEDS` says which keys need what; the
check walks the table in order, so the most basic missing piece is the one named (an MoE model before a
top-k router before LoREs). A key left at its default, or set to it, is never refused: it asks for nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from megatron.config.schema import DiffusionArgs, MoEArgs, NeoXArgs


@dataclass(frozen=True)
class Needs:
    keys: tuple[str, ...]
    holds: Callable[[NeoXArgs], bool]
    what: str  # what the keys need, as the error line says it


# moe_router_type picks the router MoE layers get; it asks for nothing by itself (its options below are checked),
# so a base config may set it for runs that add experts by an override (configs/tiny.yml does)
MOE_KEYS = tuple(k for k in MoEArgs.model_fields if k not in ("moe_num_experts", "moe_router_type"))
LORE_KEYS = tuple(k for k in MoEArgs.model_fields if k.startswith("lore_") and k != "lore_num_experts")
LORE_ROUTER_KEYS = ("lore_top_k", "lore_loss_coeff", "lore_renormalize_weights", "lore_router_enable_bias",
                    "lore_router_bias_update_rate", "lore_lbl_scope")
CAPACITY_KEYS = ("moe_train_capacity_factor", "moe_eval_capacity_factor", "moe_min_capacity", "moe_token_drop_policy")
LSH_KEYS = tuple(k for k in MoEArgs.model_fields if k.startswith("lsh_") and k != "lsh_compression")
REMIX_KEYS = tuple(k for k in DiffusionArgs.model_fields if k.startswith("remix_") and k != "remix_num_basis")
MLA_KEYS = ("q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")  # the latent's head dims
EVAL_TASKS_KEYS = ("eval_tasks_interval", "eval_tasks_limit", "eval_tasks_num_fewshot", "eval_tasks_include_path")

NEEDS: tuple[Needs, ...] = (
    Needs(tuple(DiffusionArgs.model_fields), lambda a: a.model_type == "dit", "model_type: dit"),
    Needs(MOE_KEYS, lambda a: a.is_moe, "an MoE model (moe_num_experts > 1)"),
    Needs(CAPACITY_KEYS, lambda a: a.moe_token_dropping, "moe_token_dropping: true"),
    Needs(("moe_receive_warning_factor",), lambda a: a.moe_expert_parallel_size > 1,
          "expert parallelism (moe_expert_parallel_size > 1)"),
    Needs(("moe_router_score_function", "moe_router_enable_expert_bias", "moe_router_bias_update_rate",
           "moe_lbl_scope", "moe_loss_coeff", "moe_lbl_in_fp32"), lambda a: a.moe_router_type == "topk",
          "moe_router_type: topk (Sinkhorn balances by itself, with no balancing loss, and scores by softmax)"),
    Needs(("moe_router_num_groups",), lambda a: a.moe_router_type == "topk",
          "moe_router_type: topk (group-limited choice is the top-k router's; Sinkhorn chooses by its own balancing)"),
    Needs(("moe_router_group_top_k",), lambda a: a.moe_router_num_groups > 1,
          "moe_router_num_groups > 1 (the groups a token keeps are chosen among them)"),
    Needs(("moe_renormalize_weights",), lambda a: a.moe_router_score_function == "softmax",
          "moe_router_score_function: softmax (sigmoid gates are always normalised over the chosen k)"),
    Needs(("moe_router_bias_update_rate",), lambda a: a.moe_router_enable_expert_bias,
          "moe_router_enable_expert_bias: true"),
    Needs(LORE_KEYS, lambda a: a.lore_num_experts > 0, "LoREs (lore_num_experts > 0)"),
    Needs(LORE_ROUTER_KEYS, lambda a: a.lore_mode != "router_free",
          "a LoRE router (lore_mode entangled or standalone; router_free has none)"),
    Needs(("lore_router_bias_update_rate",), lambda a: a.lore_router_enable_bias, "lore_router_enable_bias: true"),
    Needs(LSH_KEYS, lambda a: a.lsh_compression, "lsh_compression: true"),
    Needs(("rotary_pct", "rotary_emb_base", "rope_scaling"), lambda a: a.pos_emb == "rotary", "pos_emb: rotary"),
    Needs(("swiglu_alpha", "swiglu_limit"), lambda a: a.activation == "clamped_swiglu", "activation: clamped_swiglu"),
    Needs(("sliding_window_pattern",), lambda a: a.sliding_window_width is not None,
          "sliding_window_width (the window of the pattern's sliding layers)"),
    Needs(("attention_sinks",), lambda a: a.attention_impl == "sdpa",
          "attention_impl: sdpa (flash-attn's kernel has no sink logit)"),
    Needs(MLA_KEYS, lambda a: a.kv_lora_rank is not None, "multi-head latent attention (kv_lora_rank set)"),
    Needs(REMIX_KEYS, lambda a: a.remix_num_basis > 0, "Remix-DiT (remix_num_basis > 0)"),
    Needs(("eval_tasks",), lambda a: a.model_type == "gpt", "model_type: gpt (lm-eval evaluates language models)"),
    Needs(("eval_tasks",), lambda a: bool(a.eval_tasks_interval or a.eval_interval),
          "eval_tasks_interval or eval_interval > 0 (when to run the tasks)"),
    Needs(EVAL_TASKS_KEYS, lambda a: bool(a.eval_tasks), "eval_tasks (lm-eval task names)"),
    Needs(("mtp_loss_coeff",), lambda a: a.mtp_num_modules > 0, "multi-token prediction (mtp_num_modules > 0)"),
    Needs(("straggler_window",), lambda a: a.straggler_factor > 0, "straggler_factor > 0 (0 switches the watch off)"),
)

# Keys whose default is derived from others when unset: the derived value asks for nothing either (a resolved
# config, as a checkpoint stores it, holds it).
DERIVED_DEFAULTS: dict[str, Callable[[NeoXArgs], Any]] = {
    "moe_ffn_hidden_size": lambda a: a.intermediate_size or 4 * a.hidden_size,
}


def asks_for_something(args: NeoXArgs, key: str) -> bool:
    value = getattr(args, key)
    if value == NeoXArgs.model_fields[key].default:
        return False
    return key not in DERIVED_DEFAULTS or value != DERIVED_DEFAULTS[key](args)


def options_that_cannot_act(args: NeoXArgs) -> list[tuple[str, str]]:
    """(key, what it needs) for each key set away from its default in a model where it cannot act, in table
    order."""
    found = []
    for needs in NEEDS:
        if not needs.holds(args):
            found += [(key, needs.what) for key in needs.keys
                      if asks_for_something(args, key) and key not in dict(found)]
    return found
