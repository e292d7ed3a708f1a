"""Rank discovery from the launchers' environments."""

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
