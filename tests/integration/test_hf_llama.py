"""tools/convert_from_hf.py on Llama-family folders built offline by transformers with random weights: the
converted model's logits equal LlamaForCausalLM's, and training continues from it."""

import math
import sys

import pytest
import torch
import yaml
from helpers.hf_models import REPO, save_random, saved_model, train_converted

sys.path.insert(0, str(REPO / "tools"))
import convert_from_hf  # noqa: E402
import convert_to_hf  # noqa: E402

import train  # noqa: E402
from megatron.model.rope import Llama3RopeScaling  # noqa: E402
from megatron.training.pretrained import load_pretrained  # noqa: E402

transformers = pytest.importorskip("transformers")
TOKENS = torch.randint(0, 8192, (2, 20), generator=torch.Generator().manual_seed(0))

LLAMA2 = {"num_key_value_heads": 4}  # multi-head attention, rope_theta 10000
LLAMA3 = {"num_key_value_heads": 2, "rope_theta": 500000.0}  # grouped-query attention, Llama-3's rope base
LLAMA32_TIED = {**LLAMA3, "tie_word_embeddings": True}  # Llama-3.2-1B ties the embeddings


def llama_folder(folder, **overrides):
    """A small LlamaForCausalLM with every parameter random (norms near 1), saved with the bundled tokenizer."""
    config = transformers.LlamaConfig(**{
        "vocab_size": 8256, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 48, "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        **overrides})
    torch.manual_seed(0)
    return save_random(transformers.LlamaForCausalLM(config), folder)


@pytest.mark.parametrize("overrides", [LLAMA2, LLAMA3, LLAMA32_TIED], ids=["llama2", "llama3_gqa", "llama32_tied"])
def test_llama_folder_converts_with_equal_logits(tmp_path, overrides):
    hf = llama_folder(tmp_path / "hf", **overrides)
    convert_from_hf.main([str(tmp_path / "hf"), str(tmp_path / "ours")])
    args, model, path = load_pretrained(tmp_path / "ours")
    assert path.name == "global_step0" and args.norm == "rmsnorm" and args.activation == "swiglu"
    assert args.num_kv_heads == overrides["num_key_value_heads"]
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS)[0], hf(TOKENS).logits, atol=1e-4, rtol=0)


LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}  # head_dim 8: one frequency kept, one blended, two scaled


def test_llama31_scaled_rope_converts_with_equal_logits(tmp_path):
    hf = llama_folder(tmp_path / "hf", rope_parameters={"rope_theta": 10000.0, **LLAMA31_ROPE}, **LLAMA2)
    convert_from_hf.main([str(tmp_path / "hf"), str(tmp_path / "ours")])
    args, model, _ = load_pretrained(tmp_path / "ours")
    assert args.rope_scaling.factor == 8.0 and args.rope_scaling.original_max_position_embeddings == 64
    plain = llama_folder(tmp_path / "plain", **LLAMA2)  # the same weights with the plain RoPE: other logits
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS)[0], hf(TOKENS).logits, atol=1e-4, rtol=0)
        assert (model(TOKENS)[0] - plain(TOKENS).logits).abs().max() > 1e-3


def test_llama3_scaling_blends_the_middle_band():
    """Closed form, wavelengths against original_max / low (64) and original_max / high (16): a short one kept, a
    long one divided by the factor, one between blended by (64 / wavelength - 1) / 3."""
    scaling = Llama3RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                original_max_position_embeddings=64)
    inv_freq = 2 * math.pi / torch.tensor([8.0, 32.0, 128.0])  # wavelengths 8, 32, 128
    blend = (64 / 32 - 1) / 3
    expected = torch.stack([inv_freq[0], (1 - blend) * inv_freq[1] / 8 + blend * inv_freq[1], inv_freq[2] / 8])
    torch.testing.assert_close(scaling.scale(inv_freq), expected)


# YaRN on a 16-token original context (head_dim 8: pair 0 kept, the others interpolated), as gpt-oss writes it
# (truncate false) and with DeepSeek's mscale pair (both act: cos and sin scaled by their ratio)
YARN_ROPES = {"gpt_oss_style": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False},
              "mscale_pair": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                              "mscale": 1.0, "mscale_all_dim": 0.5}}


