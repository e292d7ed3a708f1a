"""Multi-head latent attention (megatron/model/mla.py) against transformers' DeepseekV3Attention with copied weights,
its latent cache against recomputing the sequence, the cache's size against its closed form, and an MLA model
through the remote-code export and tools/generate.py.

Shape legend: B batch, S sequence, D hidden, V vocabulary.
"""

from __future__ import annotations

import sys

import pytest
import torch
from helpers.hf_models import REPO, saved_model

from megatron.config import ConfigError, load_config
from megatron.hf.deepseek_v3 import rope_rows_half_to_interleaved, rope_rows_interleaved_to_half
from megatron.model.attention import KVCache
from megatron.model.generation import generate, pad_batch
from megatron.model.gpt import GPT, GPTConfig
from megatron.model.mla import MLAConfig, MultiHeadLatentAttention

sys.path.insert(0, str(REPO / "tools"))
import convert_to_hf  # noqa: E402
import generate as generate_tool  # noqa: E402

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_deepseek  # noqa: E402

D, HEADS, C, N, R, VD = 32, 4, 16, 8, 4, 6  # hidden, heads, kv_lora_rank, nope, rope, v_head_dim
PLAIN = {"rope_type": "default", "rope_theta": 10000.0}
# DeepSeek-V3's YaRN has mscale == mscale_all_dim (cos/sin unscaled); 0.8 makes both corrections act
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.8}
MLA_KEYS = {"pos_emb": "rotary", "norm": "rmsnorm", "rms_norm_epsilon": 1e-6, "kv_lora_rank": C, "q_lora_rank": 12,
            "qk_nope_head_dim": N, "qk_rope_head_dim": R, "v_head_dim": VD}


def our_rope_scaling(rope: dict):
    if rope["rope_type"] == "default":
        return None
    from megatron.model.rope import YarnRopeScaling

    return YarnRopeScaling(**{k: v for k, v in rope.items() if k not in ("rope_type", "rope_theta")})


def configs(q_lora_rank: int | None, bias: bool, rope: dict) -> tuple[GPTConfig, object]:
    ours = GPTConfig(vocab_size=64, num_layers=1, hidden_size=D, num_attention_heads=HEADS, norm="rmsnorm",
                     norm_eps=1e-6, use_bias_in_attn_linear=bias, max_position_embeddings=64,
                     rope_scaling=our_rope_scaling(rope), mla=MLAConfig(C, N, R, VD, q_lora_rank))
    theirs = transformers.DeepseekV3Config(
        vocab_size=64, hidden_size=D, num_attention_heads=HEADS, num_key_value_heads=HEADS, num_hidden_layers=1,
        q_lora_rank=q_lora_rank, kv_lora_rank=C, qk_nope_head_dim=N, qk_rope_head_dim=R, v_head_dim=VD,
        rope_parameters=dict(rope), rope_interleave=True, attention_bias=bias, max_position_embeddings=64,
        rms_norm_eps=1e-6, n_routed_experts=4, n_group=1, topk_group=1, num_experts_per_tok=2)
    theirs._attn_implementation = "eager"
    return ours, theirs


def copy_from_transformers(ours: MultiHeadLatentAttention, theirs) -> None:
    """Their weights into ours: names per mla.py's docstring, rope rows de-interleaved (megatron/hf/deepseek_v3.py)."""
    src = theirs.state_dict()
    q_name = "q_proj" if ours.mla.q_lora_rank is None else "q_up"
    their_q = "q_proj" if ours.mla.q_lora_rank is None else "q_b_proj"
    names = {"q_down": "q_a_proj", "q_norm": "q_a_layernorm", "kv_norm": "kv_a_layernorm", "kv_up": "kv_b_proj",
             "dense": "o_proj", q_name: their_q, "kv_down": "kv_a_proj_with_mqa"}
    state = {}
    for name in ours.state_dict():
        module, kind = name.rsplit(".", 1)
        tensor = src[f"{names[module]}.{kind}"]
        if module == q_name:
            tensor = rope_rows_interleaved_to_half(tensor, N + R, R)
        if module == "kv_down":
            tensor = rope_rows_interleaved_to_half(tensor, C + R, R)
        state[name] = tensor
    ours.load_state_dict(state)


