"""YaRN rope scaling, attention sinks and the sliding/full window pattern against transformers' own code: YaRN's
frequencies and attention factor against its rope init function for published rope_scaling blocks, our attention
with copied weights against LlamaAttention (YaRN) and GptOssAttention (sinks, windows, GQA, padding, YaRN) on the
masks transformers builds, cached generation against recomputing the sequence, and which layers slide.

Shape legend: B batch, S sequence, D hidden, H query heads, K key/value heads, Dh head dim, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch
import yaml
from helpers.hf_models import REPO, saved_model

from megatron.config import load_config
from megatron.hf.gpt_oss import window_from_hf, window_to_hf
from megatron.model.attention import Attention, KVCache, Padding, layer_window
from megatron.model.build import rope_scaling_from_args
from megatron.model.generation import generate, pad_batch
from megatron.model.gpt import GPT, GPTConfig
from megatron.model.rope import Rotary, YarnRopeScaling

sys.path.insert(0, str(REPO / "tools"))
import convert_to_hf  # noqa: E402

transformers = pytest.importorskip("transformers")
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale  # noqa: E402
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssAttention, GptOssRotaryEmbedding  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding  # noqa: E402

# (rope_scaling block as published or written, rope_theta, rotated dims of a head, max_position_embeddings)
YARN_CASES = {
    "deepseek_v3": ({"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}, 10000, 64, 163840),
    "gpt_oss": ({"type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                 "original_max_position_embeddings": 4096}, 150000, 64, 131072),
    "deepseek_v2_lite": ({"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                          "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}, 10000, 64, 163840),
    "qwen3_128k": ({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}, 1000000, 128, 131072),
    "mscale_ratio_untruncated": ({"type": "yarn", "factor": 16.0, "original_max_position_embeddings": 2048,
                                  "beta_fast": 16, "beta_slow": 2, "mscale": 1.0, "mscale_all_dim": 0.5,
                                  "truncate": False}, 500000, 32, 32768),
    "tiny_context": ({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}, 10000, 8, 64),
}


def ours_from_block(block: dict) -> YarnRopeScaling:
    """The block through our config (its defaults, its validation) to the model's dataclass."""
    args = load_config([], ["--pos_emb", "rotary", "--rope_scaling", yaml.safe_dump(block, default_flow_style=True)])
    scaling = rope_scaling_from_args(args.rope_scaling)
    assert isinstance(scaling, YarnRopeScaling)
    return scaling


def their_config(block: dict, theta: float, dims: int, max_positions: int, heads: int = 2):
    rope = {("rope_type" if k == "type" else k): v for k, v in block.items()} | {"rope_theta": float(theta)}
    return transformers.LlamaConfig(hidden_size=heads * dims, num_attention_heads=heads, head_dim=dims,
                                    max_position_embeddings=max_positions, rope_parameters=rope)


@pytest.mark.parametrize("case", YARN_CASES)
def test_yarn_frequencies_and_attention_factor_equal_transformers(case):
    block, theta, dims, max_positions = YARN_CASES[case]
    ours = ours_from_block(block)
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](their_config(block, theta, dims, max_positions), "cpu")
    torch.testing.assert_close(ours.inv_freq(theta, dims), inv_freq, rtol=1e-6, atol=0)
    assert ours.attention_factor() == pytest.approx(attention_factor, rel=1e-12)
    plain = 1.0 / theta ** (torch.arange(0, dims, 2).float() / dims)
    assert (inv_freq < 0.99 * plain).any()  # an interpolated band in every case: the scaling is not the identity


@pytest.mark.parametrize("case", ["deepseek_v3", "deepseek_v2_lite", "mscale_ratio_untruncated", "gpt_oss"])
def test_mla_softmax_scale_correction_equals_deepseek_v3s(case):
    block, *_ = YARN_CASES[case]
    rope = {("rope_type" if k == "type" else k): v for k, v in block.items()}
    expected = yarn_apply_mscale(rope, 1.0)
    assert ours_from_block(block).mla_softmax_scale_factor() == pytest.approx(expected, rel=1e-12)


