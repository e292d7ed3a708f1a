"""KV-cache bytes per token of multi-head latent attention, measured after generation, against full keys and values.

    python benchmarks/mla_cache.py --json docs/results/mla_cache.json     # the figures docs/architectures.md quotes
    python benchmarks/mla_cache.py --markdown docs/results/mla_cache.json # reprints the table of a recorded run

A DeepSeek-V3-shaped tiny model (configs/families/deepseek_v3.yml with every width scaled down: MLA with a query
latent, YaRN, DeepSeekMoE layers after a dense one, MTP) generates greedily from a batch of prompts with our KVCache;
its bytes per token are summed over the tensors the cache holds after generation. Beside it: the same model exported
as remote code and run by transformers' generate(), whose DynamicCache is measured the same way; the keys and values
every head attends with, rebuilt from the cache as the attention does (MultiHeadLatentAttention.expand), which is
what a cache of full keys and values would hold; and the closed forms (kv_lora_rank + qk_rope_head_dim) x layers
and H (qk_nope_head_dim + qk_rope_head_dim + v_head_dim) x layers numbers, also for DeepSeek-V3's own shape.

Shape legend: B prompts, S prompt length, N new tokens, T tokens held.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the package is the repo's
    sys.path.insert(0, str(REPO))

from megatron.config import load_config  # noqa: E402
from megatron.data.tokenizer import vocab_size_of  # noqa: E402
from megatron.model.attention import KVCache  # noqa: E402
from megatron.model.build import build_gpt  # noqa: E402
from megatron.model.generation import generate  # noqa: E402

FAMILY = "configs/families/deepseek_v3.yml"
# DeepSeek-V3's attention with widths / 8 and heads / 8, a narrow residual stream, 4 layers (1 dense, 3 MoE)
TINY = {"num_layers": 4, "hidden_size": 256, "num_attention_heads": 16, "kv_lora_rank": 64, "q_lora_rank": 192,
        "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "intermediate_size": 768,
        "moe_num_experts": 8, "moe_top_k": 2, "moe_ffn_hidden_size": 64, "moe_router_num_groups": 4,
        "moe_router_group_top_k": 2, "moe_first_layer": 1, "vocab_size": 512, "seq_length": 256,
        "max_position_embeddings": 256}
COMMAND = "python benchmarks/mla_cache.py --json docs/results/mla_cache.json"


def shape_of(args) -> dict:
    return {"num_layers": args.num_layers, "num_attention_heads": args.num_attention_heads,
            "kv_lora_rank": args.kv_lora_rank, "q_lora_rank": args.q_lora_rank,
            "qk_nope_head_dim": args.qk_nope_head_dim, "qk_rope_head_dim": args.qk_rope_head_dim,
            "v_head_dim": args.v_head_dim, "hidden_size": args.hidden_size}


def closed_form(shape: dict, dtype_bytes: int) -> dict:
    """Bytes per token: the latent and the shared rope key per layer, against every head's key and value."""
    layers, heads = shape["num_layers"], shape["num_attention_heads"]
    mla = (shape["kv_lora_rank"] + shape["qk_rope_head_dim"]) * layers * dtype_bytes
    full = heads * (shape["qk_nope_head_dim"] + shape["qk_rope_head_dim"] + shape["v_head_dim"]) * layers * dtype_bytes
    return {"mla_bytes_per_token": mla, "full_kv_bytes_per_token": full, "full_over_mla": full / mla}


def held_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def measure_ours(model, prompt_BS: torch.Tensor, new_tokens: int) -> tuple[dict, torch.Tensor]:
    """Prefill and token-at-a-time decoding with a KVCache (generation.py's loop), then the bytes it holds, and the
    bytes of the keys and values rebuilt from it; the tokens, checked against generate()."""
    cache = KVCache(len(model.blocks))
    tokens_BS, new_BS = prompt_BS, prompt_BS
    for _ in range(new_tokens):
        logits_BSV, _ = model(new_BS, cache=cache)
        new_BS = logits_BSV[:, -1].argmax(-1, keepdim=True)
        tokens_BS = torch.cat([tokens_BS, new_BS], dim=1)
    expected, _ = generate(model, prompt_BS, new_tokens, temperature=0.0)
    if not torch.equal(tokens_BS, expected):
        raise RuntimeError("the measured loop's tokens differ from generate()'s")
    held = cache.length() * prompt_BS.shape[0]  # tokens whose entries the cache holds (the last token is not run)
    rebuilt = [t for layer, block in enumerate(model.blocks)
               for t in block.attention.expand(cache.keys[layer], cache.values[layer])]
    return {"tokens_held": held, "mla_bytes_per_token": held_bytes([*cache.keys, *cache.values]) / held,
            "full_kv_bytes_per_token": held_bytes(rebuilt) / held}, tokens_BS


