"""Loss and perplexity of a checkpoint on any prepared corpus (GPT-NeoX .bin/.idx), e.g. a held-out one.

    python tools/evaluate.py runs/tiny --data data/held_out_text_document [--seq-length 128]
        [--batches 50] [--batch-size 8] [--json]

Windows of seq_length + 1 tokens are read in order from the start of the corpus (megatron/evaluation/
lm_loss.py); --batches omitted: every window. seq_length defaults to the run's.
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
from megatron.evaluation.lm_loss import corpus_loss  # noqa: E402
from megatron.training.pretrained import load_pretrained  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a save folder (its `latest` is read) or one global_stepN folder")
    parser.add_argument("--data", required=True, help="the corpus prefix (PREFIX.bin, PREFIX.idx)")
    parser.add_argument("--seq-length", type=int, default=None)
    parser.add_argument("--batches", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    opts = parser.parse_args(argv)
    try:
        args, model, path = load_pretrained(opts.checkpoint)
        if args.model_type != "gpt":
            raise ConfigError(f"{path}: model_type {args.model_type}: evaluate.py measures language models")
        seq_length = opts.seq_length or args.seq_length
        if seq_length > args.max_position_embeddings:
            raise ConfigError(f"--seq-length {seq_length} > the model's max_position_embeddings "
                              f"{args.max_position_embeddings}")
        result = corpus_loss(model, opts.data, seq_length, opts.batch_size, opts.batches, model.cfg.vocab_size)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        sys.exit(f"evaluate: {err}")
    result = {"checkpoint": str(path), "data": opts.data, "seq_length": seq_length, **result}
    if opts.json:
        print(json.dumps(result))
    else:
        print(f"{path}: loss {result['loss']:.4f}, perplexity {result['ppl']:.2f} over {result['tokens']} tokens "
              f"({result['windows']} windows of {seq_length}) of {opts.data}")
    return result


if __name__ == "__main__":
    main()