@pytest.mark.parametrize("rope", YARN_ROPES.values(), ids=YARN_ROPES)
def test_yarn_scaled_rope_converts_with_equal_logits(tmp_path, rope):
    hf = llama_folder(tmp_path / "hf", rope_parameters={"rope_theta": 10000.0, **rope}, **LLAMA2)
    convert_from_hf.main([str(tmp_path / "hf"), str(tmp_path / "ours")])
    args, model, _ = load_pretrained(tmp_path / "ours")
    assert args.rope_scaling.type == "yarn" and args.rope_scaling.truncate == rope.get("truncate", True)
    plain = llama_folder(tmp_path / "plain", **LLAMA2)  # the same weights with the plain RoPE: other logits
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS)[0], hf(TOKENS).logits, atol=1e-4, rtol=0)
        assert (model(TOKENS)[0] - plain(TOKENS).logits).abs().max() > 1e-3


def test_a_rope_we_do_not_compute_is_refused_naming_the_field(tmp_path):
    llama_folder(tmp_path / "hf", rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 500000.0},
                 **LLAMA3)
    with pytest.raises(SystemExit, match=r"rope_parameters\.rope_type 'linear': only the default RoPE"):
        convert_from_hf.main([str(tmp_path / "hf"), str(tmp_path / "ours")])
    assert not (tmp_path / "ours" / "latest").exists()


def test_mistral_sliding_window_converts_with_equal_logits(tmp_path):
    """Mistral's window counts the query itself: window 6 is our sliding_window_width 5. The 20-token input is
    longer than the window, so a window off by one shows in the logits."""
    config = transformers.MistralConfig(
        vocab_size=8256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, max_position_embeddings=64, rms_norm_eps=1e-6, sliding_window=6)
    torch.manual_seed(0)
    hf = save_random(transformers.MistralForCausalLM(config), tmp_path / "hf")
    convert_from_hf.main([str(tmp_path / "hf"), str(tmp_path / "ours")])
    args, model, _ = load_pretrained(tmp_path / "ours")
    assert args.sliding_window_width == 5
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS)[0], hf(TOKENS).logits, atol=1e-4, rtol=0)


def test_training_continues_from_a_converted_llama(tmp_path, data_prefix):
    llama_folder(tmp_path / "hf", **LLAMA3)
    convert_from_hf.main([str(tmp_path / "hf"), str(tmp_path / "ours")])
    result = train_converted(tmp_path, data_prefix)
    assert result.final_step == 3 and all(torch.isfinite(torch.tensor(result.losses)))


LLAMA_SHAPED = {"norm": "rmsnorm", "activation": "swiglu", "pos_emb": "rotary", "rotary_pct": 1.0,
                "use_bias_in_attn_linear": False, "use_bias_in_mlp": False, "use_bias_in_norms": False,
                "intermediate_size": 96, "mlp_multiple_of": 1}


def assert_native_export(tmp_path, save, model, class_name: str):
    """SAVE exported without remote code: transformers' own `class_name` with our logits (1e-5), and converted
    back, our parameters bit for bit. Returns the transformers model."""
    report = convert_to_hf.main([str(save), str(tmp_path / "hf")])
    assert report["format"] == "native" and report["class"] == class_name and report["because"] == []
    assert not list((tmp_path / "hf").glob("*.py"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == class_name
    tokens = TOKENS % model.cfg.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens)[0], atol=1e-5, rtol=0)
    convert_from_hf.main([str(tmp_path / "hf"), str(tmp_path / "back")])
    _, back, _ = load_pretrained(tmp_path / "back")
    before, after = model.state_dict(), back.state_dict()
    assert sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)
    return hf