def test_rotary_tables_equal_transformers_cos_sin_with_the_attention_factor():
    block, theta, dims, max_positions = YARN_CASES["gpt_oss"]
    ours = Rotary(dims, 1.0, theta, 512, ours_from_block(block))
    theirs = LlamaRotaryEmbedding(their_config(block, theta, dims, max_positions))
    positions = torch.arange(512)[None]
    cos, sin = theirs(torch.zeros(1, dtype=torch.float32), positions)
    torch.testing.assert_close(ours.cos_SR, cos[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.sin_SR, sin[0], rtol=0, atol=1e-6)
    assert ours.cos_SR[0, 0] == pytest.approx(ours_from_block(block).attention_factor())  # cos 0 = 1, scaled


def test_a_partial_rotary_yarn_scales_only_the_rotated_dims():
    """GPT-NeoX-style partial rotary: YaRN's ramp runs over the rotated dims (transformers' partial_rotary_factor)."""
    block, theta = YARN_CASES["qwen3_128k"][:2]
    config = their_config(block, theta, 64, 131072)
    config.rope_parameters["partial_rotary_factor"] = 0.5
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    ours = Rotary(64, 0.5, theta, 16, ours_from_block(block))
    assert ours.rotary_dims == 32
    angles = torch.outer(torch.arange(16).float(), inv_freq)
    torch.testing.assert_close(ours.cos_SR[:, :16], angles.cos() * factor, rtol=0, atol=1e-6)


def copy_attention(ours: Attention, theirs: torch.nn.Module) -> None:
    """q/k/v_proj stacked into our qkv ([q | k | v] rows), o_proj our dense, sinks ours."""
    state = {"qkv.weight": torch.cat([theirs.q_proj.weight, theirs.k_proj.weight, theirs.v_proj.weight]),
             "dense.weight": theirs.o_proj.weight}
    if theirs.q_proj.bias is not None:
        state |= {"qkv.bias": torch.cat([theirs.q_proj.bias, theirs.k_proj.bias, theirs.v_proj.bias]),
                  "dense.bias": theirs.o_proj.bias}
    if hasattr(theirs, "sinks"):
        state["sinks"] = theirs.sinks
    ours.load_state_dict(state)


def test_attention_with_yarn_equals_llama_attention():
    """Grouped-query attention with YaRN (gpt-oss's block on a 16-token original context, so that 24 positions
    reach past it) equals transformers' LlamaAttention, eager, on its causal mask."""
    block = {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "truncate": False}
    theirs_cfg = transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "truncate": False,
                         "original_max_position_embeddings": 16})
    theirs_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    theirs = LlamaAttention(theirs_cfg, layer_idx=0).eval()
    plain_cfg = GPTConfig(vocab_size=8, hidden_size=64, num_attention_heads=4, num_kv_heads=2,
                          max_position_embeddings=128, use_bias_in_attn_linear=False, pos_emb="rotary")
    ours = Attention(dataclasses.replace(plain_cfg, rope_scaling=ours_from_block(block))).eval()
    plain = Attention(plain_cfg).eval()
    copy_attention(ours, theirs)
    copy_attention(plain, theirs)
    x_BSD = torch.randn(2, 24, 64)
    positions = torch.arange(24)[None]
    mask = create_causal_mask(theirs_cfg, x_BSD, None, None, position_ids=positions)
    with torch.no_grad():
        expected, _ = theirs(x_BSD, LlamaRotaryEmbedding(theirs_cfg)(x_BSD, positions), mask)
        torch.testing.assert_close(ours(x_BSD), expected, rtol=0, atol=1e-5)
        assert (plain(x_BSD) - expected).abs().max() > 1e-3  # YaRN changes the output: a real comparison


# gpt-oss-shaped, small: 4 query heads on 2 K/V heads of 16, biases, sinks, layers [sliding, full], window 4 in
# transformers' count (the query and 3 keys before it), YaRN as gpt-oss configures it on a 16-token context
HF_WINDOW = 4
GPT_OSS_ROPE = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                "truncate": False, "original_max_position_embeddings": 16}


def gpt_oss_pair(layer_idx: int, pattern: tuple[str, ...] = ("sliding", "full")) -> tuple[Attention, object, object]:
    theirs_cfg = transformers.GptOssConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=2,
        sliding_window=HF_WINDOW, max_position_embeddings=128, rope_parameters=dict(GPT_OSS_ROPE),
        attention_bias=True, num_local_experts=2, num_experts_per_tok=1)
    theirs_cfg._attn_implementation = "eager"
    torch.manual_seed(layer_idx)
    theirs = GptOssAttention(theirs_cfg, layer_idx).eval()
    with torch.no_grad():
        for param in theirs.parameters():
            param.normal_(0, 0.2)
        theirs.sinks.normal_(0, 2.0)  # logits of order 1 and sinks that take a visible share
    block = {k: v for k, v in GPT_OSS_ROPE.items() if k not in ("rope_type", "rope_theta")} | {"type": "yarn"}
    ours_cfg = GPTConfig(vocab_size=8, hidden_size=64, num_attention_heads=4, num_kv_heads=2,
                         max_position_embeddings=128, pos_emb="rotary", rotary_emb_base=150000,
                         rope_scaling=ours_from_block(block), attention_sinks=True,
                         sliding_window_width=window_from_hf(HF_WINDOW), sliding_window_pattern=pattern)
    ours = Attention(ours_cfg, layer_idx).eval()
    copy_attention(ours, theirs)
    return ours, theirs, theirs_cfg


