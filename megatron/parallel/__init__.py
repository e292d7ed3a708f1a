"""Distributed state: process groups, collectives, and (in later issues) expert-parallel exchange."""

from megatron.parallel.distributed import DistInfo, all_reduce_mean, barrier, destroy, init_distributed

__all__ = ["DistInfo", "all_reduce_mean", "barrier", "destroy", "init_distributed"]
