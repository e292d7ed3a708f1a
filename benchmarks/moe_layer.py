"""MoE layer forward+backward, measured side by side in one run (ratios, not absolute times, are the result).

    python benchmarks/moe_layer.py            # the paper's 125M shape: d=768, ed=3072, 8 experts, top-1, 4096 tokens
    python benchmarks/moe_layer.py --quick    # tiny shapes, a smoke test
    python benchmarks/moe_layer.py --repeats 7 --json docs/results/moe_layer.json   # the figures the docs quote

Variants are interleaved repeat by repeat and medians taken, so drift in the machine's speed hits all alike.
Like train.py on CPU, it keeps freed memory in the process (megatron/runtime.py); --default-malloc
measures with glibc's default instead. Memory is the bytes of tensors autograd saves for backward
(unique storages, via saved_tensors_hooks) plus the output: the activation memory a layer adds to a training step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the package is the repo's
    sys.path.insert(0, str(REPO))

from megatron.model.moe import LoREConfig, MoELayer, moe_param_counts  # noqa: E402
from megatron.runtime import keep_freed_memory_in_process  # noqa: E402


class DenseMLP(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.w_up = nn.Parameter(torch.randn(d, f) * 0.02)
        self.w_down = nn.Parameter(torch.randn(f, d) * 0.02)

    def forward(self, x):
        return F.gelu(x @ self.w_up) @ self.w_down, None


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, _ = module(x)
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params and ptr != x.untyped_storage().data_ptr()) + (
        y.untyped_storage().nbytes())


def step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    y, aux = module(x)
    loss = (y * grad).sum()
    if aux is not None:
        loss = loss + 0.01 * aux.load_balancing_loss
    loss.backward()
    module.zero_grad(set_to_none=True)


def measure(tokens: int, repeats: int, quick: bool) -> dict:
    """Times and saved-tensor memory of every variant, interleaved repeat by repeat; a JSON-ready dict."""
    torch.manual_seed(0)
    d, f, experts, lores, rank = (768, 3072, 8, 32, 64) if not quick else (64, 256, 8, 8, 8)
    lore = LoREConfig(lores, rank, 1, "entangled")
    structmoe_params = sum(moe_param_counts(d, f, experts, lore).values())
    per_expert = moe_param_counts(d, f, 1, None)
    matched = round((structmoe_params) / (per_expert["experts"] + per_expert["routers"]))
    variants = {
        f"plain MoE, {experts} experts": MoELayer.build(d, f, experts, 1),
        f"StructMoE (M={lores}, r={rank}, l=1)": MoELayer.build(d, f, experts, 1, lore=lore),
        "StructMoE router-free": MoELayer.build(d, f, experts, 1, lore=LoREConfig(lores, rank, 1, "router_free")),
        "StructMoE standalone": MoELayer.build(d, f, experts, 1, lore=LoREConfig(lores, rank, 1, "standalone")),
        f"plain MoE, {matched} experts (matched)": MoELayer.build(d, f, matched, 1),
        "dense MLP, equal FLOPs": DenseMLP(d, f),
    }
    x = torch.randn(tokens, d, requires_grad=True)
    grad = torch.randn(tokens, d)
    for _ in range(2):  # warm-up: the first steps grow the heap and fault pages in
        for module in variants.values():
            step(module, x, grad)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, module in variants.items():
            start = time.perf_counter()
            step(module, x, grad)
            times[name].append(time.perf_counter() - start)
    return {
        "tokens": tokens, "hidden_size": d, "ffn_hidden_size": f, "experts": experts, "matched_experts": matched,
        "threads": torch.get_num_threads(), "repeats": repeats,
        "variants": [{"name": name, "params": sum(p.numel() for p in module.parameters()),
                      "seconds": times[name], "saved_bytes": saved_bytes(module, x)}
                     for name, module in variants.items()],
    }


def format_report(result: dict) -> str:
    """The printed table and ratios, computed from a measure() result alone (docs quote this text)."""
    variants = result["variants"]
    median = {v["name"]: statistics.median(v["seconds"]) for v in variants}
    memory = {v["name"]: v["saved_bytes"] for v in variants}
    names = [v["name"] for v in variants]
    plain, struct, matched, dense = names[0], names[1], names[4], names[-1]
    tokens, d, f = result["tokens"], result["hidden_size"], result["ffn_hidden_size"]
    lines = [f"tokens={tokens} d={d} ed={f} top-1 fp32 fwd+bwd, {result['threads']} threads, "
             f"median of {result['repeats']}",
             f"{'layer':<40}{'params':>12}{'time (s)':>10}{'vs plain':>10}{'saved MB':>10}{'vs plain':>10}"]
    for v in variants:
        name = v["name"]
        lines.append(f"{name:<40}{v['params'] / 1e6:>11.1f}M{median[name]:>10.3f}{median[name] / median[plain]:>10.3f}"
                     f"{memory[name] / 2**20:>10.1f}{memory[name] / memory[plain]:>10.3f}")
    flops = 3 * 2 * tokens * 2 * d * f  # fwd + bwd (2x) of the two expert matmuls, top-1
    moe_rate, dense_rate = flops / median[plain], flops / median[dense]
    lines.append("")
    lines.append(f"StructMoE / plain {result['experts']}-expert time       {median[struct] / median[plain]:.3f}  "
                 "(target <= 1.15)")
    lines.append(f"StructMoE / matched {result['matched_experts']}-expert time     "
                 f"{median[struct] / median[matched]:.3f}")
    for ablation in names[2:4]:
        lines.append(f"{ablation} / plain time  {median[ablation] / median[plain]:.3f}")
    lines.append(f"StructMoE / plain saved-tensor memory  {memory[struct] / memory[plain]:.3f}  (target <= 1.2)")
    lines.append(f"dropless MoE FLOP/s / dense MLP FLOP/s {moe_rate / dense_rate:.3f}  (target >= 0.85; "
                 f"{moe_rate / 1e9:.1f} vs {dense_rate / 1e9:.1f} GFLOP/s)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's default (unmap large freed blocks), as train.py does not on CPU")
    parser.add_argument("--json", default=None, help="also write the measured times and memory to this path")
    args = parser.parse_args()
    if not args.default_malloc:
        keep_freed_memory_in_process()  # as train.py does on CPU
    torch.set_num_threads(2)
    load_before = os.getloadavg()[0]
    result = measure(args.tokens if not args.quick else 512, args.repeats, args.quick)
    result["default_malloc"] = args.default_malloc
    result["load_average"] = [load_before, os.getloadavg()[0]]  # others' work on the machine skews the ratios
    print(format_report(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
