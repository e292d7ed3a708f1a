"""DeepSeek-V3 in and out of Hugging Face (megatron/hf/deepseek_v3.py): folders built offline by transformers with
random weights convert with transformers' logits (both expert layouts, with and without the query latent, YaRN,
interleaved rope rows, the loss-free bias choosing other experts), an MTP module in the folder computes what
transformers' MTP module computes, a DeepSeek-shaped model of ours exports as a plain DeepseekV3ForCausalLM with our
logits and greedy continuation and comes back bit for bit, through training too; what is not computed is one line.

Shape legend: B batch, S sequence, D hidden, V vocabulary.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers.hf_models import REPO, VOCAB_FILE, saved_model

from megatron.training.pretrained import load_pretrained

sys.path.insert(0, str(REPO / "tools"))
import convert_from_hf  # noqa: E402
import convert_to_hf  # noqa: E402

import train  # noqa: E402

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers.modeling_layers import MtpModel  # noqa: E402

TOKENS = torch.randint(0, 8192, (2, 40), generator=torch.Generator().manual_seed(0))  # past YaRN's 16 positions
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.8}
SMALL = {"vocab_size": 8256, "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16,
         "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4, "kv_lora_rank": 16,
         "q_lora_rank": 12, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 6, "n_routed_experts": 8,
         "num_experts_per_tok": 3, "n_group": 4, "topk_group": 2, "n_shared_experts": 1, "routed_scaling_factor": 2.5,
         "first_k_dense_replace": 1, "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_parameters": YARN,
         "tie_word_embeddings": False, "num_nextn_predict_layers": 1}


def randomise(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Every parameter random (norm weights near 1) and the routers' e_score_correction_bias too, large enough to
    change which experts are chosen, so no tensor maps by luck."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.1 * torch.randn(p.shape, generator=gen))
        for name, b in module.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=gen))


def mtp_tensors(model, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """An MTP module as DeepSeek-V3's checkpoints store it, at model.layers.{L}: a random MoE decoder layer, enorm,
    hnorm, eh_proj, shared_head.norm, and copies of the embedding and head."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RMSNorm

    cfg, L = model.config, model.config.num_hidden_layers
    layer = DeepseekV3DecoderLayer(cfg, layer_idx=L)
    layer.enorm, layer.hnorm = DeepseekV3RMSNorm(cfg.hidden_size), DeepseekV3RMSNorm(cfg.hidden_size)
    layer.eh_proj = torch.nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
    layer.shared_head = torch.nn.Module()
    layer.shared_head.norm = DeepseekV3RMSNorm(cfg.hidden_size)
    randomise(layer, gen)
    tensors = {f"model.layers.{L}.{name}": t.clone() for name, t in layer.state_dict().items()}
    return tensors | {f"model.layers.{L}.shared_head.head.weight": model.lm_head.weight.detach().clone(),
                      f"model.layers.{L}.embed_tokens.weight": model.model.embed_tokens.weight.detach().clone()}


def deepseek_folder(folder: Path, layout: str = "per_expert", mtp: bool = False, **overrides):
    """A small random DeepseekV3ForCausalLM saved with the bundled tokenizer: `per_expert` as save_pretrained writes
    it (DeepSeek's release layout), `fused` as transformers 5 holds it (experts.gate_up_proj); `mtp`: one MTP module
    appended at model.layers.{L}. Returns the model, eval mode."""
    config = transformers.DeepseekV3Config(**{**SMALL, **overrides})
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(1)
    randomise(model, gen)
    model.save_pretrained(folder)
    if layout == "fused" or mtp:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()} if layout == "fused" else \
            load_file(folder / "model.safetensors")
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state | (mtp_tensors(model, gen) if mtp else {}), str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
    shutil.copyfile(VOCAB_FILE, folder / "tokenizer.json")
    return model


def converted(tmp_path: Path, hf: Path):
    convert_from_hf.main([str(hf), str(tmp_path / "ours")])
    return load_pretrained(tmp_path / "ours")


