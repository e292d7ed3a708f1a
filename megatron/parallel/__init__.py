"""Distributed state and layouts: process groups and collectives (distributed.py), the device mesh
(mesh.py), the expert-parallel placement and all-to-all exchange (expert_parallel.py), and DDP/FSDP2
wrapping with the expert-gradient reduction (data_parallel.py)."""

from megatron.parallel.distributed import DistInfo, all_reduce_mean, barrier, destroy, init_distributed

__all__ = ["DistInfo", "all_reduce_mean", "barrier", "destroy", "init_distributed"]
