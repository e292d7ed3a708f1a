"""Sparse upcycling (docs/huggingface.md): dense -> MoE (whole or fine-grained experts), MoE -> StructMoE, with
the same function at step 0.

    python tools/upcycle.py runs/tiny runs/tiny_moe configs/upcycle/tiny_moe.yml
    python train.py configs/tiny.yml configs/upcycle/tiny_moe.yml --load runs/tiny_moe --save runs/tiny_moe
    python tools/upcycle.py runs/tiny_llama runs/tiny_llama_ds configs/upcycle/llama_to_deepseek.yml

SOURCE is a save folder (its `latest`) or a global_stepN folder; the YAML files (configs/upcycle/: overlays,
not whole configs) hold the keys that change (experts, top-k, LoREs), and `--key value` pairs override more.
The target is the source's config with those keys, written as OUTPUT/global_step0 (+ latest); its config.yml
saves, loads and logs under OUTPUT, so `python train.py OUTPUT/global_step0/config.yml` also continues it.
`--router_std` (default 0.1 x init_method_std) draws the new routers.

Granular upcycling (megatron/model/upcycle.py): `--granularity G` cuts each dense MLP of width F into G shards
of F/G along its intermediate dimension (it sets moe_ffn_hidden_size F/G; an overlay's moe_ffn_hidden_size does
the same, G = F / moe_ffn_hidden_size; default: G = 1, experts as wide as the MLP); `--shared-experts S`
(moe_num_shared_experts) makes shards 0..S-1 one always-on shared expert. The other R = G - S shards are the
routed experts, E / R copies of each, in virtual groups of R consecutive experts that share one random router
row, and every routed down-projection is multiplied by R: with top-k a multiple of R and renormalised (or
sigmoid) gates the upcycled model equals its source exactly. Refused in one line: F not a multiple of G,
E not a multiple of R, S >= G, and (unless `--allow-inexact`) top-k not a multiple of R or unnormalised gates.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the package is the repo's
    sys.path.insert(0, str(REPO))

from megatron.config import ConfigError, load_config, parse_command_line  # noqa: E402
from megatron.data.tokenizer import vocab_size_of  # noqa: E402
from megatron.model.build import build_gpt  # noqa: E402
from megatron.model.upcycle import UpcycleError, check_exact, shard_plan, upcycle_weights  # noqa: E402
from megatron.outputs import check_output_folder, new_output_folder  # noqa: E402
from megatron.training.pretrained import load_pretrained  # noqa: E402
from megatron.training.seed_checkpoint import write_step0_checkpoint  # noqa: E402


def yaml_overrides(paths: list[str]) -> list[str]:
    """The keys of YAML files as `--key value` pairs (values as JSON, which the override parser reads as YAML)."""
    pairs: list[str] = []
    for path in paths:
        for key, value in (yaml.safe_load(Path(path).read_text()) or {}).items():
            pairs += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return pairs


def named(changes: list[str], key: str) -> bool:
    """Whether `--key value` pairs set `key` (dashes or underscores)."""
    return any(c.startswith("-") and c.lstrip("-").replace("-", "_") == key for c in changes)


def upcycle(source: str | Path, out: str | Path, changes: list[str], router_std: float | None = None,
            seed: int = 0, granularity: int | None = None, shared_experts: int | None = None,
            allow_inexact: bool = False) -> Path:
    src_args, src, path = load_pretrained(source)
    out = check_output_folder(Path(out).resolve())  # before any work: a folder in use is refused at once
    saved = yaml.safe_load((path / "config.yml").read_text())
    per_rank = saved["train_micro_batch_size_per_gpu"] * saved["gradient_accumulation_steps"]
    world = saved["train_batch_size"] // per_rank  # the source run's data-parallel size, for the batch check
    places = ["--save", str(out), "--load", str(out), "--log_dir", str(out / "logs")]
    if src_args.tensorboard_dir:
        places += ["--tensorboard_dir", str(out / "tensorboard")]
    dense = [b.mlp for b in src.blocks if hasattr(b.mlp, "down")]
    # F, of a dense source (a gated MLP's is not intermediate_size); an MoE source keeps its moe_ffn_hidden_size
    width = dense[0].down.weight.shape[1] if len(dense) == len(src.blocks) else None
    if granularity is not None:  # wins over an overlay's moe_ffn_hidden_size (main refuses both on the command line)
        if width is None:
            raise UpcycleError(f"--granularity {granularity}: the source is an MoE model; granular upcycling cuts the "
                               "MLPs of a dense one")
        if granularity < 1 or width % granularity:
            raise UpcycleError(f"--granularity {granularity}: the dense MLP's width {width} is not a multiple of it")
        places += ["--moe_ffn_hidden_size", str(width // granularity)]
    elif width is not None and not named(changes, "moe_ffn_hidden_size"):
        places += ["--moe_ffn_hidden_size", str(width)]  # granularity 1: experts as wide as the dense MLP
    if shared_experts is not None:
        places += ["--moe_num_shared_experts", str(shared_experts)]
    args = load_config([str(path / "config.yml")], [*changes, *places], data_parallel_size=world)
    if args.moe_num_experts <= 1:
        raise ConfigError("moe_num_experts: the target is dense; upcycling needs moe_num_experts > 1")
    check_exact(args)
    plan = None
    if width is not None:  # the layout, checked before any model is built
        plan = shard_plan(width, args.moe_ffn_hidden_size, args.moe_num_experts, args.moe_num_shared_experts)
    vocab = vocab_size_of(args)
    torch.manual_seed(seed)
    dst = build_gpt(args, vocab)
    std = 0.1 * args.init_method_std if router_std is None else router_std
    fresh = upcycle_weights(src, dst, std, torch.Generator().manual_seed(seed), allow_inexact)
    layout = f" ({plan.describe()})" if plan is not None else ""
    print(f"upcycled {path} -> {out}{layout}; initialised, not copied: {', '.join(fresh) or 'nothing'}")
    with new_output_folder(out) as staging:  # all or nothing: a failure leaves no half-written OUTPUT
        written = write_step0_checkpoint(args, dst, staging)
    return out / written.name


def pop_option(argv: list[str], names: tuple[str, ...], flag: bool = False) -> tuple[str | bool | None, list[str]]:
    """The value of the tool's own option `names` (a flag: whether it is there) and argv without it."""
    for i, arg in enumerate(argv):
        if arg in names:
            if flag:
                return True, argv[:i] + argv[i + 1:]
            if i + 1 >= len(argv):
                raise ConfigError(f"{arg}: expected a value")
            return argv[i + 1], argv[:i] + argv[i + 2:]
    return (False if flag else None), argv


