"""Writes the plain-MoE config whose total parameters match a StructMoE config most closely.

    python tools/match_baseline.py configs/125M_structmoe.yml --output configs/125M_moe_matched.yml

The baseline is the StructMoE config with the LoREs removed and `moe_num_experts` changed; nothing else
(depth, width, schedule, data) moves, so the comparison is fair by construction.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the package is the repo's
    sys.path.insert(0, str(REPO))

from megatron.config import ConfigError, load_config  # noqa: E402
from megatron.config.loader import read_yaml  # noqa: E402
from megatron.config.schema import MoEArgs  # noqa: E402
from megatron.sizing.params import count_parameters  # noqa: E402

LORE_KEYS = tuple(key for key in MoEArgs.model_fields if key.startswith("lore_"))  # every one: none acts without LoREs


def matched_expert_count(args) -> tuple[int, int, int]:
    """(experts, baseline total, StructMoE total): the count whose total is nearest to the target."""
    target = count_parameters(args).total
    plain = args.model_copy(update={"lore_num_experts": 0})
    best = None
    for experts in range(max(2, args.moe_top_k), 4 * args.moe_num_experts * (1 + args.lore_num_experts) + 2):
        total = count_parameters(plain.model_copy(update={"moe_num_experts": experts})).total
        if best is None or abs(total - target) < abs(best[1] - target):
            best = (experts, total)
        if total > target:
            break
    return best[0], best[1], target


def rename_run(path: str | None, suffix: str) -> str | None:
    return None if path is None else str(Path(path).parent / f"{Path(path).name}_{suffix}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--output", help="where to write the baseline config (default: print it)")
    opts = parser.parse_args()
    try:
        args = load_config([opts.config])
        if args.lore_num_experts == 0:
            raise ConfigError(f"{opts.config}: has no LoREs (lore_num_experts is 0): nothing to match")
        experts, total, target = matched_expert_count(args)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        sys.exit(f"match_baseline: {err}")
    residual = total - target
    print(f"StructMoE total {target:,}; plain MoE with {experts} experts: {total:,} "
          f"(residual {residual:+,}, {100 * residual / target:+.2f}%)")
    raw = read_yaml(opts.config)
    for key in LORE_KEYS:
        raw.pop(key, None)
    raw["moe_num_experts"] = experts
    tag = f"matched{experts}"
    for key in ("save", "load", "log_dir", "tensorboard_dir"):
        if raw.get(key):
            renamed = raw[key].replace("structmoe", f"moe_{tag}")
            raw[key] = renamed if renamed != raw[key] else rename_run(raw[key], tag)
    header = (f"# Plain-MoE baseline parameter-matched to {Path(opts.config).name} by tools/match_baseline.py:\n"
              f"# {experts} experts, {total:,} parameters vs {target:,} ({100 * residual / target:+.2f}%).\n")
    text = header + yaml.safe_dump(raw, sort_keys=False)
    if opts.output:
        Path(opts.output).write_text(text)
        print(f"wrote {opts.output}")
    else:
        print(text)


if __name__ == "__main__":
    main()