def logits(model, tokens_BS: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(tokens_BS)
        return out.logits if hasattr(out, "logits") else out[0]


@pytest.mark.parametrize("layout, overrides", [
    ("per_expert", {"attention_bias": True}),
    ("fused", {"q_lora_rank": None}),
    ("per_expert", {"rms_norm_eps": 1e-5}),  # Moonlight's: the latents' norms keep 1e-6
    ("per_expert", {"q_lora_rank": None, "rope_interleave": False, "tie_word_embeddings": True,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 50000.0}, "first_k_dense_replace": 0}),
], ids=["per_expert_q_lora_yarn_bias", "fused_q_proj_yarn", "norm_eps_1e-5", "plain_rope_not_interleaved_tied_all_moe"])
def test_a_deepseek_v3_folder_converts_with_transformers_logits(tmp_path, layout, overrides):
    hf = deepseek_folder(tmp_path / "hf", layout, **overrides)
    args, model, path = converted(tmp_path, tmp_path / "hf")
    assert path.name == "global_step0" and args.kv_lora_rank == 16 and args.moe_router_num_groups == 4
    assert args.moe_first_layer == overrides.get("first_k_dense_replace", 1) and args.moe_router_scaling_factor == 2.5
    assert args.mtp_num_modules == 0  # num_nextn_predict_layers 1, but save_pretrained writes no module
    torch.testing.assert_close(logits(model, TOKENS), logits(hf, TOKENS), atol=1e-4, rtol=0)


def test_the_expert_bias_and_the_rope_permutation_matter(tmp_path):
    """Without the loss-free bias, or with the rope rows left interleaved, the logits differ: the test above would
    see either mistake."""
    hf = deepseek_folder(tmp_path / "hf")
    _, model, _ = converted(tmp_path, tmp_path / "hf")
    state = model.state_dict()
    expected = logits(hf, TOKENS)
    unbiased = {k: torch.zeros_like(v) if k.endswith("expert_bias_E") else v for k, v in state.items()}
    model.load_state_dict(unbiased)
    assert (logits(model, TOKENS) - expected).abs().max() > 1e-2
    from megatron.hf.deepseek_v3 import rope_rows_half_to_interleaved

    unpermuted = dict(state)
    for name in [k for k in state if k.endswith("attention.kv_down.weight")]:
        unpermuted[name] = rope_rows_half_to_interleaved(state[name], 16 + 8, 8)
    model.load_state_dict(unpermuted)
    assert (logits(model, TOKENS) - expected).abs().max() > 1e-2


def transformers_mtp(hf_folder: Path, hf_model):
    """transformers' own MTP module (speculative decoding's drafter) loaded from the folder by transformers' own
    renaming. It finds the module by DeepseekV3's `_keys_to_ignore_on_load_unexpected` pattern, written for
    DeepSeek-V3's 61 layers (model.layers.61): pointed at this model's layer count."""
    main = transformers.AutoModelForCausalLM.from_pretrained(hf_folder).eval()
    main._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{main.config.num_hidden_layers}\..*"]
    return main, MtpModel.from_pretrained(main).eval()


def test_an_mtp_module_in_the_folder_computes_what_transformers_computes(tmp_path):
    """The module's weights land in our mtp.0: from the same previous-depth state and the next tokens, our module
    and transformers' MtpModel give the same logits; the main model's logits are unchanged by it."""
    hf = deepseek_folder(tmp_path / "hf", mtp=True)
    args, model, _ = converted(tmp_path, tmp_path / "hf")
    assert args.mtp_num_modules == 1 and len(model.mtp) == 1
    torch.testing.assert_close(logits(model, TOKENS), logits(hf, TOKENS), atol=1e-4, rtol=0)
    main, theirs = transformers_mtp(tmp_path / "hf", hf)
    S = TOKENS.shape[1]
    h_BSD = torch.randn(2, S - 1, 32, generator=torch.Generator().manual_seed(2))  # a previous depth's state
    with torch.no_grad():
        module = model.mtp[0]
        out_BSD, _ = module(h_BSD, model.embed(TOKENS[:, 1:]))
        ours_BSV = torch.nn.functional.linear(out_BSD, model.lm_head.weight)
        state_BSD = theirs.forward_layer(0, h_BSD, torch.arange(1, S)[None].expand(2, -1), None,
                                         input_ids=TOKENS[:, 1:])
        theirs_BSV = theirs._project_to_logits(state_BSD)
    torch.testing.assert_close(ours_BSV, theirs_BSV, atol=1e-4, rtol=0)


def test_an_mtp_head_unlike_the_model_head_is_one_line(tmp_path):
    deepseek_folder(tmp_path / "hf", mtp=True)
    weights = tmp_path / "hf/model.safetensors"
    state = load_file(weights)
    state["model.layers.3.shared_head.head.weight"] = state["model.layers.3.shared_head.head.weight"] + 1
    save_file(state, str(weights), metadata={"format": "pt"})
    message = refused(tmp_path, tmp_path / "hf")
    assert "model.layers.3.shared_head.head.weight: differs from lm_head.weight" in message