@pytest.mark.parametrize("layer_idx", [0, 1], ids=["sliding_layer", "full_layer"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_and_right_padded"])
def test_sinks_and_windows_equal_gpt_oss_attention(layer_idx, padded):
    """fp32, 1e-5, on the mask transformers builds for the layer's type (GptOssModel's causal_mask_mapping); with
    padding, each row's positions count its tokens and only the tokens' outputs are compared."""
    ours, theirs, theirs_cfg = gpt_oss_pair(layer_idx)
    B, S = 2, 12
    x_BSD = torch.randn(B, S, 64, generator=torch.Generator().manual_seed(1))
    mask_BS = torch.ones(B, S, dtype=torch.long)
    if padded:
        mask_BS[0, :3] = 0  # left padding
        mask_BS[1, -2:] = 0  # right padding
    positions_BS = (mask_BS.cumsum(-1) - 1).clamp(min=0)
    make_mask = create_sliding_window_causal_mask if layer_idx == 0 else create_causal_mask
    mask = make_mask(theirs_cfg, x_BSD, mask_BS if padded else None, None, position_ids=positions_BS)
    with torch.no_grad():
        expected, _ = theirs(x_BSD, GptOssRotaryEmbedding(theirs_cfg)(x_BSD, positions_BS), mask)
        got = ours(x_BSD, padding=Padding.from_mask(mask_BS, S) if padded else None)
    tokens = mask_BS.bool()
    torch.testing.assert_close(got[tokens], expected[tokens], rtol=0, atol=1e-5)
    assert ours.window == (window_from_hf(HF_WINDOW) if layer_idx == 0 else None)


def test_sinks_take_mass_and_their_gradient_flows():
    """A sink far above every score takes all the mass and adds no value: the output is o_proj's bias alone;
    the sinks get gradients."""
    ours, _, _ = gpt_oss_pair(1)
    x_BSD = torch.randn(1, 6, 64)
    ours(x_BSD).square().sum().backward()
    assert ours.sinks.grad is not None and ours.sinks.grad.abs().min() > 0
    with torch.no_grad():
        ours.sinks.fill_(1e4)
        assert ours(x_BSD).sub(ours.dense.bias).abs().max() < 1e-6


def test_sinks_are_zero_at_init_and_refused_with_flash():
    cfg = GPTConfig(vocab_size=8, hidden_size=32, num_attention_heads=4, attention_sinks=True)
    assert torch.equal(Attention(cfg).sinks, torch.zeros(4))
    with pytest.raises(ValueError, match=r"attention_sinks: true needs attention_impl: sdpa"):
        Attention(dataclasses.replace(cfg, attention_impl="flash"))


@pytest.mark.parametrize("layer_idx", [0, 1], ids=["sliding_layer", "full_layer"])
def test_cached_attention_with_sinks_equals_gpt_oss_attention(layer_idx):
    """Our KV cache fed three, then one token at a time equals transformers' attention over the whole sequence."""
    ours, theirs, theirs_cfg = gpt_oss_pair(layer_idx)
    x_BSD = torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(2))
    positions = torch.arange(10)[None]
    make_mask = create_sliding_window_causal_mask if layer_idx == 0 else create_causal_mask
    with torch.no_grad():
        expected, _ = theirs(x_BSD, GptOssRotaryEmbedding(theirs_cfg)(x_BSD, positions),
                             make_mask(theirs_cfg, x_BSD, None, None, position_ids=positions))
        cache = KVCache(2)
        steps = [ours(x_BSD[:, :3], cache)] + [ours(x_BSD[:, i:i + 1], cache) for i in range(3, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, rtol=0, atol=1e-5)


def gpt_oss_shaped_model(**overrides) -> GPT:
    cfg = GPTConfig(vocab_size=64, num_layers=4, hidden_size=64, num_attention_heads=4, num_kv_heads=2,
                    max_position_embeddings=64, pos_emb="rotary", norm="rmsnorm", activation="swiglu",
                    rope_scaling=YarnRopeScaling(factor=4.0, original_max_position_embeddings=16, truncate=False),
                    attention_sinks=True, sliding_window_width=3, sliding_window_pattern=("sliding", "full"),
                    **overrides)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attention.sinks.normal_(0, 1.0)
    return model


def test_cached_generation_equals_recomputing_with_sinks_and_the_window_pattern():
    """24 greedy tokens from a 6-token prompt (past the window of 3): the KV cache gives the recomputed logits."""
    model = gpt_oss_shaped_model()
    prompt = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    cached, cached_logits = generate(model, prompt, 24, top_k=1)
    recomputed, recomputed_logits = generate(model, prompt, 24, top_k=1, use_cache=False)
    assert torch.equal(cached, recomputed)
    torch.testing.assert_close(cached_logits, recomputed_logits, rtol=0, atol=1e-4)


def test_padded_cached_generation_equals_each_row_alone():
    """Left-padded prompts of 3 and 7 tokens, cached, give each row's tokens and logits as the row alone would."""
    model = gpt_oss_shaped_model()
    rows = [torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(n)) for n in (3, 7)]
    tokens_BS, mask_BS = pad_batch(rows)
    batch, batch_logits = generate(model, tokens_BS, 12, top_k=1, attention_mask_BS=mask_BS)
    for b, row in enumerate(rows):
        alone, alone_logits = generate(model, row[None], 12, top_k=1, use_cache=False)
        assert batch[b, -12:].tolist() == alone[0, -12:].tolist()
        torch.testing.assert_close(batch_logits[b], alone_logits[0], rtol=0, atol=1e-4)


@pytest.mark.parametrize(("pattern", "layers"), [
    (None, 5), (("sliding", "full"), 5), (("full", "sliding", "sliding"), 7), (("sliding",), 3)])
def test_the_pattern_repeats_over_the_layers(pattern, layers):
    cfg = GPTConfig(vocab_size=8, num_layers=layers, sliding_window_width=3, sliding_window_pattern=pattern)
    expected = [3 if pattern is None or pattern[i % len(pattern)] == "sliding" else None for i in range(layers)]
    assert [layer_window(cfg, i) for i in range(layers)] == expected
    assert [block.attention.window for block in GPT(cfg).blocks] == expected
    assert [layer_window(dataclasses.replace(cfg, sliding_window_width=None), i) for i in range(layers)] == [
        None] * layers


def test_gpt_oss_layer_types_are_our_sliding_full_pattern():
    """gpt-oss's own default layer_types (sliding at even layers) are the layers our [sliding, full] slides."""
    theirs = transformers.GptOssConfig(num_hidden_layers=6)
    cfg = GPTConfig(vocab_size=8, num_layers=6, sliding_window_width=window_from_hf(theirs.sliding_window),
                    sliding_window_pattern=("sliding", "full"))
    ours = ["full_attention" if layer_window(cfg, i) is None else "sliding_attention" for i in range(6)]
    assert ours == theirs.layer_types
    assert window_to_hf(window_from_hf(theirs.sliding_window)) == theirs.sliding_window == 128


def test_a_sliding_layer_sees_the_query_and_width_keys_before_it_a_full_layer_all():
    """Perturbing input t changes the last query's output (position 11) only where the layer sees t: a sliding
    layer of width 3 sees positions 8..11, the full layer every one."""
    cfg = GPTConfig(vocab_size=8, hidden_size=32, num_attention_heads=4, max_position_embeddings=16,
                    pos_emb="rotary", attention_sinks=True, sliding_window_width=3,
                    sliding_window_pattern=("sliding", "full"))
    torch.manual_seed(0)
    x_BSD = torch.randn(1, 12, 32)
    for layer_idx, first_seen in [(0, 8), (1, 0)]:
        attention = Attention(cfg, layer_idx).eval()
        with torch.no_grad():
            base = attention(x_BSD)[0, -1]
            for t in range(12):
                moved = x_BSD.clone()
                moved[0, t] += 1.0
                changed = (attention(moved)[0, -1] - base).abs().max() > 1e-6
                assert bool(changed) == (t >= first_seen), (layer_idx, t)


def test_the_window_rule_counts_the_query_in_transformers_and_not_in_ours():
    assert [window_from_hf(w) for w in (2, 4, 128)] == [1, 3, 127]
    assert [window_to_hf(w) for w in (1, 3, 127)] == [2, 4, 128]
    with pytest.raises(ValueError, match=r"sliding_window 1: expected 2 or more"):
        window_from_hf(1)


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """transformers copies remote code into its modules cache: keep it in tmp_path."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))


def test_remote_code_export_computes_sinks_windows_and_yarn(tmp_path, data_prefix, modules_cache):
    """A dense model with sinks, the [sliding, full] pattern and YaRN has no native family: the remote-code
    export gives our logits (sinks saved and loaded, YaRN's tables rebuilt) and our greedy tokens, cached and
    uncached, one prompt and a left-padded batch."""
    keys = {"pos_emb": "rotary", "norm": "rmsnorm", "num_kv_heads": 2, "attention_sinks": True,
            "sliding_window_width": 3, "sliding_window_pattern": ["sliding", "full"],
            "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "truncate": False}}
    save, model = saved_model(tmp_path / "run", data_prefix, **keys)
    report = convert_to_hf.main([str(save), str(tmp_path / "hf")])
    assert report["format"] == "remote_code"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    assert torch.equal(hf.model.blocks[0].attention.sinks, model.blocks[0].attention.sinks)
    assert [block.attention.window for block in hf.model.blocks] == [3, None]
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
