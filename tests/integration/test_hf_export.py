"""tools/convert_to_hf.py: dense models as plain GPTNeoXForCausalLM folders, MoE/StructMoE as remote code.

Every expectation is our own model's output on the same tokens (logits to 1e-5 in fp32, greedy
continuations against an argmax loop), with every parameter scrambled so no tensor maps by luck.
"""

import ast
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.hf_models import REPO, VOCAB_FILE, saved_model

sys.path.insert(0, str(REPO / "tools"))
import convert_to_hf  # noqa: E402

from megatron.data.tokenizer import HFTokenizer  # noqa: E402
from megatron.hf.remote import import_closure  # noqa: E402
from megatron.model.generation import pad_batch  # noqa: E402

transformers = pytest.importorskip("transformers")
TOKENS = torch.randint(0, 8000, (2, 24), generator=torch.Generator().manual_seed(0))
MOE = {"moe_num_experts": 4, "moe_top_k": 2}
STRUCTMOE = {**MOE, "lore_num_experts": 4, "lore_rank": 2, "lore_top_k": 1}
# Mixtral's block (test_hf_llama.py exports it as MixtralForCausalLM): one setting more and it is remote code
MIXTRAL_SHAPED = {"norm": "rmsnorm", "activation": "swiglu", "use_bias_in_attn_linear": False, "use_bias_in_mlp": False,
                  "use_bias_in_norms": False, "intermediate_size": 96, "num_kv_heads": 2, "no_weight_tying": True,
                  **MOE, "moe_ffn_hidden_size": 16, "moe_renormalize_weights": True}


