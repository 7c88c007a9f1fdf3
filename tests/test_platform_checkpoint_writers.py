"""megatron_moma.platform.checkpoint_writers: a torch_dist save starts no Manager process and
writes what loads back. (Unpatched, megatron-core's first save leaves its spawned Manager among
`multiprocessing.active_children()`: checked once, 14 s for the spawn, so not kept here.)"""

import multiprocessing

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedTensor

from megatron_moma.platform import checkpoint_writers
from megatron_moma.testing.multiprocess import run_on_ranks


def _save_and_list_helpers(directory: str):
    """Save a [4, 3] tensor split over the ranks; return (helper processes alive, loaded back)."""
    checkpoint_writers.use_in_process_write_results()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    full = torch.arange(12.0).view(4, 3)
    rows = 4 // world

    def state(tensor):
        return {"weight": ShardedTensor.from_rank_offsets("weight", tensor, (0, rank, world))}

    dist_checkpointing.save(state(full[rank * rows:(rank + 1) * rows].clone()), directory)
    helpers = [child.name for child in multiprocessing.active_children()]
    loaded = dist_checkpointing.load(state(torch.zeros(rows, 3)), directory)["weight"]
    return helpers, torch.equal(loaded, full[rank * rows:(rank + 1) * rows])


def test_save_starts_no_helper_process_and_loads_back(tmp_path):
    for helpers, equal in run_on_ranks(_save_and_list_helpers, 2, str(tmp_path)):
        assert helpers == [] and equal


def test_patch_target_exists_in_installed_megatron_core():
    assert checkpoint_writers.check_target() == []
