"""`moma-upcycle` (tools/upcycle.py): a 1t1i or dense checkpoint -> an n-experts-per-modality
MoMa checkpoint (SPEC.md section 5).

Every expert of modality m's new group is a copy of m's single expert (1t1i) or of the dense
MLP; routers and auxiliary routers are fresh, and Gumbel-sigmoid router noise is switched on in
the saved run config. Every other parameter is copied unchanged. A target parameter with no
source, or a source parameter that is not used, is an error naming it: nothing is left at its
random initial value silently. The new checkpoint keeps the iteration and the data position
(consumed samples) and has no optimizer or LR-scheduler state, so `pretrain_moma --load` resumes
from it with a fresh optimizer and the LR schedule started again from step 0.

Runs in one process (the checkpoint's full tensors are read with dist_checkpointing, the new one
written in torch_dist format, which loads under any TP/PP/EP layout).
"""

import argparse
import copy
import re
import sys
from dataclasses import asdict
from typing import Dict, List, Optional

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatron_moma.models import build_gpt_model
from megatron_moma.parallel.layout import ParallelLayout
from megatron_moma.training import checkpointing, configs
from megatron_moma.training.checkpointing import TrainState

EXPERT_KEY = re.compile(r"^(?P<layers>.*)\.mlp\.experts\.(?P<modality>\w+)\.experts\.(?P<linear>linear_fc[12])\.weight$")
FRESH_KEY = re.compile(r"\.mlp\.(routers|aux_routers)\.")


def _target_arguments(saved: Dict, experts_per_modality: List[int]) -> argparse.Namespace:
    args = argparse.Namespace(**copy.deepcopy(saved["arguments"]))
    args.architecture = "mot+moma" if args.architecture.startswith("mot") else "moma"
    args.moma_experts_per_modality = list(experts_per_modality)
    args.moma_gumbel_noise = True
    args.device = "cpu"
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                 "expert_model_parallel_size"):
        setattr(args, name, 1)
    args.sequence_parallel = False
    args.num_layers_per_virtual_pipeline_stage = None
    args.expert_tensor_parallel_size = None
    return args


def _source_tensor(key: str, source: Dict[str, torch.Tensor], experts: int) -> Optional[torch.Tensor]:
    """The full source tensor for target `key` [.., experts, ..] or [..], or None if fresh."""
    if FRESH_KEY.search(key):
        return None
    match = EXPERT_KEY.match(key)
    if match is None:
        return source[key]
    single = source.get(key)
    if single is None:  # dense source: the layer's MLP, [layers, out, in] -> [layers, 1, out, in]
        single = source[f"{match['layers']}.mlp.{match['linear']}.weight"].unsqueeze(1)
    if single.shape[1] != 1:
        raise ValueError(f"{key}: the source has {single.shape[1]} experts in this group; "
                         "upcycling starts from one expert per modality (1t1i) or a dense MLP")
    return single.expand(-1, experts, *single.shape[2:])


def upcycle(load: str, save: str, experts_per_modality: List[int]) -> str:
    """Write the upcycled checkpoint of `load`'s latest iteration under `save`; returns its folder.
    torch.distributed must be initialised with one process."""
    iteration = checkpointing.read_tracker(load)
    if iteration is None:
        raise ValueError(f"{load}: no {checkpointing.TRACKER}")
    directory = checkpointing.checkpoint_dir(load, iteration)
    saved = checkpointing.read_run_config(directory)
    args = _target_arguments(saved, experts_per_modality)
    ParallelLayout().initialize()
    model_parallel_cuda_manual_seed(args.seed)
    vocab = configs.vocabulary(args)
    config = configs.transformer_config(args, configs.modality_layout(vocab))
    model = build_gpt_model(config, saved["padded_vocab_size"], args.max_position_embeddings,
                            position_embedding_type=args.position_embedding_type,
                            rotary_base=args.rotary_base,
                            share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights)
    source = {k: v for k, v in dist_checkpointing.load_plain_tensors(directory).items()
              if isinstance(v, torch.Tensor) and not k.startswith(("optimizer", "chained_"))}
    _copy_into(model, source)
    state = TrainState(**dist_checkpointing.load_common_state_dict(directory)["train_state"])
    run_config = dict(saved, architecture=config.architecture, arguments=vars(args),
                      upcycled_from=directory, world_size=1,
                      parallel_layout=asdict(configs.parallel_layout(args)))
    return checkpointing.save_checkpoint(save, [model], None, None, state, run_config,
                                         save_optimizer=False, save_rng=False)


@torch.no_grad()
def _copy_into(model, source: Dict[str, torch.Tensor]) -> None:
    sharded = model.sharded_state_dict()
    apply_factories(sharded)
    used = set()
    for shard in nested_values(sharded):
        if not isinstance(shard, ShardedTensor) or shard.key.endswith("_extra_state"):
            continue
        experts = shard.global_shape[1] if EXPERT_KEY.match(shard.key) else 1
        try:
            full = _source_tensor(shard.key, source, experts)
        except KeyError as missing:
            raise ValueError(f"target parameter {shard.key} has no source (missing {missing})")
        if full is None:
            continue
        if tuple(full.shape) != tuple(shard.global_shape):
            raise ValueError(f"{shard.key}: source shape {tuple(full.shape)}, target {shard.global_shape}")
        shard.data.copy_(full[shard.global_slice()].reshape(shard.data.shape))
        used.add(shard.key)
        match = EXPERT_KEY.match(shard.key)
        if match and shard.key not in source:
            used.add(f"{match['layers']}.mlp.{match['linear']}.weight")
    unused = sorted(set(source) - used - {k for k in source if FRESH_KEY.search(k)})
    if unused:
        raise ValueError(f"source parameters with no place in the upcycled model: {unused}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moma-upcycle", description=__doc__.split("\n")[0])
    parser.add_argument("--load", required=True, help="checkpoint root of the 1t1i or dense run")
    parser.add_argument("--save", required=True, help="checkpoint root to write the upcycled model")
    parser.add_argument("--moma-experts-per-modality", type=int, nargs="+", required=True,
                        help="experts of each modality group, text first: 4 4 is 4t4i")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from megatron_moma.training.pretrain_moma import initialize_distributed

    args = build_parser().parse_args(argv)
    initialize_distributed("cpu")
    try:
        folder = upcycle(args.load, args.save, args.moma_experts_per_modality)
    except ValueError as error:
        print(f"moma-upcycle: error: {error}", file=sys.stderr)
        return 1
    finally:
        parallel_state.destroy_model_parallel()
    print(f"wrote {folder}: experts per modality {args.moma_experts_per_modality}, resume with "
          f"pretrain_moma --load {args.save} (fresh optimizer, LR schedule from step 0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
