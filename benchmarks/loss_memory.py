"""Peak memory of the LM head + loss (forward and backward), full logits against `loss_chunk_tokens`.

    python benchmarks/loss_memory.py                        # the 410M config's head: d=1024, vocab 128256, bf16
    python benchmarks/loss_memory.py --tokens 16384         # its whole micro-batch, 8 x 2048 (needs ~20 GB)
    python benchmarks/loss_memory.py --dtype float32 --json docs/results/loss_memory.json   # the figures docs quote

Each variant runs in a fresh process; its peak resident memory (ru_maxrss) during the loss's forward and
backward, minus the memory held before (hidden states, head weight and its gradient buffer, targets), is the
loss's own peak. The default takes 1/4 of the 410M micro-batch (4096 tokens); the logits-sized buffers scale
linearly with tokens, the chunked path's do not. Also prints both losses.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys
import torch, torch.nn.functional as F
sys.path.insert(0, {repo!r})
from megatron.model.loss import lm_loss
tokens, hidden, vocab, chunk = {tokens}, {hidden}, {vocab}, {chunk}
torch.manual_seed(0)
dtype = getattr(torch, {dtype!r})
h = torch.empty(tokens, hidden, dtype=dtype).normal_(0, 0.02).requires_grad_()  # in place: no transient copies
w = torch.empty(vocab, hidden, dtype=dtype).normal_(0, 0.02).requires_grad_()
w.grad = torch.zeros_like(w)  # the weight gradient both paths need (it does not grow with tokens): held before
targets = torch.randint(vocab, (tokens,))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
loss = lm_loss(h, w, targets, chunk)
loss.backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"loss": loss.item(), "peak_mib": (peak - before) / 1024}}))
"""


def measure(tokens: int, hidden: int, vocab: int, chunk: int, dtype: str) -> dict:
    code = CHILD.format(repo=str(REPO), tokens=tokens, hidden=hidden, vocab=vocab, chunk=chunk, dtype=dtype)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--chunk", type=int, default=256, help="loss_chunk_tokens")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="the head's dtype (float32 is much faster on CPUs without bf16 matmul units)")
    parser.add_argument("--json", default=None, help="also write the settings and both measurements to this path")
    opts = parser.parse_args()
    full = measure(opts.tokens, opts.hidden, opts.vocab, 0, opts.dtype)
    chunked = measure(opts.tokens, opts.hidden, opts.vocab, opts.chunk, opts.dtype)
    logits_mib = opts.tokens * opts.vocab * (2 if opts.dtype == "bfloat16" else 4) / 2**20
    print(f"LM head + loss, {opts.tokens} tokens, d={opts.hidden}, vocab {opts.vocab}, {opts.dtype} (logits alone: "
          f"{logits_mib:.0f} MiB)")
    print(f"full logits                 peak {full['peak_mib']:>8.0f} MiB   loss {full['loss']:.6f}")
    print(f"chunks of {opts.chunk:<6} tokens     peak {chunked['peak_mib']:>8.0f} MiB   loss {chunked['loss']:.6f}")
    print(f"chunked / full peak memory  {chunked['peak_mib'] / full['peak_mib']:.3f}  (target <= 0.25)")
    if opts.json:
        result = {"tokens": opts.tokens, "hidden": opts.hidden, "vocab": opts.vocab, "chunk": opts.chunk,
                  "dtype": opts.dtype, "full": full, "chunked": chunked}
        Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {opts.json}")


if __name__ == "__main__":
    main()
