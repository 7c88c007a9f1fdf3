"""The model of a saved run, rebuilt in one process from its run_config.json alone.

Every checkpoint folder holds `run_config.json` (every flag, the vocabulary layout, the padded
vocabulary size, the parallel layout). That is all a converter needs: the dataset (and its
`.vocab.json` sidecar) may not exist where one converts, so the vocabulary comes from the run
config. The model is built at world size 1 (TP = PP = EP = 1, no virtual stages): its
`sharded_state_dict` names every parameter by its global key and shape, so dist_checkpointing
reads a checkpoint saved under any layout into it, and a checkpoint it saves loads under any.
"""

import argparse
import copy
from contextlib import contextmanager
from typing import Any, Dict, Iterator

from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatron_moma.data.vocabulary import VocabularyLayout
from megatron_moma.models import ModalityGPTModel, build_gpt_model
from megatron_moma.parallel.layout import ParallelLayout
from megatron_moma.training import configs
from megatron_moma.training.arguments import default_arguments

PARALLEL_SIZE_FLAGS = ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                       "expert_model_parallel_size")


def world_size_one_arguments(run_config: Dict[str, Any]) -> argparse.Namespace:
    """The run's flags (the trainer's defaults for any the run config lacks) with every parallel
    size set to 1 and the device to CPU."""
    args = argparse.Namespace(**{**default_arguments(), **copy.deepcopy(run_config["arguments"])})
    for name in PARALLEL_SIZE_FLAGS:
        setattr(args, name, 1)
    args.sequence_parallel = False
    args.num_layers_per_virtual_pipeline_stage = None
    args.expert_tensor_parallel_size = None
    args.device = "cpu"
    args.world_size = args.data_parallel_size = 1
    return args


def build_world_size_one_model(args: argparse.Namespace, run_config: Dict[str, Any]) -> ModalityGPTModel:
    """The whole model of `args` (from `world_size_one_arguments`), with the run config's
    vocabulary layout and padded vocabulary size; inside `world_size_one_parallel_state`."""
    vocab = VocabularyLayout.from_dict(run_config["vocabulary"])
    config = configs.transformer_config(args, vocab.modality_layout)
    return build_gpt_model(config, run_config["padded_vocab_size"], args.max_position_embeddings,
                           position_embedding_type=args.position_embedding_type,
                           rotary_base=args.rotary_base,
                           share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights)


@contextmanager
def world_size_one_parallel_state(seed: int = 1234) -> Iterator[None]:
    """Megatron's parallel state for one process (torch.distributed must be initialised with
    world size 1), torn down on exit."""
    ParallelLayout().initialize()
    model_parallel_cuda_manual_seed(seed)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