@pytest.fixture(autouse=True)
def modules_cache(tmp_path, monkeypatch):
    """transformers copies remote code into its modules cache: keep it in tmp_path."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))


def greedy(model, prompt_BS: torch.Tensor, steps: int) -> torch.Tensor:
    """The argmax continuation, recomputing the whole prefix each step with our model."""
    seq = prompt_BS
    with torch.no_grad():
        for _ in range(steps):
            seq = torch.cat([seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


def ours(model, tokens_BS):
    with torch.no_grad():
        return model(tokens_BS)[0]


@pytest.mark.parametrize("overrides", [
    {"rotary_pct": 0.25},  # tied head, sequential residual
    {"rotary_pct": 0.3, "gpt_j_residual": True, "no_weight_tying": True},  # 2.4 rotary dims -> 2, untied
    {"rotary_pct": 1.0, "use_bias_in_attn_linear": False, "use_bias_in_norms": False, "activation": "relu"},
], ids=["tied", "parallel_untied_partial", "no_biases_relu"])
def test_dense_model_is_a_plain_gpt_neox(tmp_path, data_prefix, overrides):
    save, model = saved_model(tmp_path / "run", data_prefix, **overrides)
    report = convert_to_hf.main([str(save), str(tmp_path / "hf")])
    assert report["format"] == "native" and report["class"] == "GPTNeoXForCausalLM" and report["because"] == []
    assert not list((tmp_path / "hf").glob("*.py"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()  # no custom code
    assert type(hf).__name__ == "GPTNeoXForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(hf(TOKENS).logits, ours(model, TOKENS), atol=1e-5, rtol=0)
    out = hf.generate(TOKENS[:1, :8], max_new_tokens=6, do_sample=False)
    assert out.tolist() == greedy(model, TOKENS[:1, :8], 6).tolist()


def test_tokenizer_files_encode_as_the_run_did(tmp_path, data_prefix):
    save, _ = saved_model(tmp_path / "run", data_prefix, scramble=False)
    convert_to_hf.main([str(save), str(tmp_path / "hf")])
    with pytest.raises(SystemExit, match="not empty"):  # never mixed with an earlier export's files
        convert_to_hf.main([str(save), str(tmp_path / "hf")])
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours_tok = HFTokenizer(VOCAB_FILE)
    text = "To be, or not to be, that is the question:\nWhether 'tis nobler"
    assert hf_tok(text)["input_ids"] == ours_tok.encode(text)
    config = json.loads((tmp_path / "hf/config.json").read_text())
    assert hf_tok.eos_token_id == ours_tok.eod_id == config["eos_token_id"]


@pytest.mark.parametrize("overrides", [MOE, {**STRUCTMOE, "gpt_j_residual": True, "no_weight_tying": True},
                                       {**STRUCTMOE, "lore_mode": "standalone", "lore_top_k": 2,
                                        "moe_expert_interval": 2, "norm": "rmsnorm"}],
                         ids=["moe", "structmoe", "standalone_rmsnorm"])
def test_moe_models_load_as_remote_code(tmp_path, data_prefix, overrides):
    save, model = saved_model(tmp_path / "run", data_prefix, **overrides)
    report = convert_to_hf.main([str(save), str(tmp_path / "hf")])
    assert report["format"] == "remote_code" and report["class"] == "MegatronGPTForCausalLM" and report["because"]
    config = json.loads((tmp_path / "hf/config.json").read_text())
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    moe = config["gpt"]["moe"]  # what the model computes: no expert-parallel group, LSH exchange or kernel choice
    assert not {"expert_parallel", "lsh", "lsh_layers", "impl"} & set(moe)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(TOKENS).logits, ours(model, TOKENS), atol=1e-5, rtol=0)
    lengths = []  # tokens per forward of our model inside generate()
    hook = hf.model.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    cached = hf.generate(TOKENS[:, :8], max_new_tokens=6, do_sample=False)
    hook.remove()
    assert lengths == [8, 1, 1, 1, 1, 1]  # the prompt once, then each new token alone against the cache
    uncached = hf.generate(TOKENS[:, :8], max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.tolist() == uncached.tolist() == greedy(model, TOKENS[:, :8], 6).tolist()
    prompts = [TOKENS[0, :8], TOKENS[1, :5]]  # left-padded to one width, as batched generation pads
    ids_BS, mask_BS = pad_batch(prompts)
    batch = hf.generate(ids_BS, attention_mask=mask_BS, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for b, prompt in enumerate(prompts):
        assert batch[b, 8:].tolist() == greedy(model, prompt[None], 6)[0, len(prompt):].tolist()
    for path in (tmp_path / "hf").glob("*.py"):  # no import of the package is left in the shipped files
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(n.split(".")[0] == "megatron" for n in names), path.name


def assert_remote_code_export(tmp_path, save, model, reason: str):
    """SAVE exported as remote code, `reason` among the reasons, with our logits to 1e-5."""
    report = convert_to_hf.main([str(save), str(tmp_path / "hf")])
    assert report["format"] == "remote_code" and report["class"] == "MegatronGPTForCausalLM"
    assert any(reason in line for line in report["because"]), report["because"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    assert type(hf).__name__ == "MegatronGPTForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(hf(TOKENS).logits, ours(model, TOKENS), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [{}, {"qk_norm": True}], ids=["mixtral", "qwen3_moe"])
def test_a_sigmoid_router_is_remote_code(tmp_path, data_prefix, shape):
    """Mixtral's and Qwen3-MoE's blocks with sigmoid scores: their softmax routers would compute another model
    (Qwen3-MoE's gates need no renormalising, so nothing else stops it)."""
    save, model = saved_model(tmp_path / "run", data_prefix, **{
        **MIXTRAL_SHAPED, **shape, "moe_router_score_function": "sigmoid", "moe_renormalize_weights": False})
    assert_remote_code_export(tmp_path, save, model, "Llama family: moe.score_function: 'sigmoid'")


@pytest.mark.parametrize("overrides, reason", [
    ({**MIXTRAL_SHAPED, "moe_router_enable_expert_bias": True}, "Llama family: moe.balancing.bias: True"),
    ({**STRUCTMOE, "moe_router_enable_expert_bias": True, "lore_router_enable_bias": True}, "moe.lore"),
], ids=["expert_bias", "expert_and_lore_bias"])
def test_loss_free_balancing_biases_travel_with_remote_code(tmp_path, data_prefix, overrides, reason):
    """The routers' biases (buffers, random here) choose other experts and LoREs: they are written and loaded."""
    save, model = saved_model(tmp_path / "run", data_prefix, **overrides)
    biases = {k: v for k, v in model.state_dict().items() if k.endswith(("expert_bias_E", "lore_bias_EM"))}
    assert len(biases) == 2 * (1 + ("lore_router_enable_bias" in overrides)) and all(b.abs().min() > 0
                                                                                     for b in biases.values())
    unbiased = copy.deepcopy(model)
    unbiased.load_state_dict({k: torch.zeros_like(v) for k, v in biases.items()}, strict=False)
    assert (ours(unbiased, TOKENS) - ours(model, TOKENS)).abs().max() > 1e-2  # the biases change the choices
    assert_remote_code_export(tmp_path, save, model, reason)


@pytest.mark.parametrize("overrides", [{}, MOE], ids=["native", "remote_code"])
def test_a_failed_export_leaves_no_folder(tmp_path, data_prefix, monkeypatch, overrides):
    """The weights writer fails half-way (a full disk): no folder is left, and the same command then succeeds."""
    import safetensors.torch

    save, _ = saved_model(tmp_path / "run", data_prefix, scramble=False, **overrides)
    write = safetensors.torch.save_file

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError(28, "No space left on device", filename)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(SystemExit, match="convert_to_hf: .*No space left on device"):
        convert_to_hf.main([str(save), str(tmp_path / "hf")])
    assert [p.name for p in tmp_path.iterdir() if p.name != "hf_modules"] == ["run"]  # no folder, no staging one
    monkeypatch.setattr(safetensors.torch, "save_file", write)
    report = convert_to_hf.main([str(save), str(tmp_path / "hf")])
    assert report["format"] == ("remote_code" if overrides else "native")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}