def main(argv: list[str]) -> Path:
    try:
        router_std, argv = pop_option(argv, ("--router_std", "--router-std"))
        granularity, argv = pop_option(argv, ("--granularity",))
        shared, argv = pop_option(argv, ("--shared-experts", "--shared_experts"))
        allow_inexact, argv = pop_option(argv, ("--allow-inexact", "--allow_inexact"), flag=True)
        positional = [a for a in argv[:2] if not a.startswith("-")]
        if len(positional) < 2:
            sys.exit(__doc__)
        files, overrides = parse_command_line(argv[2:])
        for option, value, key in (("--granularity", granularity, "moe_ffn_hidden_size"),
                                   ("--shared-experts", shared, "moe_num_shared_experts")):
            if value is not None and named(overrides, key):
                raise ConfigError(f"{option} {value} and --{key}: give one of them (the option sets the key)")
        return upcycle(argv[0], argv[1], yaml_overrides(files) + overrides,
                       None if router_std is None else float(router_std),
                       granularity=None if granularity is None else int(granularity),
                       shared_experts=None if shared is None else int(shared), allow_inexact=allow_inexact)
    except (ConfigError, OSError, ValueError) as err:
        sys.exit(f"upcycle: {err}")


if __name__ == "__main__":
    main(sys.argv[1:])