def measure_transformers(model, prompt_BS: torch.Tensor, new_tokens: int) -> dict | None:
    """The model exported as remote code (megatron/hf/remote.py), generate() by transformers: its DynamicCache's
    bytes per token. None without transformers."""
    try:
        import transformers
    except ImportError:
        return None
    from megatron.hf.remote import write_remote_folder

    with tempfile.TemporaryDirectory() as folder:
        os.environ["HF_MODULES_CACHE"] = str(Path(folder) / "modules")
        import transformers.dynamic_module_utils as dynamic

        dynamic.HF_MODULES_CACHE = os.environ["HF_MODULES_CACHE"]
        write_remote_folder(Path(folder) / "hf", model, {})
        hf = transformers.AutoModelForCausalLM.from_pretrained(Path(folder) / "hf", trust_remote_code=True)
        hf = hf.to(next(model.parameters()).dtype).eval()
        out = hf.generate(prompt_BS, max_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True,
                          pad_token_id=0)
    cache = out.get("cache") or out.get("past_key_values")  # transformers renamed it
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    held = cache.get_seq_length() * prompt_BS.shape[0]
    return {"tokens_held": held, "mla_bytes_per_token": held_bytes(tensors) / held, "tokens": out.sequences.tolist()}


def run(opts) -> dict:
    torch.manual_seed(0)
    tiny = load_config([str(REPO / FAMILY)], [x for k, v in TINY.items() for x in (f"--{k}", str(v))])
    model = build_gpt(tiny, vocab_size_of(tiny)).to(getattr(torch, opts.dtype)).eval()
    prompt_BS = torch.randint(0, tiny.vocab_size, (opts.batch, opts.prompt),
                              generator=torch.Generator().manual_seed(1))
    ours, tokens_BS = measure_ours(model, prompt_BS, opts.new_tokens)
    theirs = measure_transformers(model, prompt_BS, opts.new_tokens) if not opts.skip_transformers else None
    if theirs is not None and theirs.pop("tokens") != tokens_BS.tolist():
        raise RuntimeError("transformers' generate() continued the prompts differently from ours")
    dtype_bytes = torch.finfo(getattr(torch, opts.dtype)).bits // 8
    full = load_config([str(REPO / FAMILY)])
    return {"command": COMMAND, "dtype": opts.dtype, "batch": opts.batch, "prompt": opts.prompt,
            "new_tokens": opts.new_tokens,
            "tiny": {"shape": shape_of(tiny), "ours": ours, "transformers": theirs,
                     "closed_form": closed_form(shape_of(tiny), dtype_bytes)},
            "deepseek_v3": {"config": FAMILY, "shape": shape_of(full), "closed_form": closed_form(shape_of(full),
                                                                                                 dtype_bytes)}}


def markdown(result: dict) -> str:
    """The table docs/architectures.md quotes."""
    tiny, big, dtype = result["tiny"], result["deepseek_v3"], result["dtype"]
    shape = tiny["shape"]
    rows = [("| cache, bytes per token (all layers, " + dtype + ") | MLA | full K/V | full / MLA |"),
            "|---|---:|---:|---:|"]

    def row(what: str, mla: float, full: float | None) -> str:
        ratio = "" if full is None else f"{full / mla:.2f}x"
        return f"| {what} | {mla:,.0f} | {'' if full is None else f'{full:,.0f}'} | {ratio} |"

    ours = tiny["ours"]
    rows.append(row(f"tiny ({shape['num_layers']} layers, {shape['num_attention_heads']} heads), our KVCache, "
                    "measured", ours["mla_bytes_per_token"], ours["full_kv_bytes_per_token"]))
    if tiny["transformers"] is not None:
        rows.append(row("tiny, transformers' DynamicCache (remote code), measured",
                        tiny["transformers"]["mla_bytes_per_token"], None))
    rows.append(row("tiny, closed form", tiny["closed_form"]["mla_bytes_per_token"],
                    tiny["closed_form"]["full_kv_bytes_per_token"]))
    b = big["shape"]
    rows.append(row(f"DeepSeek-V3 ({b['num_layers']} layers, {b['num_attention_heads']} heads), closed form",
                    big["closed_form"]["mla_bytes_per_token"], big["closed_form"]["full_kv_bytes_per_token"]))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens per row")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--skip-transformers", action="store_true", help="measure our cache only")
    parser.add_argument("--json", default=None, help="write the settings and figures to this path")
    parser.add_argument("--markdown", default=None, metavar="JSON", help="print the table of a recorded run and stop")
    opts = parser.parse_args(argv)
    if opts.markdown:
        result = json.loads(Path(opts.markdown).read_text())
        print(markdown(result))
        return result
    torch.set_num_threads(min(4, torch.get_num_threads()))
    result = run(opts)
    print(markdown(result))
    if opts.json:
        Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {opts.json}")
    return result


if __name__ == "__main__":
    main()
