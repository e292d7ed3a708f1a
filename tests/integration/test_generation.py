"""Generation with a KV cache against recomputing the whole sequence, logits filtering on hand-computed cases,
and tools/generate.py on a checkpoint trained here.

Shape legend: B batch, S sequence, N new tokens, V vocabulary.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.runs import write_config

from megatron.model.attention import KVCache
from megatron.model.generation import filter_logits, generate, next_token, pad_batch
from megatron.model.gpt import GPT, GPTConfig
from megatron.model.moe import LoREConfig, MoEArchitecture

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import generate as generate_tool  # noqa: E402

VARIANTS = {
    "dense": dict(),
    "learned_positions": dict(pos_emb="learned", activation="swiglu", intermediate_size=96),
    "gqa_partial_rotary": dict(num_kv_heads=2, rotary_pct=0.5, norm="rmsnorm", use_bias_in_mlp=False),
    "mqa_window": dict(num_kv_heads=1, sliding_window_width=3, activation="geglu", intermediate_size=96),
    "moe_gqa": dict(num_kv_heads=2, moe=MoEArchitecture(num_experts=4, top_k=2, expert_interval=2)),
    "structmoe_window": dict(sliding_window_width=5, moe=MoEArchitecture(num_experts=4, lore=LoREConfig(4, 2, 1))),
}
SAMPLING = {"greedy": dict(temperature=0.0), "seeded": dict(temperature=1.0, top_k=20, top_p=0.9)}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Token-at-a-time forwards of a tiny model are thousands of tiny ops: on a busy 2-core machine, two OpenMP
    threads spend more time waiting for each other than computing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(**overrides) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=64, num_layers=2, hidden_size=32, num_attention_heads=4, max_position_embeddings=32)
    return GPT(GPTConfig(**{**cfg, **overrides})).eval()


@pytest.mark.parametrize("sampling", SAMPLING)
@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_generation_equals_recomputing_the_sequence(variant, sampling):
    model = tiny_model(**VARIANTS[variant])
    prompt_BS = torch.randint(0, 64, (3, 6), generator=torch.Generator().manual_seed(1))
    runs = [generate(model, prompt_BS, 12, generator=torch.Generator().manual_seed(5), use_cache=use_cache,
                     **SAMPLING[sampling]) for use_cache in (True, False)]
    (cached, cached_logits_BNV), (full, full_logits_BNV) = runs
    assert torch.equal(cached, full) and cached.shape == (3, 18)
    torch.testing.assert_close(cached_logits_BNV, full_logits_BNV, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # and both are the logits one forward over the final sequence gives at those positions
        once_BSV, _ = model(full[:, :-1])
    torch.testing.assert_close(cached_logits_BNV, once_BSV[:, 5:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["dense", "mqa_window", "structmoe_window"])
def test_chunks_after_a_cache_see_the_right_positions(variant):
    """Several new tokens at once after a cache (a causal band offset by what the cache holds)."""
    model = tiny_model(**VARIANTS[variant])
    tokens_BS = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(2))
    cache = KVCache(len(model.blocks))
    with torch.no_grad():
        whole_BSV, _ = model(tokens_BS)
        pieces = [model(tokens_BS[:, a:b], cache=cache)[0] for a, b in ((0, 7), (7, 8), (8, 15), (15, 20))]
    assert cache.length() == 20 and cache.keys[1].shape[1] == model.blocks[1].attention.num_kv_heads
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole_BSV, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_padded_rows_give_each_rows_own_logits(variant, side):
    """A batch of rows padded to one width, with their attention mask: at every token, the logits of the row run
    alone (positions count the row's tokens; padding is not attended to)."""
    model = tiny_model(**VARIANTS[variant])
    generator = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, 64, (n,), generator=generator) for n in (9, 6, 4)]
    tokens_BS, mask_BS = pad_batch(rows, side)
    with torch.no_grad():
        padded_BSV, _ = model(tokens_BS, attention_mask_BT=mask_BS)
        for b, row in enumerate(rows):
            alone_SV = model(row[None])[0][0]
            torch.testing.assert_close(padded_BSV[b][mask_BS[b].bool()], alone_SV, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["dense", "learned_positions", "mqa_window", "structmoe_window"])
