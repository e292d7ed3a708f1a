"""Rank discovery from the launchers' environments."""

from pathlib import Path

from megatron.parallel.distributed import ranks_from_env


def test_ranks_from_each_launcher():
    assert ranks_from_env({}) == (0, 1, 0)
    assert ranks_from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == (3, 8, 1)
    assert ranks_from_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "2"}) == (5, 16, 2)
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    assert ranks_from_env(env) == (1, 2, 1)
    # torchrun's variables win when a SLURM job runs torchrun
    both = {"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert ranks_from_env(both) == (0, 2, 0)


def test_cpu_allocator_setting_takes_effect_on_glibc():
    import platform
    import sys

    from megatron.runtime import keep_freed_memory_in_process

    expected = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory_in_process() == expected


def _block_input_dtypes_under_fsdp2_bf16(rank: int, world: int, out: str) -> None:
    import torch

    from megatron.model.gpt import GPT, GPTConfig
    from megatron.parallel import DistInfo
    from megatron.parallel.data_parallel import ParallelModel
    from megatron.parallel.mesh import build_parallel_dims

    torch.manual_seed(0)
    # RMSNorm: CPU autocast does not run LayerNorm in fp32 as CUDA's does (it refuses fp32 input, bf16 weight)
    model = GPT(GPTConfig(vocab_size=64, num_layers=3, hidden_size=16, num_attention_heads=2,
                          max_position_embeddings=8, norm="rmsnorm"))
    dims = build_parallel_dims(DistInfo(rank, world, rank, torch.device("cpu")), 1)
    ParallelModel(model, dims, zero_stage=1, param_dtype=torch.bfloat16)
    seen = []
    for block in model.blocks:  # hooks added after FSDP2's own run after its input cast
        block.register_forward_pre_hook(lambda module, args: seen.append(str(args[0].dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(torch.randint(64, (2, 8)))
    logits.float().sum().backward()
    if rank == 0:
        Path(out).write_text(",".join(seen))


def test_fsdp2_bf16_params_keep_the_residual_stream_fp32(tmp_path):
    """FSDP2 computes in bf16 weights, but hands each block the fp32 residual stream as DDP under autocast
    does (its default cast_forward_inputs would round it to bf16 at every block)."""
    from helpers.distributed import run_on_ranks

    run_on_ranks(_block_input_dtypes_under_fsdp2_bf16, 2, str(tmp_path / "dtypes"))
    assert (tmp_path / "dtypes").read_text() == ",".join(["torch.float32"] * 3)
