"""Total and active parameters of a config, by part, computed in closed form (no model is built).

    python tools/count_params.py configs/125M_structmoe.yml [more.yml] [--key value ...] [--json]
    python tools/count_params.py --families [--json-out docs/results/family_sizes.json]
    python tools/count_params.py --markdown docs/results/family_sizes.json

`active` is what one token computes with, the input embedding table included (GPT-NeoX's convention);
`active_no_embed` leaves the input embedding out, as published "activated" counts do (DeepSeek-V3's 37B,
gpt-oss's 5.1B). Multi-token prediction modules are training-only: `total` leaves them out and `mtp` counts
them (the embedding and head they share with the model not again). `--families` counts every config in
configs/families/ and prints the table docs/architectures.md quotes (`--json-out` writes it; `--markdown`
reprints a written one).

GPT-NeoX's own configs load as NeoX runs them; the GPT-NeoX keys ignored are listed on stderr. Without the
tokenizer file, give the unpadded vocabulary (it is padded as NeoX pads it), e.g. Pythia-70M:

    python tools/count_params.py tests/data/neox/pythia/70M.yml tests/data/neox/local_setup.yml --vocab_size 50277
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the package is the repo's
    sys.path.insert(0, str(REPO))

from megatron.config import ConfigError, load_config, parse_command_line  # noqa: E402
from megatron.sizing.params import ParamCounts, count_parameters  # noqa: E402

PARTS = ("embeddings", "attention", "norms", "dense_mlp", "shared_experts", "experts", "lores", "routers")
FAMILIES = REPO / "configs" / "families"
FAMILIES_COMMAND = "python tools/count_params.py --families --json-out docs/results/family_sizes.json"


def format_count(n: int) -> str:
    return f"{n / 1e12:.3f}T" if n >= 1e12 else f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def report(counts: ParamCounts) -> list[str]:
    """The printed table: the parts, the total, the active counts per token and any MTP modules."""
    lines = [f"{'part':<16}{'parameters':>18}"]
    row = lambda name, value, note="": f"{name:<16}{value:>18,}  {format_count(value):>9}{note}"  # noqa: E731
    lines += [row(part, getattr(counts, part)) for part in PARTS]
    lines.append(row("total", counts.total, "  (MTP modules apart)" if counts.mtp else ""))
    lines.append(row("active", counts.active, "  (per token, input embedding included)"))
    lines.append(row("active_no_embed", counts.active_without_input_embeddings,
                     "  (per token, input embedding left out, as published)"))
    if counts.mtp:
        lines.append(row("mtp", counts.mtp, "  (multi-token prediction modules, training only)"))
        lines.append(row("mtp_active", counts.active_mtp, "  (per token)"))
        lines.append(row("total_with_mtp", counts.total_with_mtp))
    return lines


def family_sizes() -> dict:
    """Every configs/families/*.yml counted: {"command", "models": {name: {config, total, active, ...}}}."""
    models = {}
    for path in sorted(FAMILIES.glob("*.yml")):
        counts = count_parameters(load_config([str(path)]))
        models[path.stem] = {"config": str(path.relative_to(REPO)), "total": counts.total, "active": counts.active,
                             "active_without_input_embeddings": counts.active_without_input_embeddings,
                             "mtp": counts.mtp, "active_mtp": counts.active_mtp}
    return {"command": FAMILIES_COMMAND, "models": models}


def markdown(sizes: dict) -> str:
    """The table of totals and active counts docs/architectures.md quotes, from family_sizes' JSON."""
    lines = ["| config | total | active per token | active, input embedding left out | MTP modules (training) |",
             "|---|---:|---:|---:|---:|"]
    for m in sizes["models"].values():
        mtp = f"{m['mtp']:,} ({format_count(m['mtp'])})" if m["mtp"] else ""
        lines.append(f"| `{m['config']}` | {m['total']:,} ({format_count(m['total'])}) | {m['active']:,} "
                     f"({format_count(m['active'])}) | {m['active_without_input_embeddings']:,} "
                     f"({format_count(m['active_without_input_embeddings'])}) | {mtp} |")
    return "\n".join(lines)


def flag_value(argv: list[str], flag: str) -> str | None:
    """The value after `flag`, None without the flag; a flag without a value is one line."""
    if flag not in argv:
        return None
    at = argv.index(flag) + 1
    if at >= len(argv) or argv[at].startswith("--"):
        sys.exit(f"count_params: {flag} needs a file name")
    return argv[at]


def families(argv: list[str]) -> None:
    out = flag_value(argv, "--json-out")
    sizes = family_sizes()
    if out:
        Path(out).write_text(json.dumps(sizes, indent=2) + "\n")
    print(markdown(sizes))


def main(argv: list[str]) -> None:
    if "--families" in argv:
        families(argv)
        return
    if "--markdown" in argv:
        path = flag_value(argv, "--markdown")
        try:
            print(markdown(json.loads(Path(path).read_text())))
        except (OSError, ValueError, KeyError) as err:
            sys.exit(f"count_params: --markdown {path}: expected a JSON file written by --families --json-out ({err})")
        return
    as_json = "--json" in argv
    argv = [a for a in argv if a != "--json"]
    try:
        paths, overrides = parse_command_line(argv)
        counts = count_parameters(load_config(paths, overrides))
    except (ConfigError, FileNotFoundError, ValueError) as err:
        sys.exit(f"count_params: {err}")
    if as_json:
        print(json.dumps(counts.as_dict(), indent=2))
        return
    print("\n".join(report(counts)))


if __name__ == "__main__":
    main(sys.argv[1:])
