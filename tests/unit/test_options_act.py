"""Options that cannot act in the configured model are refused by one rule (megatron/config/needs.py): the cases
users met, then the rule itself over every key of its table, each both refused and accepted."""

from __future__ import annotations

import re
import typing

import pytest

from megatron.config import ConfigError, NeoXArgs, load_config
from megatron.config.needs import NEEDS

MOE = ["--moe_num_experts", "4", "--moe_top_k", "2", "--moe_router_type", "topk"]
LORES = [*MOE, "--lore_num_experts", "4", "--lore_rank", "2"]
MLA = ["--pos_emb", "rotary", "--kv_lora_rank", "16", "--qk_nope_head_dim", "8", "--qk_rope_head_dim", "4",
       "--v_head_dim", "8"]


@pytest.mark.parametrize(("overrides", "message"), [
    (["--moe_router_enable_expert_bias", "true"],
     r"command line: moe_router_enable_expert_bias: True cannot act in this model: it needs an MoE model"),
    (["--moe_router_score_function", "sigmoid"], r"moe_router_score_function: 'sigmoid' cannot act .*an MoE model"),
    ([*MOE, "--lore_router_enable_bias", "true"], r"lore_router_enable_bias: True cannot act .*needs LoREs"),
    ([*MOE, "--lore_loss_coeff", "0.01"], r"lore_loss_coeff: 0\.01 cannot act .*needs LoREs"),
    ([*MOE, "--lore_lbl_scope", "global_batch"], r"lore_lbl_scope: 'global_batch' cannot act .*needs LoREs"),
    ([*LORES, "--lore_mode", "router_free", "--lore_router_enable_bias", "true"],
     r"lore_router_enable_bias: True cannot act .*needs a LoRE router \(.*router_free has none\)"),
    ([*MOE, "--moe_router_bias_update_rate", "0.01"],
     r"moe_router_bias_update_rate: 0\.01 cannot act .*needs moe_router_enable_expert_bias: true"),
    (["--moe_num_experts", "4", "--moe_loss_coeff", "0.1"],  # NeoX's default router: Sinkhorn
     r"moe_loss_coeff: 0\.1 cannot act .*needs moe_router_type: topk"),
    ([*MOE, "--moe_router_score_function", "sigmoid", "--moe_renormalize_weights", "true"],
     r"moe_renormalize_weights: True cannot act .*sigmoid gates are always normalised"),
    (["--rotary_pct", "0.5"], r"rotary_pct: 0\.5 cannot act .*needs pos_emb: rotary"),
    (["--remix_num_experts", "8"], r"remix_num_experts: 8 cannot act .*needs model_type: dit"),
])
def test_the_cases_users_met_are_one_line_naming_the_option_and_its_need(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config([], overrides)


@pytest.mark.parametrize("key", ["moe_router_bias_update_rate", "lore_router_bias_update_rate"])
def test_bias_update_rates_are_bounded(key):
    enable = "--moe_router_enable_expert_bias" if key.startswith("moe") else "--lore_router_enable_bias"
    with pytest.raises(ConfigError, match=rf"command line: {key}: expected at most 0\.1 .*got 50\.0"):
        load_config([], [*LORES, enable, "true", f"--{key}", "50"])
    assert getattr(load_config([], [*LORES, enable, "true", f"--{key}", "0.1"]), key) == 0.1


def test_a_key_at_its_default_asks_for_nothing():
    args = load_config(["configs/tiny.yml"], ["--moe_loss_coeff", "0.01", "--lore_mode", "entangled"])
    assert not args.is_moe  # moe_router_type: topk in tiny.yml, for runs that add experts, is accepted too


def test_a_resolved_dense_config_reloads(tmp_path):
    """A checkpoint's config.yml holds derived values (moe_ffn_hidden_size = intermediate_size): not a request."""
    saved = tmp_path / "config.yml"
    saved.write_text(load_config(["configs/tiny.yml"]).to_yaml())
    assert load_config([str(saved)]).moe_ffn_hidden_size == 512


# For each need of the table: overrides under which it fails (every need before it holding), and under which it
# holds, so each key is seen both refused and accepted.
SETTINGS = {
    "model_type: dit": ([], ["--model_type", "dit"]),
    "an MoE model (moe_num_experts > 1)": ([], MOE),
    "moe_token_dropping: true": (MOE, [*MOE, "--moe_token_dropping", "true"]),
    "expert parallelism (moe_expert_parallel_size > 1)": (MOE, [*MOE, "--moe_expert_parallel_size", "2"]),
    "moe_router_type: topk (Sinkhorn balances by itself, with no balancing loss, and scores by softmax)":
        (["--moe_num_experts", "4", "--moe_top_k", "2"], MOE),
    "moe_router_score_function: softmax (sigmoid gates are always normalised over the chosen k)":
        ([*MOE, "--moe_router_score_function", "sigmoid"], MOE),
    "moe_router_type: topk (group-limited choice is the top-k router's; Sinkhorn chooses by its own balancing)":
        (["--moe_num_experts", "4", "--moe_top_k", "2"], MOE),
    "moe_router_num_groups > 1 (the groups a token keeps are chosen among them)":
        (MOE, [*MOE, "--moe_router_num_groups", "2"]),
    "moe_router_enable_expert_bias: true": (MOE, [*MOE, "--moe_router_enable_expert_bias", "true"]),
    "LoREs (lore_num_experts > 0)": (MOE, LORES),
    "a LoRE router (lore_mode entangled or standalone; router_free has none)":
        ([*LORES, "--lore_mode", "router_free"], LORES),
    "lore_router_enable_bias: true": (LORES, [*LORES, "--lore_router_enable_bias", "true"]),
    "lsh_compression: true": (MOE, [*MOE, "--lsh_compression", "true"]),
    "pos_emb: rotary": ([], ["--pos_emb", "rotary"]),
    "activation: clamped_swiglu": ([], ["--activation", "clamped_swiglu"]),
    "sliding_window_width (the window of the pattern's sliding layers)": ([], ["--sliding_window_width", "4"]),
    "attention_impl: sdpa (flash-attn's kernel has no sink logit)": (["--attention_impl", "flash"], []),
    "multi-head latent attention (kv_lora_rank set)": ([], [*MLA]),
    "Remix-DiT (remix_num_basis > 0)": (["--model_type", "dit"], ["--model_type", "dit", "--remix_num_basis", "2"]),
    "straggler_factor > 0 (0 switches the watch off)": (["--straggler_factor", "0"], []),
    "model_type: gpt (lm-eval evaluates language models)": (["--model_type", "dit"], []),
    "eval_tasks_interval or eval_interval > 0 (when to run the tasks)": (["--eval_interval", "0"], []),
    "eval_tasks (lm-eval task names)": ([], ["--eval_tasks", "[x]"]),
    "multi-token prediction (mtp_num_modules > 0)": ([], ["--mtp_num_modules", "1"]),
}
# a valid value other than the default, where the type alone does not give one
OTHER_VALUES = {"lsh_layers": "[0]", "rope_scaling": "{factor: 8.0}", "image_path": "x", "image_labels_path": "x",
                "sliding_window_pattern": "[sliding, full]",
                "remix_init_from": "x", "lsh_num_hashes": "3", "image_size": "8", "patch_size": "4",
                "beta_start": "0.001", "beta_end": "0.03", "remix_num_experts": "8", "moe_top_k": "2",
                "moe_router_num_groups": "2", "moe_router_group_top_k": "2",
                "lore_rank": "3", "lore_top_k": "2", "diffusion_steps": "100", "moe_first_layer": "1",
                "eval_tasks": "[x]", "eval_tasks_include_path": "[x]"}
# what a key needs beside its table entry to be accepted
ACCEPTED_WITH = {"image_dataset": ["--image_path", "x", "--image_labels_path", "x"],
                 "lore_num_experts": ["--lore_rank", "2"]}


def other_value(key: str) -> str:
    """A valid command-line value for `key` that differs from its default."""
    if key in OTHER_VALUES:
        return OTHER_VALUES[key]
    field = NeoXArgs.model_fields[key]
    kind, default = typing.get_args(field.annotation) or (field.annotation,), field.default
    if kind[0] is bool:
        return str(not default).lower()
    if typing.get_origin(field.annotation) is typing.Literal:
        return next(str(choice) for choice in kind if choice != default)
    if int in kind:
        return str((default or 0) + 2)
    if float in kind:
        return str(default / 2 if default else 0.05)
    raise AssertionError(f"{key}: give the test a value in OTHER_VALUES")


CASES = [(needs.what, key) for needs in NEEDS for key in needs.keys
         if key not in ("moe_expert_parallel_size", "moe_top_k")]  # both held to moe_num_experts before the rule


def test_the_table_names_real_keys_and_every_need_has_settings():
    assert {needs.what for needs in NEEDS} == set(SETTINGS)
    assert all(key in NeoXArgs.model_fields for needs in NEEDS for key in needs.keys)
    assert len({key for _, key in CASES}) > 60  # every MoE, LoRE, LSH, DiT and Remix key


@pytest.mark.parametrize(("what", "key"), CASES, ids=[f"{key} needs {what.split(' (')[0]}" for what, key in CASES])
def test_every_key_of_the_rule_is_refused_where_it_cannot_act(what, key):
    fails, _ = SETTINGS[what]
    if key == "lore_top_k":  # a top-2 of LoREs needs two of them, whatever else is missing
        fails = [*fails, "--lore_num_experts", "4", "--lore_rank", "2"] if "LoRE router" in what else fails
    with pytest.raises(ConfigError, match=rf"{key}: .* cannot act in this model: it needs {re.escape(what)}"):
        load_config([], [*fails, f"--{key}", other_value(key)])


@pytest.mark.parametrize("key", sorted({key for _, key in CASES}))
def test_every_key_of_the_rule_is_accepted_where_it_can_act(key):
    """Under the settings of the last need that names it (each need's settings satisfy the needs before it)."""
    _, holds = SETTINGS[[needs.what for needs in NEEDS if key in needs.keys][-1]]
    ranks = 2 if "--moe_expert_parallel_size" in holds else 1  # an EP group of 2 needs 2 ranks
    args = load_config([], [*holds, *ACCEPTED_WITH.get(key, []), f"--{key}", other_value(key)],
                       data_parallel_size=ranks)
    assert getattr(args, key) != NeoXArgs.model_fields[key].default