@pytest.mark.slow  # a fresh interpreter importing torch and transformers: ~15 s
def test_remote_code_folder_needs_no_megatron_package(tmp_path, data_prefix):
    """In a fresh process where `import megatron` fails, the folder alone builds the model."""
    save, model = saved_model(tmp_path / "run", data_prefix, **STRUCTMOE)
    convert_to_hf.main([str(save), str(tmp_path / "hf")])
    code = (
        "import sys, torch\n"
        "sys.modules['megatron'] = None  # any import of the repository's package now fails\n"
        "import transformers.dynamic_module_utils as d\n"
        f"d.HF_MODULES_CACHE = {str(tmp_path / 'fresh_modules')!r}\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'hf')!r}, trust_remote_code=True).eval()\n"
        f"torch.save(m(torch.load({str(tmp_path / 'tokens.pt')!r})).logits, {str(tmp_path / 'logits.pt')!r})\n"
    )
    torch.save(TOKENS, tmp_path / "tokens.pt")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, capture_output=True)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), ours(model, TOKENS), atol=1e-5, rtol=0)


def test_closure_holds_every_module_gpt_imports():
    """Against Python's own account: the repository modules a fresh `import megatron.model.gpt` loads, less
    what the parent packages' __init__ files load (they are not shipped: flat files import directly)."""
    closure = import_closure()
    parents = sorted({".".join(m.split(".")[:i]) for m in closure for i in range(1, m.count(".") + 1)} - set(closure))
    code = (f"import sys, importlib\nfor p in {parents!r}: importlib.import_module(p)\n"
            "before = set(sys.modules)\nimport megatron.model.gpt\n"
            "print(' '.join(m for m in sys.modules if m.startswith('megatron.') and m not in before))")
    loaded = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                            cwd=REPO).stdout.split()
    assert "megatron.model.gpt" in loaded and set(loaded) <= set(closure)
    assert "megatron.model.moe.megablocks" in closure  # imported inside a function: shipped as well


def test_gpt2_bpe_files_become_a_tokenizer_json(tmp_path):
    from tokenizers import ByteLevelBPETokenizer

    from megatron.data.tokenizer import GPT2BPETokenizer
    from megatron.hf.export import write_tokenizer_files

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["to be, or not to be: that is the question"] * 20, vocab_size=300,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    bpe.save_model(str(tmp_path))
    ours_tok = GPT2BPETokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    (tmp_path / "hf").mkdir()
    write_tokenizer_files(ours_tok, str(tmp_path / "vocab.json"), tmp_path / "hf", 64)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "that is not the question, to be"
    assert hf_tok(text)["input_ids"] == ours_tok.encode(text) and hf_tok.eos_token_id == ours_tok.eod_id
