"""The run's layout: world = expert-data-parallel x expert-parallel, and the meshes and groups it implies.

Ranks are laid out EP-minor (rank = edp_index * EP + ep_index), so an EP group is EP consecutive ranks:
on GPUs, the token exchange stays inside a node whenever EP <= GPUs per node.

- Non-expert parameters are replicated (DDP) or sharded (FSDP2) over the whole world (`world_mesh`).
- Expert parameters live on one EP rank and are replicated or sharded over the ranks holding the same
  experts (`expert_mesh["edp"]`); tokens move between the EP ranks (`expert_mesh["ep"]`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from megatron.parallel.distributed import DistInfo, subgroup_backend_override
from megatron.parallel.expert_parallel import ExpertParallel, check_ep_layout


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    ep_size: int
    rank: int
    world_mesh: DeviceMesh | None = None  # None on one rank
    expert_mesh: DeviceMesh | None = None  # ("edp", "ep"); None on one rank

    @property
    def edp_size(self) -> int:
        """How many ranks hold each expert (its data-parallel replicas)."""
        return self.world_size // self.ep_size

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size

    def expert_parallel(self) -> ExpertParallel | None:
        """The EP group for the MoE layers, or None when every rank holds every expert."""
        if self.ep_size == 1:
            return None
        return ExpertParallel(self.ep_size, self.ep_rank, self.expert_mesh["ep"].get_group())


def build_parallel_dims(dist_info: DistInfo, ep_size: int = 1) -> ParallelDims:
    """Meshes for this run; call after `init_distributed` (they build process groups)."""
    check_ep_layout(ep_size, world_size=dist_info.world_size)
    if not dist_info.is_distributed:
        return ParallelDims(1, 1, 0)
    device = dist_info.device.type
    meshes = []
    for shape, names in (((dist_info.world_size,), ("dp",)),
                         ((dist_info.world_size // ep_size, ep_size), ("edp", "ep"))):
        # sub-groups get the run's distributed_timeout_minutes too (torch would give them the backend's default)
        meshes.append(init_device_mesh(device, shape, mesh_dim_names=names,
                                       backend_override=subgroup_backend_override(shape, names)))
    return ParallelDims(dist_info.world_size, ep_size, dist_info.rank, *meshes)