def refused(tmp_path: Path, hf: Path) -> str:
    """The one-line error the tool exits with; no output is left."""
    with pytest.raises(SystemExit) as exit_info:
        convert_from_hf.main([str(hf), str(tmp_path / "ours")])
    message = str(exit_info.value.code)
    assert message.startswith("convert_from_hf: ") and "\n" not in message and "Traceback" not in message
    assert not (tmp_path / "ours").exists()
    return message


def edit_config(hf: Path, **changes) -> None:
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(config | changes))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """One small DeepSeek-V3 folder with an MTP module, built once; the refusal tests copy it."""
    hf = tmp_path_factory.mktemp("deepseek") / "hf"
    deepseek_folder(hf, mtp=True)
    return hf


@pytest.mark.parametrize("changes, message", [
    ({"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}},
     r"quantization_config \(quant_method 'fp8'\): quantized \(FP8\) checkpoints are not converted"),
    ({"norm_topk_prob": False}, r"norm_topk_prob false"),
    ({"hidden_act": "gelu"}, r"hidden_act 'gelu'"),
    ({"num_key_value_heads": 2}, r"num_key_value_heads 2 \(expected num_attention_heads 4"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
     r"rope_parameters.rope_type 'linear'"),
    ({"num_nextn_predict_layers": 0}, r"holds 1 multi-token prediction modules .* num_nextn_predict_layers is 0"),
], ids=["fp8_config", "norm_topk_prob", "activation", "kv_heads", "linear_rope", "mtp_count"])
def test_what_is_not_computed_is_refused_in_one_line(folder, tmp_path, changes, message):
    hf = Path(shutil.copytree(folder, tmp_path / "hf"))
    edit_config(hf, **changes)
    assert re.search(message, refused(tmp_path, hf))


def test_fp8_scales_in_the_weights_are_refused_in_one_line(folder, tmp_path):
    hf = Path(shutil.copytree(folder, tmp_path / "hf"))
    state = load_file(hf / "model.safetensors")
    state["model.layers.0.self_attn.kv_b_proj.weight_scale_inv"] = torch.ones(1, 1)
    save_file(state, str(hf / "model.safetensors"), metadata={"format": "pt"})
    assert "holds FP8 scales (model.layers.0.self_attn.kv_b_proj.weight_scale_inv, 1 such)" in refused(tmp_path, hf)


# --- ours -> DeepSeek-V3 -------------------------------------------------------------------------------------------

DEEPSEEK_SHAPED = {
    "num_layers": 3, "norm": "rmsnorm", "rms_norm_epsilon": 1e-6, "activation": "swiglu", "use_bias_in_mlp": False,
    "use_bias_in_attn_linear": False, "use_bias_in_norms": False, "intermediate_size": 96, "mlp_multiple_of": 1,
    "kv_lora_rank": 16, "q_lora_rank": 12, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 6,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "mscale": 1.0,
                     "mscale_all_dim": 0.8},
    "moe_num_experts": 8, "moe_top_k": 3, "moe_ffn_hidden_size": 16, "moe_router_score_function": "sigmoid",
    "moe_router_enable_expert_bias": True, "moe_router_num_groups": 4,
    "moe_router_group_top_k": 2, "moe_router_scaling_factor": 2.5, "moe_num_shared_experts": 1, "moe_first_layer": 1,
    "no_weight_tying": True, "mtp_num_modules": 1, "seq_length": 48,
}


def greedy(model, prompt_BS: torch.Tensor, steps: int) -> torch.Tensor:
    seq = prompt_BS
    with torch.no_grad():
        for _ in range(steps):
            seq = torch.cat([seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


def assert_native_deepseek(tmp_path: Path, save: Path, model, out: str = "hf"):
    """SAVE exports as a plain DeepseekV3ForCausalLM with our logits; returns (report, transformers' model)."""
    report = convert_to_hf.main([str(save), str(tmp_path / out)])
    assert report["format"] == "native" and report["class"] == "DeepseekV3ForCausalLM", report["because"]
    assert not list((tmp_path / out).glob("*.py"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / out).eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    tokens_BS = TOKENS % model.cfg.vocab_size
    torch.testing.assert_close(logits(hf, tokens_BS), logits(model, tokens_BS), atol=1e-5, rtol=0)
    return report, hf


@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": None, "moe_router_enable_expert_bias": False,
                                            "mtp_num_modules": 0, "rope_scaling": None, "no_weight_tying": False}],
                         ids=["deepseek_v3", "q_proj_no_bias_no_mtp_tied"])
