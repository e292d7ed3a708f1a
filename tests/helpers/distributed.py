"""Helpers for tests that need several ranks: gloo process groups in spawned processes, and torchrun."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[2]


def _entry(rank: int, world_size: int, init_file: str, fn, args) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_on_ranks(fn, world_size: int = 2, *args) -> None:
    """Runs fn(rank, world_size, *args) in `world_size` gloo processes; an assertion in any fails the test.

    fn must be a module-level function (it is pickled by name). Results come back through files.
    """
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(world_size, os.path.join(tmp, "store"), fn, args), nprocs=world_size, join=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(config: Path, nproc: int = 2, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node N train.py CONFIG` on this machine (gloo), raising with its output on failure."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(REPO / "train.py"), str(config), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"torchrun failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def assert_grads_match_one_rank(full, part, label: str = "") -> None:
    """An expert-parallel MoE layer's gradients against the same layer on one rank that saw every batch.

    This rank's experts saw every rank's rows, so their gradients equal the one-rank layer's rows for
    those experts; replicated parameters hold this rank's share, so their sum over ranks equals it.
    Both layers must have run backward in float64 (the tolerance is for rounding only).
    """
    import torch

    full_params = dict(full.named_parameters())
    for name, param in part.named_parameters():
        expected = full_params[name].grad
        if name.startswith(("experts.", "lore.")):
            rows = expected.shape[0] // full.num_experts
            expected, got = expected[part.local_experts.start * rows:part.local_experts.stop * rows], param.grad
        else:
            got = param.grad.clone()
            dist.all_reduce(got)
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-8, msg=lambda m, n=name: f"{label}: {n}: {m}")
