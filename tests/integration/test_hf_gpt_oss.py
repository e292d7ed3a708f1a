"""gpt-oss in and out of Hugging Face (megatron/hf/gpt_oss.py): GptOssForCausalLM folders built offline by
transformers with random weights convert with transformers' logits; gpt-oss-shaped models of ours export as plain
GptOssForCausalLM folders (no remote code) with our logits and greedy continuation, and come back bit for bit;
what we cannot compute exactly (quantized experts, another RoPE, a window of 1) is refused in one line."""

import json
import sys

import pytest
import torch
import yaml
from helpers.hf_models import REPO, save_random, saved_model

sys.path.insert(0, str(REPO / "tools"))
import convert_from_hf  # noqa: E402
import convert_to_hf  # noqa: E402

import train  # noqa: E402
from megatron.training.pretrained import load_pretrained  # noqa: E402

transformers = pytest.importorskip("transformers")
TOKENS = torch.randint(0, 8192, (2, 20), generator=torch.Generator().manual_seed(0))
# gpt-oss's own RoPE: with head_dim 16 the ramp runs from pair 2.02 to 4.35 (truncated it would be 2 to 5, so
# truncate: false shows), pairs past it interpolated 32 times slower
YARN = {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0,
        "beta_slow": 1.0, "truncate": False, "rope_theta": 150000.0}


def gpt_oss_folder(folder, **overrides):
    """A small GptOssForCausalLM (4 experts, top-2, GQA, 4 heads of 16 over a 32-wide residual stream, a 6-token
    window on the sliding layers, YaRN without truncation as gpt-oss's own), every parameter random (norms near 1,
    sinks, router and expert biases too), with the bundled tokenizer. The clamp (0.5) is inside the values' range,
    so the clamped SwiGLU clamps."""
    config = transformers.GptOssConfig(**{
        "vocab_size": 8256, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 16, "num_local_experts": 4,
        "num_experts_per_tok": 2, "max_position_embeddings": 64, "sliding_window": 6, "rms_norm_eps": 1e-6,
        "swiglu_alpha": 1.5, "swiglu_limit": 0.5, "rope_parameters": YARN, "tie_word_embeddings": False,
        **overrides})
    torch.manual_seed(0)
    return save_random(transformers.GptOssForCausalLM(config), folder)


def ours(model, tokens_BS):
    with torch.no_grad():
        return model(tokens_BS)[0]


@pytest.mark.parametrize("overrides", [
    {},  # gpt-oss's layout: sliding, full, ...
    {"num_hidden_layers": 3, "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
     "attention_bias": False, "tie_word_embeddings": True, "rope_parameters": {"rope_type": "default",
                                                                               "rope_theta": 10000.0}},
], ids=["gpt_oss", "pattern3_nobias_tied_plain_rope"])
def test_gpt_oss_folder_converts_with_equal_logits(tmp_path, overrides):
    hf = gpt_oss_folder(tmp_path / "hf", **overrides)
    convert_from_hf.main([str(tmp_path / "hf"), str(tmp_path / "ours")])
    args, model, _ = load_pretrained(tmp_path / "ours")
    assert (args.head_dim, args.sliding_window_width, args.activation) == (16, 5, "clamped_swiglu")
    assert args.sliding_window_pattern == (["sliding", "full"] if not overrides else ["sliding", "sliding", "full"])
    assert args.attention_sinks and args.moe_router_bias and args.moe_use_bias_in_experts
    torch.testing.assert_close(ours(model, TOKENS), hf(TOKENS).logits, atol=1e-4, rtol=0)


GPT_OSS_SHAPED = {
    "norm": "rmsnorm", "activation": "clamped_swiglu", "swiglu_alpha": 1.5, "swiglu_limit": 0.5, "pos_emb": "rotary",
    "head_dim": 16, "num_kv_heads": 2, "attention_sinks": True, "sliding_window_width": 5,
    "sliding_window_pattern": ["sliding", "full"], "use_bias_in_attn_linear": True, "use_bias_in_norms": False,
    "use_bias_in_mlp": False, "intermediate_size": 48, "mlp_multiple_of": 1, "no_weight_tying": True,
    "moe_num_experts": 4, "moe_top_k": 2, "moe_ffn_hidden_size": 16, "moe_router_type": "topk",
    "moe_renormalize_weights": True, "moe_router_bias": True, "moe_use_bias_in_experts": True,
    "rotary_emb_base": 150000,
    "rope_scaling": {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096, "truncate": False},
}