def test_a_deepseek_shaped_model_exports_natively_and_comes_back_bit_for_bit(tmp_path, data_prefix, overrides):
    save, model = saved_model(tmp_path / "run", data_prefix, **{**DEEPSEEK_SHAPED, **overrides})
    report, hf = assert_native_deepseek(tmp_path, save, model)
    prompt_BS = (TOKENS % model.cfg.vocab_size)[:1, :8]
    assert hf.generate(prompt_BS, max_new_tokens=6, do_sample=False).tolist() == greedy(model, prompt_BS, 6).tolist()
    written = load_file(tmp_path / "hf/model.safetensors")
    config = json.loads((tmp_path / "hf/config.json").read_text())
    assert config["rope_interleave"] and "model.layers.1.mlp.experts.7.gate_proj.weight" in written
    if model.cfg.mtp_num_modules:
        assert report["notes"] == ["1 multi-token prediction module(s) written as model.layers.3 (DeepSeek-V3's "
                                   "layout, read back by convert_from_hf); DeepseekV3ForCausalLM skips them on load "
                                   "and computes the main model alone"]
        assert "model.layers.3.eh_proj.weight" in written and config["num_nextn_predict_layers"] == 1
    convert_from_hf.main([str(tmp_path / "hf"), str(tmp_path / "back")])
    _, back, _ = load_pretrained(tmp_path / "back")
    before, after = model.state_dict(), back.state_dict()
    if not model.cfg.moe.balancing.bias:  # written as zeros (the same choices), read back as the bias DeepSeek has
        after = {k: v for k, v in after.items() if not k.endswith("expert_bias_E")}
    assert sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)


def test_a_dense_mla_model_exports_as_deepseek_v3_with_every_layer_dense(tmp_path, data_prefix):
    dense = {k: v for k, v in DEEPSEEK_SHAPED.items() if not k.startswith("moe_")} | {"mtp_num_modules": 0}
    save, model = saved_model(tmp_path / "run", data_prefix, **dense)
    assert_native_deepseek(tmp_path, save, model)
    convert_from_hf.main([str(tmp_path / "hf"), str(tmp_path / "back")])
    args, back, _ = load_pretrained(tmp_path / "back")
    assert args.moe_num_experts == 1
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("change, reason", [
    ({"moe_router_score_function": "softmax"}, "DeepSeek-V3: moe.score_function: 'softmax' (expected 'sigmoid')"),
    ({"kv_lora_rank": None, "q_lora_rank": None, "qk_nope_head_dim": None, "qk_rope_head_dim": None,
      "v_head_dim": None}, "DeepSeek-V3: mla: None (expected multi-head latent attention: kv_lora_rank)"),
], ids=["softmax_router", "no_mla"])
def test_what_deepseek_v3_does_not_compute_stays_remote_code(tmp_path, data_prefix, change, reason, monkeypatch):
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    overrides = {k: v for k, v in {**DEEPSEEK_SHAPED, **change}.items() if v is not None}
    save, model = saved_model(tmp_path / "run", data_prefix, **overrides)
    report = convert_to_hf.main([str(save), str(tmp_path / "hf")])
    assert report["format"] == "remote_code" and reason in report["because"], report["because"]


def test_import_train_export_keeps_transformers_logits(tmp_path, data_prefix):
    """A DeepSeek-V3 folder with an MTP module -> our checkpoint -> two train.py steps (the MTP loss on, the expert
    bias updated) -> a plain DeepseekV3ForCausalLM with the trained model's logits."""
    deepseek_folder(tmp_path / "hf", mtp=True)
    convert_from_hf.main([str(tmp_path / "hf"), str(tmp_path / "ours")])
    run = {"data_path": data_prefix, "split": "90,10,0", "train_micro_batch_size_per_gpu": 2,
           "gradient_accumulation_steps": 1, "train_iters": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
           "eval_interval": 0, "log_interval": 1, "checkpoint_factor": 2, "log_dir": str(tmp_path / "logs")}
    (tmp_path / "run.yml").write_text(yaml.safe_dump(run))
    train.run([str(tmp_path / "ours/model.yml"), str(tmp_path / "run.yml"), "--load", str(tmp_path / "ours"),
               "--save", str(tmp_path / "trained"), "--seq_length", "16"])
    _, before, _ = load_pretrained(tmp_path / "ours")
    _, trained, path = load_pretrained(tmp_path / "trained")
    assert path.name == "global_step2"
    moved = [k for k, v in trained.state_dict().items() if not torch.equal(v, before.state_dict()[k])]
    assert any(k.startswith("mtp.0.") for k in moved) and any(k.endswith("expert_bias_E") for k in moved)
    report, _ = assert_native_deepseek(tmp_path, tmp_path / "trained", trained, out="out")
    assert report["model_type"] == "deepseek_v3"
