"""Tokenize jsonl/text/parquet files into a GPT-NeoX indexed dataset (PREFIX_{key}_document.bin/.idx).

    python tools/preprocess_data.py --input corpus.jsonl.gz --output-prefix data/mycorpus \
        --tokenizer-type HFTokenizer --vocab-file tokenizer.json --append-eod --workers 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the package is the repo's
    sys.path.insert(0, str(REPO))

from megatron.data.preprocess import preprocess  # noqa: E402


def main() -> None:
    """Parses GPT-NeoX's preprocess_data.py arguments and runs `megatron.data.preprocess.preprocess`."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True,
                        help="comma-separated .jsonl(.gz/.zst), .txt or .parquet files")
    parser.add_argument("--jsonl-keys", nargs="+", default=["text"],
                        help="fields to tokenize (one dataset each)")
    parser.add_argument("--tokenizer-type", required=True,
                        choices=["HFTokenizer", "SPMTokenizer", "GPT2BPETokenizer", "CharLevelTokenizer"])
    parser.add_argument("--vocab-file", default=None)
    parser.add_argument("--merge-file", default=None, help="GPT2BPETokenizer's merges.txt")
    parser.add_argument("--append-eod", action="store_true", help="end every document with the EOD token")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--log-interval", type=int, default=1000,
                        help="documents between progress-bar updates")
    args = parser.parse_args()
    start = time.perf_counter()
    try:
        prefixes = preprocess(args.input.split(","), args.jsonl_keys, args.tokenizer_type, args.vocab_file,
                              args.output_prefix, append_eod=args.append_eod, workers=args.workers,
                              log_interval=args.log_interval, merge_file=args.merge_file)
    except (ValueError, FileNotFoundError, UnicodeDecodeError) as err:  # bad input: one line, no traceback
        sys.exit(f"preprocess_data: error: {err}")
    for key, prefix in prefixes.items():
        print(f"{key}: {prefix}.bin / {prefix}.idx")
    print(f"done in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
