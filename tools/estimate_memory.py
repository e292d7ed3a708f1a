"""Memory per rank of a config at a layout (GiB), from megatron.sizing.memory; nothing is allocated.

    python tools/estimate_memory.py configs/410M_structmoe.yml --world 8 --ep 8 --zero 1 --gpu-gb 40
    python tools/estimate_memory.py configs/410M_structmoe.yml --layouts [--worlds 8,16,64] [--eps 1,8]
        [--stages 0,1,3] [--gpu-gb 40]

The config is loaded as train.py would at that world size (the micro-batch can depend on it); its own
moe_expert_parallel_size and zero_stage are replaced by --ep and --zero. `ddp_extra` is what DDP holds
beyond the estimate (gradient buckets, autocast's 16-bit weight copies; 0 under FSDP2). A GPU of
--gpu-gb GiB is taken to fit a layout when peak + ddp_extra + --reserve-gb (CUDA context, NCCL buffers,
allocator fragmentation) <= it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the package is the repo's
    sys.path.insert(0, str(REPO))

from megatron.config import ConfigError, load_config  # noqa: E402
from megatron.parallel.expert_parallel import check_ep_layout  # noqa: E402
from megatron.sizing.memory import (  # noqa: E402
    MemoryEstimate,
    ddp_overhead_bytes,
    estimate_memory,
    kv_cache_bytes_per_token,
)
from megatron.sizing.params import count_parameters  # noqa: E402

GIB = 1024**3
COLUMNS = ("params", "grads", "optimizer", "state", "gathered", "activations", "peak", "ddp_extra")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        sys.exit(f"estimate_memory: {message}")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = _Parser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", help="config .yml files, merged in order")
    parser.add_argument("--world", type=int, help="ranks (GPUs)")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size (default 1)")
    parser.add_argument("--zero", type=int, choices=(0, 1, 2, 3),
                        help="ZeRO stage: 0 DDP, 1/2 FSDP2, 3 FSDP2 resharding after forward")
    parser.add_argument("--gpu-gb", type=float, help="GPU memory in GiB: say whether each layout fits")
    parser.add_argument("--reserve-gb", type=float, default=2.0,
                        help="GiB kept back for the CUDA context, NCCL and fragmentation (default 2)")
    parser.add_argument("--layouts", action="store_true", help="a table of several layouts instead of one")
    parser.add_argument("--worlds", type=_int_list, default=[8, 16, 64], help="with --layouts (default 8,16,64)")
    parser.add_argument("--eps", type=_int_list, default=[1, 8], help="with --layouts (default 1,8)")
    parser.add_argument("--stages", type=_int_list, default=[0, 1, 3], help="with --layouts (default 0,1,3)")
    args = parser.parse_args(argv)
    for path in args.configs:
        if not path.endswith((".yml", ".yaml")):
            parser.error(f"{path}: expected a .yml/.yaml config file")
    if args.layouts:
        if max(args.stages) > 3:
            parser.error(f"--stages {','.join(map(str, args.stages))}: stages are 0, 1, 2 or 3")
    else:
        if args.world is None or args.zero is None:
            parser.error("give --world W and --zero S (and --ep EP), or --layouts")
        if args.world < 1:
            parser.error(f"--world {args.world} must be >= 1")
    if args.gpu_gb is not None and args.gpu_gb <= 0:
        parser.error(f"--gpu-gb {args.gpu_gb:g} must be positive")
    return args


def load(paths: list[str], world: int, zero: int):
    """The config as train.py resolves it on `world` ranks (EP set to 1 here: --ep is checked separately)."""
    return load_config(paths, ["--moe_expert_parallel_size", "1", "--zero_stage", str(zero)], data_parallel_size=world)


def check_ep(config, world: int, ep: int) -> str | None:
    """Why this EP cannot run this config on `world` ranks, naming the flags, or None."""
    try:
        check_ep_layout(ep, config.moe_num_experts, world, "--ep", "--world")
    except ValueError as err:
        return str(err)
    return None


def gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def verdict(estimate: MemoryEstimate, extra: int, gpu_gb: float | None, reserve_gb: float) -> str:
    if gpu_gb is None:
        return ""
    headroom = gpu_gb - reserve_gb - (estimate.peak_bytes() + extra) / GIB
    return f"fits ({headroom:.1f} GiB spare)" if headroom >= 0 else f"does not fit ({-headroom:.1f} GiB over)"


def header(config, paths: list[str]) -> str:
    counts = count_parameters(config)
    experts = counts.experts + counts.lores
    mtp = f" + {counts.mtp / 1e9:.3f}B in MTP modules" if counts.mtp else ""
    return (f"{' + '.join(paths)}: {counts.total / 1e9:.3f}B parameters ({experts / 1e9:.3f}B in experts and LoREs)"
            f"{mtp}, precision {config.precision}, micro-batch {config.train_micro_batch_size_per_gpu} x seq "
            f"{config.seq_length}, checkpoint_activations {str(config.checkpoint_activations).lower()}\n"
            f"{kv_cache_line(config)}")


def kv_cache_line(config) -> str:
    """What generation's cache costs per token and for one seq_length-long sequence, in bf16."""
    per_token = kv_cache_bytes_per_token(config)
    what = ("latent + shared rope key: multi-head latent attention" if config.kv_lora_rank is not None
            else "keys + values")
    return (f"KV cache for generation (bf16, {what}): {per_token:,} bytes per token over {config.num_layers} layers, "
            f"{per_token * config.seq_length / GIB:.2f} GiB per {config.seq_length}-token sequence")


