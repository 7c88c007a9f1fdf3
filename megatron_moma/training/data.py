"""Training and validation batches: MixedModalDataset splits read in a resumable order.

The datasets are built by megatron's BlendedMegatronDatasetBuilder with the sizes Megatron-LM
asks for (train: train_iters x global batch; validation: every evaluation's eval_iters batches).
Global batch `k` of the training split holds samples [k * gbs, (k + 1) * gbs) of megatron's
seeded sample order; each data-parallel rank reads its contiguous share of it, cut into
micro-batches. The data position is therefore the number of consumed samples alone, which the
checkpoint stores. Every evaluation reads the first eval_iters batches of the validation split,
so evaluations are comparable across a run. Every rank reads the samples itself (no broadcast).
"""

import argparse
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import torch
from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.utils import get_blend_from_list

from megatron_moma.data.dataset import MixedModalDataset, MixedModalDatasetConfig
from megatron_moma.data.vocabulary import VocabularyLayout
from megatron_moma.training.arguments import ArgumentError

Batch = Dict[str, torch.Tensor]  # tokens, labels, loss_mask, position_ids, modality_ids: [b, s]


@dataclass
class Splits:
    train: MixedModalDataset
    valid: Optional[MixedModalDataset]


def _loss_weights(pairs: Optional[List[str]], vocab: VocabularyLayout) -> Optional[Dict[str, float]]:
    """--modality-loss-weights (`name=weight`, checked by its argparse type) as {name: weight},
    every name one of the dataset's modalities, each once."""
    if not pairs:
        return None
    names = vocab.modality_layout.names
    weights = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in names or name in weights:
            problem = "is given twice" if name in weights else "is not a modality of the dataset"
            raise ArgumentError(f"--modality-loss-weights {pair}: {name!r} {problem} (the "
                                f"dataset's modalities: {', '.join(names)})")
        weights[name] = float(value)
    return weights


def build_splits(args: argparse.Namespace, vocab: VocabularyLayout) -> Splits:
    evaluations = args.train_iters // args.eval_interval + 1
    sizes = [args.train_iters * args.global_batch_size,
             evaluations * args.eval_iters * args.global_batch_size,
             args.eval_iters * args.global_batch_size]
    config = MixedModalDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=get_blend_from_list(args.data_path),
        split=args.split,
        path_to_cache=args.data_cache_path,
        vocabulary=vocab,
        modality_loss_weights=_loss_weights(args.modality_loss_weights, vocab),
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=False,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=False,
    )
    train, valid, _ = BlendedMegatronDatasetBuilder(MixedModalDataset, sizes, lambda: True, config).build()
    if train is None:
        raise ArgumentError(f"--split {args.split!r} leaves no training data")
    return Splits(train=train, valid=valid)


def micro_batches(dataset, first_sample: int, args: argparse.Namespace) -> List[Batch]:
    """This data-parallel rank's micro-batches of the global batch starting at `first_sample`."""
    dp_size = parallel_state.get_data_parallel_world_size()
    per_rank = args.global_batch_size // dp_size
    start = first_sample + parallel_state.get_data_parallel_rank() * per_rank
    batches = []
    for offset in range(0, per_rank, args.micro_batch_size):
        samples = [dataset[(start + offset + i) % len(dataset)] for i in range(args.micro_batch_size)]
        batches.append({key: torch.stack([s[key] for s in samples])
                        for key in ("tokens", "labels", "loss_mask", "position_ids", "modality_ids")})
    return batches


def batch_iterators(batches: List[Batch], num_chunks: int) -> List[Iterator[Batch]]:
    """One iterator per model chunk, as megatron's interleaved schedule wants."""
    return [iter(batches) for _ in range(num_chunks)]
