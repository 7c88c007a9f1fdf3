"""Tiny `pretrain_moma` runs on the digits sample corpus, for tests and smoke runs.

`digits_dataset` preprocesses the bundled corpus once; `pretrain_on_ranks` runs the trainer on
ranks forked from the calling process (`run_on_ranks`), and `tensorboard_scalars` reads back
what a run logged, step by step. `save_named_weight_checkpoints` writes checkpoints of the
trainer's model without training: every weight set from its global name, so that a checkpoint
saved under any layout holds known values.
"""

import os
from typing import Dict, List

import torch

from megatron_moma.data.vocabulary import VocabularyLayout
from megatron_moma.testing.multiprocess import run_on_ranks

TINY_TRAINER_FLAGS = [
    "--device", "cpu", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
    "--ffn-hidden-size", "64", "--seq-length", "32", "--micro-batch-size", "2",
    "--swiglu", "--disable-bias-linear", "--normalization", "RMSNorm",
    "--position-embedding-type", "rope", "--hidden-dropout", "0", "--attention-dropout", "0",
    "--split", "90,10,0", "--eval-iters", "1", "--eval-interval", "1000", "--log-interval", "1",
    "--seed", "7"]
"""A 2-layer, 32-wide, dropout-free model on 32-token sequences, logging every step."""

MOMA_2T2I = ["--architecture", "moma", "--moma-experts-per-modality", "2", "2"]


def digits_dataset(directory: str, num_images: int = 400) -> str:
    """Write and preprocess the digits corpus into `directory`; returns the dataset prefix."""
    from megatron_moma.data import preprocess, sample_corpus

    assert sample_corpus.main(["--output-dir", directory, "--num-images", str(num_images),
                               "--code-format", "inline"]) == 0
    prefix = os.path.join(directory, "digits")
    assert preprocess.main(["--input", os.path.join(directory, "digits.jsonl"), "--output-prefix",
                            prefix, "--codebook-size", "8", "--codes-per-image", "64",
                            "--append-eod"]) == 0
    return prefix + "_text_document"


def trainer_flags(data_path: str, root: str, name: str, iters: int, *extra: str) -> List[str]:
    """TINY_TRAINER_FLAGS on `data_path` for `iters` iterations, logging to `{root}/tb-{name}`."""
    return TINY_TRAINER_FLAGS + ["--data-path", data_path, "--train-iters", str(iters),
                                 "--tensorboard-dir", os.path.join(root, "tb-" + name)] + list(extra)


def _pretrain(argv: List[str]) -> int:
    from megatron_moma.training.pretrain_moma import pretrain

    return pretrain(argv)


def pretrain_on_ranks(ranks: int, argv: List[str], timeout: float = 150) -> int:
    """Run `pretrain_moma argv` on `ranks` forked gloo ranks; returns the (common) exit code."""
    codes = run_on_ranks(_pretrain, ranks, argv, timeout=timeout)
    assert set(codes) == {codes[0]}, codes
    return codes[0]


def tensorboard_scalars(tensorboard_dir: str, tag: str) -> Dict[int, float]:
    """{step: value} of scalar `tag` in the event files of `tensorboard_dir`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(tensorboard_dir, size_guidance={"scalars": 0})
    events.Reload()
    return {event.step: event.value for event in events.Scalars(tag)}


def save_named_weight_checkpoints(checkpoints: Dict[str, List[str]], vocabulary: VocabularyLayout,
                                  iteration: int = 1) -> None:
    """Call on every rank (torch.distributed initialised). For each {root: trainer flags}: build
    pretrain_moma's model under the flags' layout, set every weight to
    `gpt_runs.global_initial_value` of its global name, and save it as checkpoint `iteration`
    of `root` with its run config (model only: no optimizer, scheduler or RNG state)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_moma.testing.gpt_runs import set_weights_by_global_name
    from megatron_moma.training import checkpointing, configs, loop
    from megatron_moma.training.arguments import parse_args

    world_size = torch.distributed.get_world_size()
    for root, argv in checkpoints.items():
        args = parse_args(list(argv) + ["--data-path", "unused", "--lr", "1e-3", "--train-iters", "1"],
                          world_size=world_size)
        configs.parallel_layout(args).initialize()
        model_parallel_cuda_manual_seed(args.seed)
        padded = configs.padded_vocab_size(vocabulary.vocab_size, args)
        config = configs.transformer_config(args, vocabulary.modality_layout)
        chunks = loop.build_model(args, config, padded)
        set_weights_by_global_name(chunks)
        run_config = checkpointing.make_run_config(args, vocabulary, padded, config.architecture,
                                                   world_size)
        checkpointing.save_checkpoint(root, [c.module for c in chunks], None, None,
                                      checkpointing.TrainState(iteration=iteration), run_config,
                                      save_optimizer=False, save_rng=False)
        parallel_state.destroy_model_parallel()
