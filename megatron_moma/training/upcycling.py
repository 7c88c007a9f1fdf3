"""`moma-upcycle` (tools/upcycle.py): a 1t1i or dense checkpoint -> an n-experts-per-modality
MoMa checkpoint (docs/layers.md §5).

Every expert of modality m's new group is a copy of m's single expert (1t1i) or of the dense
MLP; routers and auxiliary routers are fresh, and Gumbel-sigmoid router noise is switched on in
the saved run config. Every other parameter is copied unchanged. A target parameter with no
source, or a source parameter that is not used, is an error naming it: nothing is left at its
random initial value silently. The new checkpoint keeps the iteration and the data position
(consumed samples) and has no optimizer or LR-scheduler state, so `pretrain_moma --load` resumes
from it with a fresh optimizer and the LR schedule started again from step 0.

Runs in one process: the model is rebuilt from the checkpoint's run_config.json alone (no dataset
needed), the checkpoint's full tensors are read with dist_checkpointing, and the new one is
written in torch_dist format, which loads under any TP/PP/EP layout.
"""

import argparse
import os
import re
import sys
from typing import Dict, List, Optional

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

from megatron_moma.command_line import (
    POSITIVE_INT,
    ArgumentError,
    CommandLineParser,
    report_argument_error,
    writable_directory_problem,
)
from megatron_moma.conversion.megatron_checkpoint import locate_checkpoint, read_run_config
from megatron_moma.conversion.world_size_one import (
    build_world_size_one_model,
    world_size_one_arguments,
    world_size_one_parallel_state,
)
from megatron_moma.data.vocabulary import VocabularyLayout
from megatron_moma.training import checkpointing
from megatron_moma.training.checkpointing import TrainState

EXPERT_KEY = re.compile(r"^(?P<layers>.*)\.mlp\.experts\.(?P<modality>\w+)\.experts\.(?P<linear>linear_fc[12])\.weight$")
FRESH_KEY = re.compile(r"\.mlp\.(routers|aux_routers)\.")
PRE_MLP_NORM_KEY = re.compile(r"^(?P<layers>.*)\.pre_mlp_layernorm\.(?P<name>weight|bias)$")


def _target_arguments(saved: Dict, experts_per_modality: List[int]) -> argparse.Namespace:
    args = world_size_one_arguments(saved)
    args.architecture = "mot+moma" if args.architecture.startswith("mot") else "moma"
    args.moma_experts_per_modality = list(experts_per_modality)
    args.moma_gumbel_noise = True
    return args


def _dense_source_key(key: str) -> Optional[str]:
    """The key of a dense checkpoint that holds MoMa target `key`, if it is named differently:
    the layer's MLP linears for its experts ([layers, out, in], one expert), and the pre-MLP norm,
    which dense layers save under Transformer Engine's fused key (megatron-core's local spec maps
    it so) and MoMa layers under its own name, like megatron-core's MoE layers."""
    match = EXPERT_KEY.match(key)
    if match is not None:
        return f"{match['layers']}.mlp.{match['linear']}.weight"
    match = PRE_MLP_NORM_KEY.match(key)
    if match is not None:
        return f"{match['layers']}.mlp.linear_fc1.layer_norm_{match['name']}"
    return None


def _source_key(key: str, source: Dict[str, torch.Tensor]) -> str:
    """The source key for target `key`: the same key (a 1t1i source) or the dense one."""
    if key in source or _dense_source_key(key) is None:
        return key
    return _dense_source_key(key)


def _source_tensor(key: str, source: Dict[str, torch.Tensor], experts: int) -> Optional[torch.Tensor]:
    """The full source tensor for target `key` [.., experts, ..] or [..], or None if fresh."""
    if FRESH_KEY.search(key):
        return None
    single = source[_source_key(key, source)]
    if EXPERT_KEY.match(key) is None:
        return single
    if key not in source:  # dense source: [layers, out, in] -> [layers, 1, out, in]
        single = single.unsqueeze(1)
    if single.shape[1] != 1:
        raise ValueError(f"{key}: the source has {single.shape[1]} experts in this group; "
                         "upcycling starts from one expert per modality (1t1i) or a dense MLP")
    return single.expand(-1, experts, *single.shape[2:])


def upcycle(load: str, save: str, experts_per_modality: List[int]) -> str:
    """Write the upcycled checkpoint of `load`'s latest iteration under `save`; returns its folder.
    torch.distributed must be initialised with one process."""
    root, iteration = locate_checkpoint(load)
    directory = checkpointing.checkpoint_dir(root, iteration)
    saved = read_run_config(directory)
    args = _target_arguments(saved, experts_per_modality)
    with world_size_one_parallel_state(args.seed):
        model = build_world_size_one_model(args, saved)
        source = {k: v for k, v in dist_checkpointing.load_plain_tensors(directory).items()
                  if isinstance(v, torch.Tensor) and not k.startswith(("optimizer", "chained_"))}
        _copy_into(model, source)
        state = TrainState(**dist_checkpointing.load_common_state_dict(directory)["train_state"])
        run_config = checkpointing.make_run_config(
            args, VocabularyLayout.from_dict(saved["vocabulary"]), saved["padded_vocab_size"],
            model.config.architecture, world_size=1)
        run_config["upcycled_from"] = directory
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
        used.add(_source_key(shard.key, source))
    unused = sorted(set(source) - used - {k for k in source if FRESH_KEY.search(k)})
    if unused:
        raise ValueError(f"source parameters with no place in the upcycled model: {unused}")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(prog="moma-upcycle", description=__doc__.split("\n")[0],
                               allow_abbrev=False)
    parser.add_argument("--load", required=True, help="checkpoint root of the 1t1i or dense run")
    parser.add_argument("--save", required=True, help="checkpoint root to write the upcycled model")
    parser.add_argument("--moma-experts-per-modality", type=POSITIVE_INT, nargs="+", required=True,
                        help="experts of each modality group, text first: 4 4 is 4t4i")
    return parser


def _check_flags(args: argparse.Namespace) -> None:
    """--load a checkpoint, --save a folder this process can write other than --load's, and
    one --moma-experts-per-modality value per modality of the checkpoint's data."""
    problem = writable_directory_problem(args.save)
    if problem is not None:
        raise ArgumentError(f"--save {args.save} {problem}")
    root, iteration = locate_checkpoint(args.load)
    if os.path.realpath(root) == os.path.realpath(args.save):
        raise ArgumentError(f"--save {args.save} is the --load checkpoint; write the upcycled "
                            "model to another folder")
    saved = read_run_config(checkpointing.checkpoint_dir(root, iteration))
    names = VocabularyLayout.from_dict(saved["vocabulary"]).modality_layout.names
    groups = args.moma_experts_per_modality
    if len(groups) != len(names):
        raise ArgumentError(f"--moma-experts-per-modality {' '.join(map(str, groups))}: "
                            f"{len(groups)} values, expected one per modality of the checkpoint's "
                            f"data ({', '.join(names)})")


def main(argv: Optional[List[str]] = None) -> int:
    from megatron_moma.training.pretrain_moma import initialize_distributed

    try:
        args = build_parser().parse_args(argv)
        _check_flags(args)
        initialize_distributed("cpu")
        folder = upcycle(args.load, args.save, args.moma_experts_per_modality)
    except ArgumentError as error:
        return report_argument_error("moma-upcycle", error)
    except ValueError as error:
        print(f"moma-upcycle: error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {folder}: experts per modality {args.moma_experts_per_modality}, resume with "
          f"pretrain_moma --load {args.save} (fresh optimizer, LR schedule from step 0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
