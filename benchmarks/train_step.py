"""Whole training steps (forward + backward + AdamW) of our dense, MoE and StructMoE models against Hugging Face
transformers' GPTNeoXForCausalLM and MixtralForCausalLM (eager and grouped_mm experts), side by side in one run.

    python benchmarks/train_step.py                  # d=768, 4 layers, 12 heads, 8 x 256 tokens, vocab 8192, fp32
    python benchmarks/train_step.py --quick          # tiny shapes, a smoke test
    python benchmarks/train_step.py --compile        # also ours with regional torch.compile (megatron/model/compile.py)

Shapes and FLOPs are matched: untied embeddings, rotary attention, no dropout; the MoE models have 8 experts,
top-1, in every layer; Mixtral's SwiGLU experts are 2/3 as wide as our GELU experts, so an expert costs the
same FLOPs. Every model trains with the same fused AdamW. Variants are interleaved repeat by repeat and medians
taken; ratios are tokens/s against the Hugging Face model. MFU is against this device's peak (a measured matmul
probe on a CPU, see megatron/sizing/flops.py). Needs `transformers` (a benchmark-only dependency here).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the package is the repo's
    sys.path.insert(0, str(REPO))

from megatron.model.compile import compile_regions  # noqa: E402
from megatron.model.gpt import GPT, GPTConfig  # noqa: E402
from megatron.model.moe import LoREConfig, MoEArchitecture, MoERuntime  # noqa: E402
from megatron.runtime import keep_freed_memory_in_process  # noqa: E402
from megatron.sizing.flops import flops_per_token, peak_tflops  # noqa: E402


def ours(opts, moe: bool, lore: bool) -> nn.Module:
    settings = None
    if moe:
        settings = MoEArchitecture(num_experts=8, top_k=1,
                                   lore=LoREConfig(opts.lores, opts.lore_rank, 1) if lore else None)
    config = GPTConfig(vocab_size=opts.vocab, num_layers=opts.layers, hidden_size=opts.hidden,
                       num_attention_heads=opts.heads, intermediate_size=4 * opts.hidden,
                       max_position_embeddings=opts.seq, pos_emb="rotary", tie_embeddings=False, moe=settings)
    return GPT(config, MoERuntime(impl="native"))


def hf_gpt_neox(opts) -> nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(vocab_size=opts.vocab, hidden_size=opts.hidden, num_hidden_layers=opts.layers,
                           num_attention_heads=opts.heads, intermediate_size=4 * opts.hidden, rotary_pct=1.0,
                           max_position_embeddings=opts.seq, use_parallel_residual=False, tie_word_embeddings=False,
                           attention_dropout=0.0, hidden_dropout=0.0, hidden_act="gelu", attn_implementation="sdpa")
    return GPTNeoXForCausalLM(config)


def hf_mixtral(opts, experts: str) -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=opts.vocab, hidden_size=opts.hidden, num_hidden_layers=opts.layers,
                           num_attention_heads=opts.heads, num_key_value_heads=opts.heads,
                           intermediate_size=4 * opts.hidden * 2 // 3, num_local_experts=8, num_experts_per_tok=1,
                           max_position_embeddings=opts.seq, tie_word_embeddings=False, attention_dropout=0.0,
                           attn_implementation="sdpa", experts_implementation=experts)
    return MixtralForCausalLM(config)


def step_fn(model: nn.Module, tokens: torch.Tensor, ours_model: bool) -> Callable[[], float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step() -> float:
        start = time.perf_counter()
        if ours_model:
            logits, _ = model(tokens[:, :-1])
        else:
            logits = model(input_ids=tokens[:, :-1]).logits
        F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--lores", type=int, default=32)
    parser.add_argument("--lore-rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 repeats")
    parser.add_argument("--compile", action="store_true", help="add our models with regional torch.compile")
    opts = parser.parse_args()
    if opts.quick:
        opts.hidden, opts.layers, opts.heads, opts.batch, opts.seq, opts.vocab = 96, 2, 4, 2, 32, 512
        opts.lores, opts.lore_rank, opts.repeats = 4, 4, 2
    torch.set_num_threads(opts.threads)
    keep_freed_memory_in_process()
    torch.manual_seed(0)
    tokens = torch.randint(opts.vocab, (opts.batch, opts.seq + 1))
    models = {
        "ours dense": (ours(opts, False, False), True),
        "HF GPTNeoXForCausalLM": (hf_gpt_neox(opts), False),
        "ours MoE": (ours(opts, True, False), True),
        "HF Mixtral, eager experts": (hf_mixtral(opts, "eager"), False),
        "HF Mixtral, grouped_mm experts": (hf_mixtral(opts, "grouped_mm"), False),
        "ours StructMoE": (ours(opts, True, True), True),
    }
    if opts.compile:  # the same weights as the eager models (same seed), compiled in place
        for name, moe, lore in (("dense", False, False), ("MoE", True, False), ("StructMoE", True, True)):
            torch.manual_seed(0)
            model = ours(opts, moe, lore)
            compile_regions(model)
            models[f"ours {name}, compiled"] = (model, True)
    steps = {name: step_fn(model.train(), tokens, is_ours) for name, (model, is_ours) in models.items()}
    compile_seconds = {}
    for name, step in steps.items():  # warm-up: AdamW state, allocator, first-call overheads (compilation)
        compile_seconds[name] = step()
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(opts.repeats):
        for name, step in steps.items():
            times[name].append(step())
    median = {name: statistics.median(t) for name, t in times.items()}
    tokens_per_step = opts.batch * opts.seq
    peak, source = peak_tflops(torch.device("cpu"), "fp32")
    print(f"d={opts.hidden}, {opts.layers} layers, {opts.heads} heads, {opts.batch}x{opts.seq} tokens, vocab "
          f"{opts.vocab}, fp32, {torch.get_num_threads()} threads, median of {opts.repeats} interleaved repeats; "
          f"peak {peak:.3g} TFLOP/s ({source})")
    print(f"{'model':<34}{'params':>9}{'step (s)':>10}{'tokens/s':>10}{'MFU':>8}")
    for name, (model, is_ours) in models.items():
        params = sum(p.numel() for p in model.parameters())
        mfu = ""
        if is_ours:
            achieved = flops_per_token(model, opts.seq).training * tokens_per_step / median[name] / 1e12
            mfu = f"{achieved / peak:.1%}"
        print(f"{name:<34}{params / 1e6:>8.1f}M{median[name]:>10.3f}{tokens_per_step / median[name]:>10.0f}{mfu:>8}")
    print()
    speed = {name: tokens_per_step / t for name, t in median.items()}
    print(f"dense: ours / GPTNeoXForCausalLM            {speed['ours dense'] / speed['HF GPTNeoXForCausalLM']:.2f}x"
          "  (target >= 1.3)")
    for experts in ("eager", "grouped_mm"):
        ratio = speed["ours MoE"] / speed[f"HF Mixtral, {experts} experts"]
        print(f"MoE: ours / Mixtral ({experts:<10} experts)   {ratio:.2f}x  (target >= 1.3)")
    print(f"StructMoE step / plain MoE step              {median['ours StructMoE'] / median['ours MoE']:.2f}x"
          "  (target <= 1.10)")
    for name in ("dense", "MoE", "StructMoE"):
        if f"ours {name}, compiled" in speed:
            ratio = speed[f"ours {name}, compiled"] / speed[f"ours {name}"]
            print(f"{name}: compiled / eager {ratio:>24.2f}x  (first step, compiling: "
                  f"{compile_seconds[f'ours {name}, compiled']:.0f} s)")


if __name__ == "__main__":
    main()
