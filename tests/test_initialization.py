"""Initial weights under tensor and pipeline parallelism follow megatron-core's rules.

The trainer's model (`pretrain_moma`'s seeding and build) of every architecture, built from the
same seed:
- CPU initialisation (`use_cpu_initialization`, the trainer's choice on CPU): each TP rank keeps
  its slice of a master weight drawn whole, so the TP2 shards, gathered by global name, equal
  the world-size-1 model bit for bit;
- GPU initialisation (the trainer's choice on CUDA, run here on CPU through the platform's RNG
  stand-ins): split weights come from the model-parallel RNG tracker, a different stream on each
  TP rank, and each pipeline stage has its own seed, so no two TP shards and no two stages'
  layers start as copies.
"""

import pytest
import torch

from megatron_moma.modality import ModalityLayout
from megatron_moma.testing import gpt_runs
from megatron_moma.testing.multiprocess import run_on_ranks
from megatron_moma.testing.trainer_runs import MOMA_2T2I, TINY_TRAINER_FLAGS

LAYOUT = ModalityLayout.text_and_image(32, 63)
PADDED_VOCAB = 256  # the TP2 padding of 64 ids; world size 1 is built with the same size

ARCHITECTURES = {
    "dense": ["--architecture", "dense"],
    "moma": MOMA_2T2I,
    "moma-token-choice": MOMA_2T2I + ["--moma-routing", "token_choice"],
    "mot": ["--architecture", "mot", "--qk-layernorm"],
    "mot+moma": ["--architecture", "mot+moma", "--moma-experts-per-modality", "2", "2"],
    "moma+mod": MOMA_2T2I + ["--mod"],
    "mot+mod": ["--architecture", "mot", "--mod"],
}
TP2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
PP2 = ["--pipeline-model-parallel-size", "2"]


def _build(flags, use_cpu_initialization: bool):
    """This rank's chunks of the trainer's model under `flags`, seeded as the trainer seeds."""
    from megatron_moma.training import configs, loop
    from megatron_moma.training.arguments import parse_args
    from megatron_moma.training.pretrain_moma import set_random_seeds

    args = parse_args(TINY_TRAINER_FLAGS + list(flags) + [
        "--data-path", "unused", "--lr", "1e-3", "--train-iters", "1"],
        world_size=torch.distributed.get_world_size())
    configs.parallel_layout(args).initialize()
    set_random_seeds(args.seed)
    config = configs.transformer_config(args, LAYOUT)
    config.use_cpu_initialization = use_cpu_initialization
    return loop.build_model(args, config, PADDED_VOCAB)


def _global_initial_weights(layout_flags):
    """{architecture: this rank's shards by global name} under CPU initialisation."""
    from megatron.core import parallel_state

    snapshots = {}
    for name, flags in ARCHITECTURES.items():
        snapshots[name] = gpt_runs.snapshot_global_slices(_build(flags + layout_flags, True))
        parallel_state.destroy_model_parallel()
    return snapshots


def _local_initial_weights():
    """{(layout, architecture): {local name: (tensor, split over TP)}} under GPU initialisation."""
    from megatron.core import parallel_state

    weights = {}
    for layout, layout_flags in (("tp2", TP2), ("pp2", PP2)):
        for name, flags in ARCHITECTURES.items():
            chunks = _build(flags + layout_flags, False)
            weights[layout, name] = {
                key: (param.detach().clone(), bool(getattr(param, "tensor_model_parallel", False)))
                for key, param in chunks[0].module.named_parameters()}
            parallel_state.destroy_model_parallel()
    return weights


@pytest.fixture(scope="module")
def world_size_one_weights():
    (snapshots,) = run_on_ranks(_global_initial_weights, 1, [], timeout=120)
    return {name: gpt_runs.assemble_global([snapshot]) for name, snapshot in snapshots.items()}


def test_cpu_initialisation_tp2_gathers_to_the_world_size_one_weights(world_size_one_weights):
    per_rank = run_on_ranks(_global_initial_weights, 2, TP2, timeout=120)
    for name in ARCHITECTURES:
        gathered = gpt_runs.assemble_global([snapshots[name] for snapshots in per_rank])
        expected = world_size_one_weights[name]
        assert sorted(gathered) == sorted(expected), name
        different = [key for key in expected if not torch.equal(gathered[key], expected[key])]
        assert not different, (name, different)


def _is_constant(tensor: torch.Tensor) -> bool:
    return bool((tensor == tensor.reshape(-1)[0]).all())


def test_gpu_initialisation_differs_across_tp_shards_and_pipeline_stages():
    first, second = run_on_ranks(_local_initial_weights, 2, timeout=180)
    for name in ARCHITECTURES:
        tp0, tp1 = first["tp2", name], second["tp2", name]
        split = [key for key, (_, is_split) in tp0.items() if is_split]
        assert any(".weight." in key for key in split) or "mot" not in name, (name, split)
        copies = [key for key in split if torch.equal(tp0[key][0], tp1[key][0])]
        assert not copies, (name, "TP shards start as copies", copies)
        replicated = [key for key, (_, is_split) in tp0.items() if not is_split]
        assert all(torch.equal(tp0[key][0], tp1[key][0]) for key in replicated), name

        stage0, stage1 = first["pp2", name], second["pp2", name]
        layers = [key for key in stage0 if key.startswith("decoder.layers.") and key in stage1
                  and not _is_constant(stage0[key][0])]
        assert layers, name
        copies = [key for key in layers if torch.equal(stage0[key][0], stage1[key][0])]
        assert not copies, (name, "pipeline stages start as copies", copies)
