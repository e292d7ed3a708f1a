"""A Hugging Face GPT-NeoX (Pythia), Llama, Mistral, Mixtral, Qwen3, Qwen3-MoE, DeepSeek-V3 or gpt-oss
folder as our checkpoint, to continue pretraining or upcycle.

    python tools/convert_from_hf.py pythia-160m ckpt/pythia-160m [--key value ...]
    python train.py ckpt/pythia-160m/model.yml my_data.yml --load ckpt/pythia-160m --save runs/pythia

Writes OUTPUT/global_step0 + latest (with config.yml), OUTPUT/model.yml (the model's keys) and the
tokenizer; OUTPUT must be new or empty. `--key value` pairs set keys config.json does not give (the tokenizer,
when the folder has no tokenizer.json: --tokenizer_type, --vocab_file, --merge_file) and are kept in model.yml.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the package is the repo's
    sys.path.insert(0, str(REPO))

from megatron.config import ConfigError  # noqa: E402
from megatron.hf.neox_import import convert_from_hf  # noqa: E402
from megatron.runtime import MissingExtra  # noqa: E402


def main(argv: list[str]) -> Path:
    if len(argv) < 2 or argv[0].startswith("-") or argv[1].startswith("-"):
        sys.exit(__doc__)
    try:
        path = convert_from_hf(argv[0], argv[1], argv[2:])
    except (ConfigError, OSError, ValueError, RuntimeError, MissingExtra) as err:
        sys.exit(f"convert_from_hf: {err}")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
