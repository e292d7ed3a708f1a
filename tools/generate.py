"""Text from a trained GPT checkpoint: the prompt, tokenized with the run's tokenizer, continued token by token.

Shape legend: B prompts, S tokens.

    python tools/generate.py CHECKPOINT --prompt TEXT [--prompt TEXT ...] [--max-new-tokens N] [--temperature T]
                             [--top-k K] [--top-p P] [--seed S] [--no-cache]

CHECKPOINT is a save folder (its latest step) or one global_stepN folder. Temperature 0 is greedy decoding.
--no-cache recomputes the whole sequence each step (slower; the same tokens). Several prompts run as one
batch, left-padded with an attention mask (greedy: each continues as it would alone); their texts are
printed in order, separated by a line of dashes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the package is the repo's
    sys.path.insert(0, str(REPO))

from megatron.config import ConfigError  # noqa: E402
from megatron.data.tokenizer import tokenizer_of  # noqa: E402
from megatron.model.generation import generate, pad_batch  # noqa: E402
from megatron.training.pretrained import load_pretrained  # noqa: E402


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--prompt", required=True, action="append", help="repeat for a batch of prompts")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0: all")
    parser.add_argument("--top-p", type=float, default=1.0, help="keep the nucleus of this probability; 1: all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step")
    opts = parser.parse_args(argv)
    if opts.temperature < 0 or opts.top_k < 0 or not 0 < opts.top_p <= 1:
        parser.error(f"expected --temperature >= 0, --top-k >= 0 and 0 < --top-p <= 1, got {opts.temperature}, "
                     f"{opts.top_k}, {opts.top_p}")
    return opts


def main(argv: list[str]) -> str:
    opts = parse(argv)
    try:
        args, model, _ = load_pretrained(opts.checkpoint)
        if args.model_type != "gpt":
            raise ConfigError(f"{opts.checkpoint}: a {args.model_type} checkpoint (tools/sample_dit.py samples DiTs)")
        tokenizer = tokenizer_of(args)
        prompts = [tokenizer.encode(text) for text in opts.prompt]
        if not all(prompts):
            raise ValueError(f"--prompt: prompt {[bool(p) for p in prompts].index(False) + 1} has no tokens")
        prompt_BS, mask_BS = pad_batch(prompts)  # one prompt: a mask of ones, which the model skips
        tokens, _ = generate(model, prompt_BS, opts.max_new_tokens, opts.temperature, opts.top_k, opts.top_p,
                             torch.Generator().manual_seed(opts.seed), use_cache=not opts.no_cache,
                             vocab_size=tokenizer.vocab_size, attention_mask_BS=mask_BS)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        sys.exit(f"generate: {err}")
    texts = [tokenizer.decode(row[prompt_BS.shape[1] - len(p):].tolist()) for row, p in zip(tokens, prompts)]
    text = "\n----\n".join(texts)
    print(text)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