def test_left_padded_prompts_continue_against_a_cache(variant):
    """Left-padded prompts, then one new token per row at a time against the cache, the mask growing by a 1 each
    step (what Hugging Face generation does): each row's logits are those of its own unpadded sequence."""
    model = tiny_model(**VARIANTS[variant])
    generator = torch.Generator().manual_seed(4)
    rows = [torch.randint(0, 64, (n,), generator=generator) for n in (8, 5, 2)]
    new_BN = torch.randint(0, 64, (3, 4), generator=generator)
    tokens_BS, mask_BT = pad_batch(rows, "left")
    cache = KVCache(len(model.blocks))
    with torch.no_grad():
        last = [model(tokens_BS, cache=cache, attention_mask_BT=mask_BT)[0][:, -1]]
        for i in range(new_BN.shape[1]):
            mask_BT = torch.cat([mask_BT, torch.ones(3, 1, dtype=torch.long)], dim=1)
            last.append(model(new_BN[:, i:i + 1], cache=cache, attention_mask_BT=mask_BT)[0][:, -1])
        for b, row in enumerate(rows):
            alone_SV = model(torch.cat([row, new_BN[b]])[None])[0][0, len(row) - 1:]
            torch.testing.assert_close(torch.stack([step[b] for step in last]), alone_SV, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
@pytest.mark.parametrize("variant", ["dense", "learned_positions", "structmoe_window"])
def test_a_left_padded_batch_generates_what_each_prompt_does_alone(variant, use_cache):
    model = tiny_model(**VARIANTS[variant])
    generator = torch.Generator().manual_seed(6)
    rows = [torch.randint(0, 64, (n,), generator=generator) for n in (7, 3)]
    prompt_BS, mask_BS = pad_batch(rows, "left")
    batch, batch_logits_BNV = generate(model, prompt_BS, 8, temperature=0.0, use_cache=use_cache,
                                       attention_mask_BS=mask_BS)
    for b, row in enumerate(rows):
        alone, alone_logits_BNV = generate(model, row[None], 8, temperature=0.0)
        assert batch[b, 7:].tolist() == alone[0, len(row):].tolist()
        torch.testing.assert_close(batch_logits_BNV[b], alone_logits_BNV[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs left padding"):
        right_BS, right_mask_BS = pad_batch(rows, "right")
        generate(model, right_BS, 2, attention_mask_BS=right_mask_BS)  # the next token would follow padding


def test_positions_beyond_the_model_are_one_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"prompt of 30 tokens \+ max_new_tokens 3 exceed .*embeddings 32"):
        generate(model, torch.zeros(1, 30, dtype=torch.long), 3)


def test_top_k_and_top_p_keep_the_hand_computed_tokens():
    probs = [0.1, 0.5, 0.15, 0.25]  # sorted: 0.5 (1), 0.25 (3), 0.15 (2), 0.1 (0)
    logits_BV = torch.tensor([probs]).log()
    kept = lambda **kw: torch.isfinite(filter_logits(logits_BV, **kw))[0].nonzero().flatten().tolist()
    assert kept(top_k=2) == [1, 3]
    assert kept(top_k=1) == [1] and kept(top_k=9) == [0, 1, 2, 3]
    assert kept(top_p=0.3) == [1]  # 0.5 alone reaches 0.3
    assert kept(top_p=0.7) == [1, 3]  # 0.5 + 0.25 = 0.75
    assert kept(top_p=0.8) == [1, 2, 3]  # + 0.15 = 0.9
    assert kept(top_k=2, top_p=0.95) == [1, 3]  # top-k first; the nucleus of the renormalised pair
    assert kept(top_k=3, top_p=0.6) == [1, 3]  # renormalised over 0.9: 0.556, then 0.833
    # temperature divides the logits; what is kept is finite and unchanged otherwise
    scaled = filter_logits(logits_BV, temperature=2.0, top_k=2)[0]
    assert scaled[1].item() == pytest.approx(math.log(0.5) / 2) and scaled[0].item() == float("-inf")


def test_sampling_draws_from_the_filtered_distribution():
    logits_BV = torch.tensor([[0.1, 0.5, 0.15, 0.25]]).log().expand(4000, 4)
    draws = next_token(logits_BV, 1.0, 2, 1.0, torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=4).tolist()
    assert counts[0] == counts[2] == 0
    assert counts[1] / 4000 == pytest.approx(0.5 / 0.75, abs=0.03)  # 4000 draws: sd 0.0075
    again = next_token(logits_BV, 1.0, 2, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
    assert next_token(logits_BV[:2], 0.0, 0, 1.0, None).tolist() == [1, 1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data_prefix) -> Path:
    import train

    folder = tmp_path_factory.mktemp("gen")
    config = write_config(folder, data_prefix, train_iters=5, checkpoint_factor=5, eval_interval=0, num_kv_heads=2,
                          activation="swiglu", intermediate_size=96, sliding_window_width=8)
    train.run([str(config)])
    return folder / "ckpt"


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "generate.py"), *argv], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_generate_cli_continues_the_prompt_with_and_without_the_cache(checkpoint, capsys):
    from megatron.data.tokenizer import CharLevelTokenizer
    from megatron.training.pretrained import load_pretrained

    greedy = ["--prompt", "to be or", "--max-new-tokens", "10", "--temperature", "0"]
    cached = run_cli(str(checkpoint), *greedy)  # as a script (one: each start imports torch afresh)
    assert cached.returncode == 0, cached.stderr
    assert cached.stdout.startswith("to be or") and len(cached.stdout) > len("to be or\n")
    assert generate_tool.main([str(checkpoint), *greedy, "--no-cache"]) + "\n" == cached.stdout
    _, model, _ = load_pretrained(checkpoint)  # the same tokens as the library call on the loaded model
    assert model.blocks[0].attention.num_kv_heads == 2 and model.blocks[0].attention.window == 8
    tokenizer = CharLevelTokenizer()
    prompt_BS = torch.tensor([tokenizer.encode("to be or")])
    tokens, _ = generate(model, prompt_BS, 10, temperature=0.0, vocab_size=tokenizer.vocab_size)
    assert cached.stdout == tokenizer.decode(tokens[0].tolist()) + "\n"
    sampled = generate_tool.main([str(checkpoint), "--prompt", "to be or", "--max-new-tokens", "10", "--top-k", "5",
                                  "--seed", "3"])
    tokens, _ = generate(model, prompt_BS, 10, top_k=5, generator=torch.Generator().manual_seed(3),
                         vocab_size=tokenizer.vocab_size)
    assert sampled == tokenizer.decode(tokens[0].tolist())
    assert capsys.readouterr().out.splitlines()[0] + "\n" == cached.stdout  # main prints what it returns
    short = generate_tool.main([str(checkpoint), "--prompt", "not", "--max-new-tokens", "10", "--temperature", "0"])
    both = generate_tool.main([str(checkpoint), "--prompt", "to be or", "--prompt", "not", "--max-new-tokens", "10",
                               "--temperature", "0"])  # one left-padded batch: each as it is alone
    assert both == cached.stdout.rstrip("\n") + "\n----\n" + short


def test_generate_cli_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"^generate: .*no checkpoint"):
        generate_tool.main([str(tmp_path), "--prompt", "x"])
    with pytest.raises(SystemExit):
        generate_tool.main([str(tmp_path), "--prompt", "x", "--top-p", "0"])
    assert "0 < --top-p <= 1" in capsys.readouterr().err
