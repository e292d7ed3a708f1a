"""How long a checkpoint save stalls training: synchronous DCP save against the asynchronous save's stall
(`async_save: true`: the copy to CPU memory; the write runs on DCP's background thread), side by side in one run.

    python benchmarks/checkpoint_io.py                   # a 12-layer d=768 GPT (the 125M shape) with AdamW state
    python benchmarks/checkpoint_io.py --layers 2 --hidden 256 --repeats 2   # quick

Each repeat saves the same model and optimizer state to a fresh folder under --dir (default: a temporary folder
on the same disk as the system's temp dir) both ways; medians are printed with the stall / synchronous ratio and
a training step's time for scale.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the package is the repo's
    sys.path.insert(0, str(REPO))

from megatron.model.gpt import GPT, GPTConfig  # noqa: E402
from megatron.parallel import DistInfo  # noqa: E402
from megatron.training import checkpoint as ckpt  # noqa: E402
from megatron.training.optim import build_optimizer  # noqa: E402

SINGLE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    opts = parser.parse_args()
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=opts.vocab, num_layers=opts.layers, hidden_size=opts.hidden,
                       num_attention_heads=max(1, opts.hidden // 64), max_position_embeddings=128)
    model = GPT(config)
    optimizer = build_optimizer(model, 1e-4, (0.9, 0.95), 1e-8, 0.1, torch.device("cpu"))
    tokens = torch.randint(opts.vocab, (2, 65))

    def step() -> float:
        start = time.perf_counter()
        logits, _ = model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step()  # creates the AdamW state
    params = sum(p.numel() for p in model.parameters())
    sync_times, stalls, backgrounds, steps = [], [], [], []
    with tempfile.TemporaryDirectory(dir=opts.dir) as root:
        for repeat in range(opts.repeats):
            start = time.perf_counter()
            ckpt.save_checkpoint(Path(root) / f"sync{repeat}", 1, model, optimizer, {}, "", SINGLE)
            sync_times.append(time.perf_counter() - start)

            start = time.perf_counter()
            pending = ckpt.begin_save(Path(root) / f"async{repeat}", 1, model, optimizer, {}, "", SINGLE,
                                      asynchronous=True)
            stalls.append(time.perf_counter() - start)
            steps.append(step())  # training goes on while the background thread writes
            start = time.perf_counter()
            pending.finish()
            backgrounds.append(time.perf_counter() - start)
    sync, stall = statistics.median(sync_times), statistics.median(stalls)
    print(f"GPT {opts.layers} layers, d={opts.hidden}, vocab {opts.vocab}: {params / 1e6:.1f}M parameters + AdamW "
          f"state, {torch.get_num_threads()} threads, median of {opts.repeats}")
    print(f"synchronous save                {sync:8.3f} s")
    print(f"asynchronous save: stall        {stall:8.3f} s   ({stall / sync:.1%} of the synchronous save; "
          "target <= 1%)")
    print(f"asynchronous save: left to wait {statistics.median(backgrounds):8.3f} s after one training step "
          f"({statistics.median(steps):.3f} s)")


if __name__ == "__main__":
    main()
