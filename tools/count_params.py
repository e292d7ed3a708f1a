"""Total and active parameters of a config, by part, computed in closed form (no model is built).

    python tools/count_params.py configs/125M_structmoe.yml [more.yml] [--key value ...] [--json]

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
from megatron.sizing.params import count_parameters  # noqa: E402

PARTS = ("embeddings", "attention", "norms", "dense_mlp", "shared_experts", "experts", "lores", "routers")


def format_count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def main(argv: list[str]) -> None:
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
    print(f"{'part':<12}{'parameters':>16}")
    for part in PARTS:
        value = getattr(counts, part)
        print(f"{part:<12}{value:>16,}  {format_count(value):>9}")
    print(f"{'total':<12}{counts.total:>16,}  {format_count(counts.total):>9}")
    print(f"{'active':<12}{counts.active:>16,}  {format_count(counts.active):>9}  (per token)")


if __name__ == "__main__":
    main(sys.argv[1:])
