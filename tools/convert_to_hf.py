"""A checkpoint of ours as a Hugging Face folder (docs/huggingface.md).

    python tools/convert_to_hf.py runs/tiny hf/tiny          # SAVE folder (its latest) or a global_stepN folder

A model that GPT-NeoX, a Llama-family class (Llama, Mistral, Qwen3, Mixtral, Qwen3-MoE), DeepSeek-V3 or gpt-oss
computes exactly, by every field of its config, becomes a plain folder of that class; anything else (StructMoE,
LoREs, a sigmoid router without DeepSeek-V3's attention, ...) ships this project's model code, loaded with
trust_remote_code=True. Prints a JSON report: `format` (native or remote_code), `class` (the transformers class
written), `because` (why not native) and `notes` (e.g. DeepSeek-V3's MTP modules, in the folder but not computed
by the class).
A failed export leaves no folder behind; OUT must be new or empty.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the package is the repo's
    sys.path.insert(0, str(REPO))

from megatron.config import ConfigError  # noqa: E402
from megatron.hf.export import convert_to_hf  # noqa: E402
from megatron.runtime import MissingExtra  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a save folder (its `latest` is read) or one global_stepN folder")
    parser.add_argument("output", help="the Hugging Face folder to write")
    opts = parser.parse_args(argv)
    try:
        report = convert_to_hf(opts.checkpoint, opts.output)
    except (ConfigError, OSError, ValueError, MissingExtra) as err:
        sys.exit(f"convert_to_hf: {err}")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