@pytest.mark.parametrize("overrides", [{"num_kv_heads": 2, "no_weight_tying": True}, {}], ids=["gqa_untied", "tied"])
def test_a_llama_shaped_model_exports_as_plain_llama(tmp_path, data_prefix, overrides):
    """No remote code: transformers' own LlamaForCausalLM, with our logits and our greedy continuation; and
    converting it back gives our parameters bit for bit."""
    save, model = saved_model(tmp_path / "run", data_prefix, **LLAMA_SHAPED, **overrides)
    hf = assert_native_export(tmp_path, save, model, "LlamaForCausalLM")
    with torch.no_grad():
        ours_seq = prompt = (TOKENS % model.cfg.vocab_size)[:1, :8]
        for _ in range(6):
            ours_seq = torch.cat([ours_seq, model(ours_seq)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
        assert hf.generate(prompt, max_new_tokens=6, do_sample=False).tolist() == ours_seq.tolist()


@pytest.mark.parametrize("overrides, class_name", [
    ({"sliding_window_width": 5, "num_kv_heads": 2}, "MistralForCausalLM"),
    ({"rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 16}}, "LlamaForCausalLM"),
    ({"qk_norm": True, "no_weight_tying": True}, "Qwen3ForCausalLM"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "truncate": False,
                       "mscale": 1.0, "mscale_all_dim": 0.5}}, "LlamaForCausalLM"),
    ({"qk_norm": True, "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}},
     "Qwen3ForCausalLM"),
], ids=["mistral_window", "llama31_rope", "qwen3_dense", "llama_yarn", "qwen3_yarn"])
def test_dense_variants_export_natively(tmp_path, data_prefix, overrides, class_name):
    save, model = saved_model(tmp_path / "run", data_prefix, **LLAMA_SHAPED, **overrides)
    assert_native_export(tmp_path, save, model, class_name)


def mixtral_folder(folder, **overrides):
    """A small MixtralForCausalLM (4 experts, top-2, GQA), every parameter random, with the bundled tokenizer."""
    config = transformers.MixtralConfig(**{
        "vocab_size": 8256, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 24, "num_local_experts": 4, "num_experts_per_tok": 2,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, **overrides})
    torch.manual_seed(0)
    return save_random(transformers.MixtralForCausalLM(config), folder)


def test_mixtral_folder_converts_with_equal_logits(tmp_path):
    hf = mixtral_folder(tmp_path / "hf")
    convert_from_hf.main([str(tmp_path / "hf"), str(tmp_path / "ours")])
    args, model, _ = load_pretrained(tmp_path / "ours")
    assert (args.moe_num_experts, args.moe_top_k, args.moe_ffn_hidden_size) == (4, 2, 24)
    assert args.moe_renormalize_weights and args.moe_router_type == "topk"
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS)[0], hf(TOKENS).logits, atol=1e-4, rtol=0)


def test_a_mixtral_shaped_moe_exports_as_plain_mixtral(tmp_path, data_prefix):
    moe = {"moe_num_experts": 4, "moe_top_k": 2, "moe_ffn_hidden_size": 16, "moe_router_type": "topk",
           "moe_renormalize_weights": True, "moe_expert_interval": 1, "moe_first_layer": 0, "num_kv_heads": 2,
           "no_weight_tying": True}
    save, model = saved_model(tmp_path / "run", data_prefix, **LLAMA_SHAPED, **moe)
    assert_native_export(tmp_path, save, model, "MixtralForCausalLM")


def test_structmoe_stays_remote_code(tmp_path, data_prefix):
    struct = {"moe_num_experts": 4, "moe_top_k": 1, "moe_router_type": "topk", "moe_renormalize_weights": True,
              "moe_expert_interval": 1, "moe_first_layer": 0, "lore_num_experts": 4, "lore_rank": 2}
    rope = {"rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 16}}  # carried into the remote code's config
    save, model = saved_model(tmp_path / "run", data_prefix, **LLAMA_SHAPED, **struct, **rope)
    report = convert_to_hf.main([str(save), str(tmp_path / "hf")])
    assert report["format"] == "remote_code" and report["class"] == "MegatronGPTForCausalLM"
    assert "Llama family: moe.lore: LoREConfig(...) (expected None)" in report["because"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    tokens = TOKENS % model.cfg.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens)[0], atol=1e-5, rtol=0)


def qwen3_folder(folder, moe: bool, **overrides):
    """A small Qwen3ForCausalLM / Qwen3MoeForCausalLM (QK-norm, GQA), every parameter random."""
    common = {"vocab_size": 8256, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 48, "max_position_embeddings": 64,
              "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
    if moe:
        config = transformers.Qwen3MoeConfig(**{**common, "num_experts": 8, "num_experts_per_tok": 2,
                                                "moe_intermediate_size": 16, **overrides})
        model = transformers.Qwen3MoeForCausalLM(config)
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**{**common, **overrides}))
    torch.manual_seed(0)
    return save_random(model, folder)


