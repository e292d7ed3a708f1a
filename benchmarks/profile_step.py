"""Where a training step's time goes: torch.profiler over a few steps of any config, ops grouped by kind.

    python benchmarks/profile_step.py configs/tiny_structmoe.yml
    python benchmarks/profile_step.py configs/tiny_moe.yml --steps 5 --top 25 --trace step.json   # Chrome trace

Builds the config's task exactly as train.py does (same model, data, loss and fused AdamW), warms up, then
profiles `--steps` optimizer steps and prints (1) self CPU time by kind of op: matmuls, attention, the MoE
layer's gathers/scatters/sorts (permutation and regrouping copies), elementwise and reductions, the optimizer,
and the rest; (2) the top ops by self time. Run it before and after a change to see what moved.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the package is the repo's
    sys.path.insert(0, str(REPO))

from megatron.config import load_config  # noqa: E402
from megatron.parallel import DistInfo  # noqa: E402
from megatron.runtime import keep_freed_memory_in_process  # noqa: E402
from megatron.training.optim import build_optimizer  # noqa: E402

KINDS = [  # (kind, substrings of aten op names), first match wins
    ("matmul", ("mm", "matmul", "linear", "addmm", "bmm", "grouped_mm", "baddbmm")),
    ("loss (log-softmax over the vocabulary)", ("log_softmax", "nll_loss", "cross_entropy")),
    ("attention", ("attention", "softmax")),
    ("MoE permute / regroup", ("index", "gather", "scatter", "sort", "argsort", "repeat_interleave", "bincount",
                               "topk", "cumsum", "nonzero", "masked")),
    ("optimizer", ("adam", "_foreach", "_fused")),
    ("copies / layout", ("copy", "clone", "contiguous", "cat", "stack", "to", "empty", "zeros", "fill", "view",
                         "transpose", "permute", "reshape", "expand")),
    ("elementwise / norms / loss", ("add", "mul", "div", "sub", "gelu", "silu", "relu", "norm", "exp", "log",
                                    "neg", "pow", "sqrt", "rsqrt", "where", "sum", "mean", "max", "cross_entropy",
                                    "nll", "embedding", "dropout", "sin", "cos", "tanh")),
]


def kind_of(name: str) -> str:
    op = name.removeprefix("aten::").lower()
    for kind, parts in KINDS:
        if any(part in op for part in parts):
            return kind
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="+", help="config file(s) and --key value overrides, as for train.py")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--trace", default=None, help="also write a Chrome trace (chrome://tracing) here")
    opts, overrides = parser.parse_known_args()
    keep_freed_memory_in_process()
    args = load_config(opts.config, overrides)
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    import train  # the task exactly as train.py builds it

    task = train.build_task(args, dist, train.build_parallel_dims(dist, 1))
    model = task.model
    optimizer = build_optimizer(model, args.lr, tuple(args.optimizer.params.betas), args.optimizer.params.eps,
                                args.weight_decay, dist.device, task.lr_scales())

    def step(index: int) -> None:
        for micro in range(args.gradient_accumulation_steps):
            loss, _ = task.loss(model, task.train_batch(index, micro))
            (loss / args.gradient_accumulation_steps).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    for i in range(2):
        step(i)
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities) as profile:
        for i in range(opts.steps):
            step(2 + i)
    events = profile.key_averages()
    by_kind: dict[str, float] = defaultdict(float)
    ops = [e for e in events if e.key.startswith("aten::")]
    for event in ops:
        by_kind[kind_of(event.key)] += event.self_cpu_time_total
    total = sum(by_kind.values())
    print(f"{' '.join(opts.config + overrides)}: {opts.steps} steps, {total / 1e3 / opts.steps:.1f} ms of aten ops "
          f"per step, {torch.get_num_threads()} threads")
    print(f"{'kind':<40}{'ms/step':>10}{'share':>8}")
    for kind, micros in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"{kind:<40}{micros / 1e3 / opts.steps:>10.1f}{micros / total:>8.1%}")
    print()
    print(f"{'top ops by self time':<40}{'kind':<28}{'ms/step':>10}{'calls/step':>12}")
    for event in sorted(ops, key=lambda e: -e.self_cpu_time_total)[:opts.top]:
        print(f"{event.key[:39]:<40}{kind_of(event.key):<28}{event.self_cpu_time_total / 1e3 / opts.steps:>10.1f}"
              f"{event.count / opts.steps:>12.0f}")
    if opts.trace:
        profile.export_chrome_trace(opts.trace)
        print(f"trace: {opts.trace}")


if __name__ == "__main__":
    main()