def greedy(model, prompt_BS: torch.Tensor, steps: int) -> torch.Tensor:
    """The argmax continuation, recomputing the whole prefix each step with our model."""
    seq = prompt_BS
    for _ in range(steps):
        seq = torch.cat([seq, ours(model, seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


def test_a_gpt_oss_shaped_model_exports_as_plain_gpt_oss(tmp_path, data_prefix):
    """No remote code: transformers' own GptOssForCausalLM with our logits (1e-5) and our greedy continuation past
    the window (its cache keeps only the window on sliding layers); converted back, our parameters bit for bit."""
    save, model = saved_model(tmp_path / "run", data_prefix, **GPT_OSS_SHAPED)
    report = convert_to_hf.main([str(save), str(tmp_path / "hf")])
    assert report["format"] == "native" and report["class"] == "GptOssForCausalLM" and report["because"] == []
    assert not list((tmp_path / "hf").glob("*.py"))
    config = json.loads((tmp_path / "hf/config.json").read_text())
    assert config["layer_types"] == ["sliding_attention", "full_attention"] and config["sliding_window"] == 6
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "GptOssForCausalLM"
    tokens = TOKENS % model.cfg.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(model, tokens), atol=1e-5, rtol=0)
        prompt = tokens[:1, :8]
        assert hf.generate(prompt, max_new_tokens=6, do_sample=False).tolist() == greedy(model, prompt, 6).tolist()
    convert_from_hf.main([str(tmp_path / "hf"), str(tmp_path / "back")])
    _, back, _ = load_pretrained(tmp_path / "back")
    before, after = model.state_dict(), back.state_dict()
    assert sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("change, reason", [
    ({"moe_router_score_function": "sigmoid", "moe_renormalize_weights": False},
     "gpt-oss: moe.score_function: 'sigmoid' (expected 'softmax')"),
    ({"moe_use_bias_in_experts": False}, "gpt-oss: moe.expert_biases: False (expected True)"),
    ({"moe_expert_interval": 2}, "gpt-oss: moe.expert_interval: 2 (expected 1)"),
], ids=["sigmoid", "no_expert_biases", "dense_layers"])
def test_what_gpt_oss_does_not_compute_is_remote_code(tmp_path, data_prefix, change, reason):
    save, model = saved_model(tmp_path / "run", data_prefix, **{**GPT_OSS_SHAPED, **change})
    report = convert_to_hf.main([str(save), str(tmp_path / "hf")])
    assert report["format"] == "remote_code" and reason in report["because"], report["because"]


def test_import_train_export_round_trip(tmp_path, data_prefix):
    """Import -> two train.py steps on the bundled corpus -> export: transformers loads the trained model as
    GptOssForCausalLM, with our logits."""
    gpt_oss_folder(tmp_path / "hf")
    convert_from_hf.main([str(tmp_path / "hf"), str(tmp_path / "ours")])
    run = {"data_path": data_prefix, "split": "90,10,0", "train_micro_batch_size_per_gpu": 2,
           "gradient_accumulation_steps": 1, "train_iters": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
           "eval_interval": 0, "log_interval": 1, "checkpoint_factor": 2, "log_dir": str(tmp_path / "logs")}
    (tmp_path / "run.yml").write_text(yaml.safe_dump(run))
    train.run([str(tmp_path / "ours/model.yml"), str(tmp_path / "run.yml"), "--load", str(tmp_path / "ours"),
               "--save", str(tmp_path / "trained"), "--seq_length", "16"])
    _, converted, _ = load_pretrained(tmp_path / "ours")
    _, trained, path = load_pretrained(tmp_path / "trained")
    assert path.name == "global_step2"
    moved = trained.state_dict()["blocks.0.attention.sinks"] - converted.state_dict()["blocks.0.attention.sinks"]
    assert moved.abs().max() > 0  # trained, sinks included
    report = convert_to_hf.main([str(tmp_path / "trained"), str(tmp_path / "out")])
    assert report["format"] == "native" and report["class"] == "GptOssForCausalLM"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(TOKENS).logits, ours(trained, TOKENS), atol=1e-5, rtol=0)


def edit_config(folder, **fields):
    path = folder / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | fields))


def assert_refused(tmp_path, pattern: str):
    with pytest.raises(SystemExit, match=pattern) as refused:
        convert_from_hf.main([str(tmp_path / "hf"), str(tmp_path / "ours")])
    assert "\n" not in str(refused.value.code) and not (tmp_path / "ours").exists()


@pytest.mark.parametrize("fields, pattern", [
    ({"quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}},
     r"config\.json: quantization_config \(quant_method 'mxfp4'\): .*dequantize first"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
     r"rope_parameters\.rope_type 'linear': only gpt-oss's yarn"),
    ({"sliding_window": 1}, r"sliding_window 1 with sliding_attention layers: expected a window of 2 or more"),
    ({"rope_parameters": {**YARN, "attention_factor": 2.0}}, r"rope_parameters\.attention_factor 2\.0: not converted"),
], ids=["mxfp4_config", "linear_rope", "window_of_one", "attention_factor"])
def test_what_we_cannot_compute_is_refused_in_one_line(tmp_path, fields, pattern):
    gpt_oss_folder(tmp_path / "hf")
    edit_config(tmp_path / "hf", **fields)
    assert_refused(tmp_path, pattern)


def test_mxfp4_expert_tensors_are_refused_by_name(tmp_path):
    """The published layout's packed experts (`*_blocks`, `*_scales`), even where config.json does not announce
    them: named, never dropped or misread."""
    from safetensors.torch import load_file, save_file

    gpt_oss_folder(tmp_path / "hf")
    state = load_file(tmp_path / "hf/model.safetensors")
    for i in range(2):
        down = state.pop(f"model.layers.{i}.mlp.experts.down_proj")
        state[f"model.layers.{i}.mlp.experts.down_proj_blocks"] = torch.zeros(*down.shape[:2], 1, 16,
                                                                              dtype=torch.uint8)
        state[f"model.layers.{i}.mlp.experts.down_proj_scales"] = torch.zeros(*down.shape[:2], 1, dtype=torch.uint8)
    save_file(state, tmp_path / "hf/model.safetensors", metadata={"format": "pt"})
    assert_refused(tmp_path, r"model\.layers\.0\.mlp\.experts\.down_proj_blocks: MXFP4-quantized experts \(4 such "
                             r"tensors\); dequantize first")
