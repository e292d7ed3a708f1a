"""The model families users start from, written the way they are described: the published parameter totals of
Llama-3-8B and Mixtral-8x7B, DeepSeek-V3, Kimi-K2, Moonlight and gpt-oss against transformers' own models of their
published configs (built on the meta device), and the tiny Llama- and Mixtral-shaped configs training on the bundled
corpus."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import count_params  # noqa: E402

import train  # noqa: E402


@pytest.mark.parametrize("config, total, active", [
    ("families/llama3_8b.yml", 8_030_261_248, 8_030_261_248),  # Meta's model card
    ("families/mixtral_8x7b.yml", 46_702_792_704, 12_879_925_248),  # Mistral AI: 46.7B total, 12.9B active
])
def test_published_totals(config, total, active, capsys):
    count_params.main([str(REPO / "configs" / config)])
    printed = capsys.readouterr().out
    assert any(line.split()[:2] == ["total", f"{total:,}"] for line in printed.splitlines()), printed
    assert any(line.split()[:2] == ["active", f"{active:,}"] for line in printed.splitlines()), printed


# The published config.json values of each family (the keys transformers' configs read for the shapes), and what
# the family's YAML must count: transformers' model built from these values on the meta device is the reference.
PUBLISHED_HF = {
    "deepseek_v3": ("DeepseekV3", dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
        num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256,
        routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128,
        qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3,
        norm_topk_prob=True, rms_norm_eps=1e-6, max_position_embeddings=163840, tie_word_embeddings=False,
        attention_bias=False)),
    "kimi_k2": ("DeepseekV3", dict(
        vocab_size=163840, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
        num_attention_heads=64, num_key_value_heads=64, n_shared_experts=1, n_routed_experts=384,
        routed_scaling_factor=2.827, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128,
        qk_nope_head_dim=128, n_group=1, topk_group=1, num_experts_per_tok=8, first_k_dense_replace=1,
        norm_topk_prob=True, rms_norm_eps=1e-6, max_position_embeddings=131072, tie_word_embeddings=False,
        attention_bias=False)),
    "moonlight_16b_a3b": ("DeepseekV3", dict(
        vocab_size=163840, hidden_size=2048, intermediate_size=11264, moe_intermediate_size=1408, num_hidden_layers=27,
        num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2, n_routed_experts=64,
        routed_scaling_factor=2.446, kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64, v_head_dim=128,
        qk_nope_head_dim=128, n_group=1, topk_group=1, num_experts_per_tok=6, first_k_dense_replace=1,
        norm_topk_prob=True, rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=False,
        attention_bias=False)),
    "gpt_oss_20b": ("GptOss", dict(
        num_hidden_layers=24, num_local_experts=32, vocab_size=201088, hidden_size=2880, intermediate_size=2880,
        head_dim=64, num_attention_heads=64, num_key_value_heads=8, sliding_window=128, num_experts_per_tok=4,
        attention_bias=True, rms_norm_eps=1e-5, max_position_embeddings=131072, tie_word_embeddings=False)),
    "gpt_oss_120b": ("GptOss", dict(
        num_hidden_layers=36, num_local_experts=128, vocab_size=201088, hidden_size=2880, intermediate_size=2880,
        head_dim=64, num_attention_heads=64, num_key_value_heads=8, sliding_window=128, num_experts_per_tok=4,
        attention_bias=True, rms_norm_eps=1e-5, max_position_embeddings=131072, tie_word_embeddings=False)),
}
# transformers' own totals for those configs (DeepSeek-V3's without its MTP module, which transformers leaves out)
HF_TOTALS = {"deepseek_v3": 671_026_404_352, "kimi_k2": 1_026_408_209_408, "moonlight_16b_a3b": 15_960_108_544,
             "gpt_oss_20b": 20_914_757_184, "gpt_oss_120b": 116_829_156_672}


def transformers_counts(name: str) -> tuple[int, float, int]:
    """(total, active per token, input embedding) of transformers' model of the published config, built on the meta
    device: routed experts (`mlp.experts.*`) at num_experts_per_tok / experts, every other parameter whole."""
    import transformers

    family, values = PUBLISHED_HF[name]
    config = getattr(transformers, f"{family}Config")(**values)
    with torch.device("meta"):
        model = getattr(transformers, f"{family}ForCausalLM")(config)
    share = values["num_experts_per_tok"] / values.get("n_routed_experts", values.get("num_local_experts"))
    total = active = 0
    for param_name, p in model.named_parameters():
        total += p.numel()
        active += p.numel() * (share if ".mlp.experts." in param_name else 1.0)
    return total, active, model.get_input_embeddings().weight.numel()


@pytest.mark.parametrize("name", PUBLISHED_HF)
def test_family_counts_equal_transformers_models_of_the_published_configs(name, capsys):
    """count_params on configs/families/NAME.yml: its total is transformers' count of the same published config
    (and the number recorded here), its active count transformers' model read with the routed share."""
    count_params.main([str(REPO / "configs" / "families" / f"{name}.yml"), "--json"])
    ours = json.loads(capsys.readouterr().out)
    total, active, input_embedding = transformers_counts(name)
    assert ours["total"] == total == HF_TOTALS[name]
    assert ours["active"] == round(active)
    assert ours["active_without_input_embeddings"] == round(active) - input_embedding
    assert (ours["mtp"] > 0) == (name == "deepseek_v3")  # num_nextn_predict_layers: 1 there, 0 in the others


def test_deepseek_v3_mtp_module_is_one_more_moe_layer_and_its_projection(capsys):
    """DeepSeek-V3's MTP module: one decoder layer as its MoE layers (transformers' layer 3, every MoE layer alike),
    the 2D -> D projection and three RMSNorms (enorm, hnorm, shared_head.norm); embedding and head are shared."""
    import transformers

    values = dict(PUBLISHED_HF["deepseek_v3"][1], num_hidden_layers=4)
    with torch.device("meta"):
        layer = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**values)).model.layers[3]
    count_params.main([str(REPO / "configs" / "families" / "deepseek_v3.yml"), "--json"])
    d = values["hidden_size"]
    assert json.loads(capsys.readouterr().out)["mtp"] == sum(p.numel() for p in layer.parameters()) + 2 * d * d + 3 * d


@pytest.mark.parametrize("config", ["tiny_llama.yml", "tiny_mixtral.yml", "tiny_qwen3_moe.yml"])
def test_tiny_family_configs_train(config, tmp_path, data_prefix):
    run = str(tmp_path / "run")
    result = train.run([str(REPO / "configs" / config), "--train_iters", "3", "--train_micro_batch_size_per_gpu", "2",
                        "--seq_length", "32", "--eval_interval", "0", "--prepare_data", "null",
                        "--data_path", data_prefix, "--save", run, "--load", run, "--log_dir", f"{run}/logs",
                        "--tensorboard_dir", "null", "--checkpoint_factor", "3"])
    assert result.final_step == 3 and all(math.isfinite(loss) for loss in result.losses)


def test_family_table_flags_are_one_line_errors(tmp_path):
    with pytest.raises(SystemExit, match="--markdown needs a file name"):
        count_params.main(["--markdown"])
    with pytest.raises(SystemExit, match="expected a JSON file written by --families --json-out"):
        count_params.main(["--markdown", str(tmp_path / "missing.json")])
    with pytest.raises(SystemExit, match="--json-out needs a file name"):
        count_params.main(["--families", "--json-out"])