def one_layout(args: argparse.Namespace) -> None:
    where = f"--world {args.world} --ep {args.ep} --zero {args.zero}"
    try:
        config = load(args.configs, args.world, args.zero)
    except (ConfigError, FileNotFoundError) as err:
        sys.exit(f"estimate_memory: {where}: {err}")
    problem = check_ep(config, args.world, args.ep)
    if problem:
        sys.exit(f"estimate_memory: {problem}")
    try:
        estimate = estimate_memory(config, args.world, args.ep, args.zero)
        extra = ddp_overhead_bytes(config, args.world, args.ep, args.zero)
    except ValueError as err:
        sys.exit(f"estimate_memory: {where}: {err}")
    print(header(config, args.configs))
    kind = "DDP" if args.zero == 0 or args.world == 1 else f"FSDP2 stage {args.zero}"
    print(f"layout: {args.world} ranks, expert-parallel {args.ep}, {kind}; GiB on the most loaded rank")
    notes = {"activations": "rough estimate", "ddp_extra": "DDP buckets + autocast weight copies, not in peak"}
    for name, value in zip(COLUMNS, row_values(estimate, extra)):
        print(f"  {name:<12}{value:>8}" + (f"  ({notes[name]})" if name in notes else ""))
    if args.gpu_gb is not None:
        fits = verdict(estimate, extra, args.gpu_gb, args.reserve_gb)
        print(f"{args.gpu_gb:g} GiB GPU, {args.reserve_gb:g} GiB reserved, peak + ddp_extra: {fits}")


def row_values(e: MemoryEstimate, extra: int) -> list[str]:
    return [gib(v) for v in (e.params_bytes, e.grads_bytes, e.optimizer_bytes, e.state_bytes(),
                             e.gathered_params_bytes, e.activations_bytes, e.peak_bytes(), extra)]


def layout_table(args: argparse.Namespace) -> None:
    fit_column = args.gpu_gb is not None
    titles = ["world", "ep", "stage", *COLUMNS] + (["fits"] if fit_column else [])
    rows, notes, described = [], [], False
    for world in args.worlds:
        for zero in args.stages:
            try:
                config = load(args.configs, world, zero)
            except (ConfigError, FileNotFoundError) as err:
                notes.append(f"--world {world}: {err}")
                break
            if not described:
                print(header(config, args.configs))
                described = True
            for ep in args.eps:
                if check_ep(config, world, ep):
                    continue  # not a layout of this config
                cells = [str(world), str(ep), "DDP" if zero == 0 else str(zero)]
                try:
                    estimate = estimate_memory(config, world, ep, zero)
                    extra = ddp_overhead_bytes(config, world, ep, zero)
                except ValueError as err:
                    notes.append(str(err))
                    rows.append(cells + ["n/a"] * (len(titles) - len(cells)))
                    continue
                fits = verdict(estimate, extra, args.gpu_gb, args.reserve_gb).split(" (")[0] if fit_column else None
                rows.append(cells + row_values(estimate, extra) + ([fits] if fit_column else []))
    if not rows:
        sys.exit("estimate_memory: no layout of --worlds/--eps/--stages applies to this config"
                 + (f" ({notes[0]})" if notes else ""))
    widths = [max(len(t), *(len(r[i]) for r in rows)) for i, t in enumerate(titles)]
    rule = f"; fits: peak + ddp_extra + {args.reserve_gb:g} GiB reserve <= {args.gpu_gb:g} GiB" if fit_column else ""
    print(f"GiB per rank (most loaded rank); activations are a rough estimate; ddp_extra is not in peak{rule}")
    print("  ".join(t.rjust(w) for t, w in zip(titles, widths)))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    for note in dict.fromkeys(notes):  # once each
        print(f"n/a: {note}")


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.layouts:
        layout_table(args)
    else:
        one_layout(args)


if __name__ == "__main__":
    main(sys.argv[1:])
