"""Train a byte-level BPE tokenizer (a `tokenizers` JSON, usable as HFTokenizer) on your own corpus.

    python tools/train_tokenizer.py --input corpus.jsonl.gz,more.parquet --vocab-size 32000 --output tok.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the package is the repo's
    sys.path.insert(0, str(REPO))

from megatron.data.preprocess import read_documents  # noqa: E402
from megatron.data.tokenizer import train_bpe_tokenizer  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="comma-separated .jsonl(.gz/.zst), .txt or .parquet files")
    parser.add_argument("--jsonl-key", default="text")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--output", required=True)
    opts = parser.parse_args(argv)
    texts = (doc[opts.jsonl_key] for path in opts.input.split(",") for doc in read_documents(path, [opts.jsonl_key]))
    try:
        print(f"wrote {train_bpe_tokenizer(texts, opts.vocab_size, opts.output)}")
    except (ValueError, OSError) as err:  # bad input (pyarrow's errors are ValueErrors): one line, no traceback
        sys.exit(f"train_tokenizer: error: {err}")


if __name__ == "__main__":
    main()