def causal_mask(S: int) -> torch.Tensor:
    return torch.full((S, S), torch.finfo(torch.float32).min).triu(1)[None, None]


@pytest.mark.parametrize("rope", [PLAIN, YARN], ids=["rope", "yarn"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("q_lora_rank", [None, 12], ids=["q_proj", "q_lora"])
def test_equals_transformers_deepseek_v3_attention(q_lora_rank, bias, rope):
    ours_cfg, their_cfg = configs(q_lora_rank, bias, rope)
    torch.manual_seed(0)
    theirs = hf_deepseek.DeepseekV3Attention(their_cfg, layer_idx=0).eval()
    with torch.no_grad():  # every tensor random, norms near 1, so that no mapping is right by luck
        for name, p in theirs.named_parameters():
            p.copy_((1.0 if "layernorm" in name else 0.0) + 0.3 * torch.randn_like(p))
    ours = MultiHeadLatentAttention(ours_cfg).eval()
    copy_from_transformers(ours, theirs)
    assert (theirs.q_a_proj is not None) == hasattr(ours, "q_down")
    assert {n for n, _ in ours.named_parameters() if n.endswith("bias")} == (
        {"q_down.bias", "kv_down.bias", "dense.bias"} & {f"{n}.bias" for n, _ in ours.named_children()}
        if bias else set())
    x_BSD = torch.randn(2, 40, D)  # past the original 16 positions, where YaRN's interpolation acts
    position_ids = torch.arange(40)[None].expand(2, -1)
    cos_sin = hf_deepseek.DeepseekV3RotaryEmbedding(their_cfg)(x_BSD, position_ids)
    with torch.no_grad():
        expected, _ = theirs(x_BSD, position_embeddings=cos_sin, attention_mask=causal_mask(40))
        torch.testing.assert_close(ours(x_BSD), expected, atol=1e-5, rtol=0)


def test_rope_row_permutation_is_exact_and_invertible():
    w = torch.arange(2 * (N + R) * 3, dtype=torch.float32).reshape(2 * (N + R), 3)
    half = rope_rows_interleaved_to_half(w, N + R, R)
    assert torch.equal(half[:N], w[:N]) and torch.equal(half[N:N + R], w[[N, N + 2, N + 1, N + 3]])
    assert torch.equal(half[N + R + N:], w[[2 * N + R, 2 * N + R + 2, 2 * N + R + 1, 2 * N + R + 3]])
    assert torch.equal(rope_rows_half_to_interleaved(half, N + R, R), w)
    with pytest.raises(ValueError, match="do not split into blocks of 5"):
        rope_rows_interleaved_to_half(w, 5, R)


def test_yarn_scales_the_softmax_by_mscale_all_dim_squared():
    ours_cfg, their_cfg = configs(None, False, YARN)
    expected = hf_deepseek.DeepseekV3Attention(their_cfg, layer_idx=0).scaling
    assert MultiHeadLatentAttention(ours_cfg).scale == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx((N + R) ** -0.5 * (0.1 * 0.8 * torch.log(torch.tensor(4.0)).item() + 1) ** 2)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Token-at-a-time forwards of a tiny model are thousands of tiny ops: on a busy machine, OpenMP threads spend
    more time waiting for each other than computing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_mla(**overrides) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=64, num_layers=3, hidden_size=D, num_attention_heads=HEADS, max_position_embeddings=48,
               norm="rmsnorm", activation="swiglu", intermediate_size=96, mla=MLAConfig(C, N, R, VD, 12))
    return GPT(GPTConfig(**{**cfg, **overrides})).eval()


@pytest.mark.parametrize("overrides", [{}, {"sliding_window_width": 3},
                                       {"mla": MLAConfig(C, N, R, VD), "use_bias_in_attn_linear": False}],
                         ids=["q_lora", "window", "q_proj_no_bias"])
def test_cached_generation_equals_recomputing_the_sequence(overrides):
    model = tiny_mla(**overrides)
    prompt_BS = torch.randint(0, 64, (3, 6), generator=torch.Generator().manual_seed(1))
    (cached, cached_BNV), (full, full_BNV) = [
        generate(model, prompt_BS, 10, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(5),
                 use_cache=use_cache) for use_cache in (True, False)]
    assert torch.equal(cached, full)
    torch.testing.assert_close(cached_BNV, full_BNV, atol=1e-5, rtol=1e-5)
    tokens_BS = full[:, :-1]  # chunks of several tokens after a cache: the band offset by what it holds
    cache = KVCache(3)
    with torch.no_grad():
        whole_BSV, _ = model(tokens_BS)
        pieces = [model(tokens_BS[:, a:b], cache=cache)[0] for a, b in ((0, 7), (7, 8), (8, 15))]
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole_BSV, atol=1e-5, rtol=1e-5)


