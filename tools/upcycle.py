"""Sparse upcycling (docs/huggingface.md): dense -> MoE, MoE -> StructMoE, with the same function at step 0.

    python tools/upcycle.py runs/tiny runs/tiny_moe configs/upcycle/tiny_moe.yml
    python train.py configs/tiny.yml configs/upcycle/tiny_moe.yml --load runs/tiny_moe --save runs/tiny_moe

SOURCE is a save folder (its `latest`) or a global_stepN folder; the YAML files (configs/upcycle/: overlays,
not whole configs) hold the keys that change (experts, top-k, LoREs), and `--key value` pairs override more.
The target is the source's config with those keys, written as OUTPUT/global_step0 (+ latest); its config.yml
saves, loads and logs under OUTPUT, so `python train.py OUTPUT/global_step0/config.yml` also continues it.
`--router_std` (default 0.1 x init_method_std) draws the new routers.
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
from megatron.model.upcycle import check_exact, upcycle_weights  # noqa: E402
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


def upcycle(source: str | Path, out: str | Path, changes: list[str], router_std: float | None = None,
            seed: int = 0) -> Path:
    src_args, src, path = load_pretrained(source)
    out = check_output_folder(Path(out).resolve())  # before any work: a folder in use is refused at once
    saved = yaml.safe_load((path / "config.yml").read_text())
    per_rank = saved["train_micro_batch_size_per_gpu"] * saved["gradient_accumulation_steps"]
    world = saved["train_batch_size"] // per_rank  # the source run's data-parallel size, for the batch check
    places = ["--save", str(out), "--load", str(out), "--log_dir", str(out / "logs")]
    if src_args.tensorboard_dir:
        places += ["--tensorboard_dir", str(out / "tensorboard")]
    dense = [b.mlp for b in src.blocks if hasattr(b.mlp, "down")]
    if dense and not any(c.lstrip("-").replace("-", "_") == "moe_ffn_hidden_size" for c in changes):
        # experts as wide as the dense MLP (its down-projection's input; a gated MLP's F is not intermediate_size)
        places += ["--moe_ffn_hidden_size", str(dense[0].down.weight.shape[1])]
    args = load_config([str(path / "config.yml")], [*changes, *places], data_parallel_size=world)
    if args.moe_num_experts <= 1:
        raise ConfigError("moe_num_experts: the target is dense; upcycling needs moe_num_experts > 1")
    check_exact(args)
    vocab = vocab_size_of(args)
    torch.manual_seed(seed)
    dst = build_gpt(args, vocab)
    std = 0.1 * args.init_method_std if router_std is None else router_std
    fresh = upcycle_weights(src, dst, std, torch.Generator().manual_seed(seed))
    print(f"upcycled {path} -> {out}; initialised, not copied: {', '.join(fresh) or 'nothing'}")
    with new_output_folder(out) as staging:  # all or nothing: a failure leaves no half-written OUTPUT
        written = write_step0_checkpoint(args, dst, staging)
    return out / written.name


def main(argv: list[str]) -> Path:
    router_std = None
    if "--router_std" in argv:
        i = argv.index("--router_std")
        router_std, argv = float(argv[i + 1]), argv[:i] + argv[i + 2:]
    positional = [a for a in argv[:2] if not a.startswith("-")]
    if len(positional) < 2:
        sys.exit(__doc__)
    try:
        files, overrides = parse_command_line(argv[2:])
        return upcycle(argv[0], argv[1], yaml_overrides(files) + overrides, router_std)
    except (ConfigError, OSError, ValueError) as err:
        sys.exit(f"upcycle: {err}")


if __name__ == "__main__":
    main(sys.argv[1:])