@pytest.mark.parametrize("moe, overrides", [
    (False, {}),
    (True, {"norm_topk_prob": False}),  # Qwen3-MoE's default: the chosen gates are not renormalised
    (True, {"norm_topk_prob": True, "decoder_sparse_step": 2}),  # MoE in layer 1 only, dense layer 0
], ids=["qwen3", "qwen3_moe", "qwen3_moe_every_2nd_renormalised"])
def test_qwen3_folders_convert_with_equal_logits(tmp_path, moe, overrides):
    hf = qwen3_folder(tmp_path / "hf", moe, **overrides)
    convert_from_hf.main([str(tmp_path / "hf"), str(tmp_path / "ours")])
    args, model, _ = load_pretrained(tmp_path / "ours")
    assert args.qk_norm and model.blocks[0].attention.q_norm is not None
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS)[0], hf(TOKENS).logits, atol=1e-4, rtol=0)


def test_a_qwen3_moe_shaped_model_exports_as_plain_qwen3_moe(tmp_path, data_prefix):
    moe = {"moe_num_experts": 8, "moe_top_k": 2, "moe_ffn_hidden_size": 16, "moe_router_type": "topk",
           "moe_renormalize_weights": False, "moe_expert_interval": 2, "moe_first_layer": 1, "num_kv_heads": 2,
           "qk_norm": True, "no_weight_tying": True}
    save, model = saved_model(tmp_path / "run", data_prefix, **LLAMA_SHAPED, **moe)
    assert_native_export(tmp_path, save, model, "Qwen3MoeForCausalLM")


@pytest.mark.parametrize("family", ["llama", "mixtral", "qwen3_moe"])
def test_each_family_round_trips_through_training(tmp_path, data_prefix, family):
    """Import -> two training steps -> export: transformers loads the trained model natively, with our logits."""
    build = {"llama": lambda f: llama_folder(f, **LLAMA3), "mixtral": mixtral_folder,
             "qwen3_moe": lambda f: qwen3_folder(f, True, decoder_sparse_step=2)}[family]
    build(tmp_path / "hf")
    convert_from_hf.main([str(tmp_path / "hf"), str(tmp_path / "ours")])
    run = {"data_path": data_prefix, "split": "90,10,0", "train_micro_batch_size_per_gpu": 2,
           "gradient_accumulation_steps": 1, "train_iters": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
           "eval_interval": 0, "log_interval": 1, "checkpoint_factor": 2, "log_dir": str(tmp_path / "logs")}
    (tmp_path / "run.yml").write_text(yaml.safe_dump(run))
    train.run([str(tmp_path / "ours/model.yml"), str(tmp_path / "run.yml"), "--load", str(tmp_path / "ours"),
               "--save", str(tmp_path / "trained"), "--seq_length", "16"])
    _, trained, path = load_pretrained(tmp_path / "trained")
    assert path.name == "global_step2"
    report = convert_to_hf.main([str(tmp_path / "trained"), str(tmp_path / "out")])
    class_name = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM",
                  "qwen3_moe": "Qwen3MoeForCausalLM"}[family]
    assert report["format"] == "native" and report["class"] == class_name and report["model_type"] == family
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(hf).__name__ == class_name
    with torch.no_grad():
        torch.testing.assert_close(hf(TOKENS).logits, trained(TOKENS)[0], atol=1e-5, rtol=0)