def test_a_sliding_window_sees_only_the_last_keys():
    """With window w, position t's output is the last position's output of the sequence t - w .. t alone (rotary
    scores depend on relative positions only): an expectation built without any mask."""
    model = tiny_mla(sliding_window_width=4, num_layers=1)
    tokens_BS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole_BSV, _ = model(tokens_BS)
        for t in (4, 7, 11):
            alone_BSV, _ = model(tokens_BS[:, t - 4:t + 1])
            torch.testing.assert_close(whole_BSV[:, t], alone_BSV[:, -1], atol=1e-5, rtol=1e-5)


def test_a_window_pattern_slides_only_the_sliding_layers():
    model = tiny_mla(sliding_window_width=4, sliding_window_pattern=("sliding", "full"))
    assert [block.attention.window for block in model.blocks] == [4, None, 4]


def test_left_padded_rows_continue_as_they_would_alone():
    model = tiny_mla(sliding_window_width=5)
    prompts = [torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 3, 5)]
    tokens_BS, mask_BS = pad_batch(prompts)
    batch, batch_BNV = generate(model, tokens_BS, 6, temperature=0.0, attention_mask_BS=mask_BS)
    for b, prompt in enumerate(prompts):
        alone, alone_BNV = generate(model, prompt[None], 6, temperature=0.0)
        assert batch[b, 7:].tolist() == alone[0, len(prompt):].tolist()
        torch.testing.assert_close(batch_BNV[b], alone_BNV[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_cache_holds_the_latent_and_the_rope_key_per_token(dtype):
    """Bytes per token = (kv_lora_rank + qk_rope_head_dim) x layers x bytes, measured from the tensors it holds."""
    model = tiny_mla().to(dtype)
    cache = KVCache(3)
    prompt_BS = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        model(prompt_BS, cache=cache)
        model(prompt_BS[:, :1], cache=cache)
    held = sum(t.numel() * t.element_size() for t in [*cache.keys, *cache.values])
    assert cache.length() == 6
    assert held / (2 * 6) == (C + R) * 3 * torch.finfo(dtype).bits // 8
    assert cache.keys[0].shape == (2, 1, 6, C) and cache.values[0].shape == (2, 1, 6, R)
    with torch.no_grad():  # the latent it holds is the normalised one
        attention = model.blocks[0].attention
        x_BSD = model.blocks[0].input_norm(model.embed(prompt_BS))
        latent_BSC = attention.kv_norm(attention.kv_down(x_BSD)[..., :C])
    torch.testing.assert_close(cache.keys[0][:, 0, :5], latent_BSC)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"kv_lora_rank": 16}, r"kv_lora_rank: multi-head latent attention needs .*missing qk_nope_head_dim, "
                           r"qk_rope_head_dim, v_head_dim"),
    ({**MLA_KEYS, "pos_emb": "learned"}, r"pos_emb: 'learned' with multi-head latent attention"),
    ({**MLA_KEYS, "qk_norm": True}, r"qk_norm: true with multi-head latent attention"),
    ({**MLA_KEYS, "num_kv_heads": 2}, r"num_kv_heads: 2 with multi-head latent attention"),
    ({**MLA_KEYS, "rotary_pct": 0.5}, r"rotary_pct: 0.5 with multi-head latent attention"),
    ({**MLA_KEYS, "attention_impl": "flash"}, r"attention_impl: flash with multi-head latent attention"),
    ({**MLA_KEYS, "qk_rope_head_dim": 3}, r"qk_rope_head_dim: expected an even number of dims .*got 3"),
    ({"v_head_dim": 8}, r"v_head_dim: 8 cannot act in this model: it needs multi-head latent attention"),
])
def test_settings_mla_cannot_honour_are_one_line_naming_the_key(overrides, message):
    argv = [x for key, value in overrides.items() for x in (f"--{key}", str(value).lower() if isinstance(
        value, bool) else str(value))]
    with pytest.raises(ConfigError, match=message):
        load_config([], argv)


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """transformers copies remote code into its modules cache: keep it in tmp_path."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))


def test_remote_code_export_computes_our_model(tmp_path, data_prefix, modules_cache):
    save, model = saved_model(tmp_path / "run", data_prefix, **MLA_KEYS, sliding_window_width=6)
    assert isinstance(model.blocks[0].attention, MultiHeadLatentAttention)
    report = convert_to_hf.main([str(save), str(tmp_path / "hf")])
    assert report["format"] == "remote_code" and any("mla: MLAConfig" in r for r in report["because"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    assert type(hf).__name__ == "MegatronGPTForCausalLM"
    rotary = hf.model.blocks[1].attention.rotary  # rebuilt by _init_weights, not saved
    assert torch.equal(rotary.cos_SR, model.blocks[1].attention.rotary.cos_SR)
    tokens_BS = torch.randint(0, 300, (2, 14), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens_BS).logits, model(tokens_BS)[0], atol=1e-5, rtol=0)
    expected, _ = generate(model, tokens_BS[:, :8], 6, temperature=0.0, use_cache=False)
    cached = hf.generate(tokens_BS[:, :8], max_new_tokens=6, do_sample=False)
    uncached = hf.generate(tokens_BS[:, :8], max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.tolist() == uncached.tolist() == expected.tolist()
    ids_BS, mask_BS = pad_batch([tokens_BS[0, :8], tokens_BS[1, :5]])
    batch = hf.generate(ids_BS, attention_mask=mask_BS, max_new_tokens=6, do_sample=False, pad_token_id=0)
    ours, _ = generate(model, ids_BS, 6, temperature=0.0, attention_mask_BS=mask_BS)
    assert batch.tolist() == ours.tolist()


def test_generate_tool_gives_the_same_tokens_with_and_without_the_cache(tmp_path, data_prefix):
    """One prompt (positions from the cache's length) and a left-padded batch (positions from the mask), greedy and
    sampled."""
    save, _ = saved_model(tmp_path / "run", data_prefix, **MLA_KEYS)
    for prompts, sampling in ((["To be, or not"], ["--temperature", "0"]),
                              (["To be, or not", "Whether"], ["--temperature", "1", "--top-k", "40", "--seed", "3"])):
        argv = [str(save), *(x for p in prompts for x in ("--prompt", p)), "--max-new-tokens", "8", *sampling]
        cached, uncached = generate_tool.main(argv), generate_tool.main([*argv, "--no-cache"])
        assert cached == uncached and cached.count("\n----\n") == len(prompts) - 1
