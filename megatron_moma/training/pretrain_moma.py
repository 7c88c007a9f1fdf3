"""`pretrain-moma` / `python -m megatron_moma.training.pretrain_moma`: the pretraining entry point.

Run with torchrun (one process per device), or as a single process. Flags: `--help`
(megatron_moma.training.arguments); `--skip-train --load CKPT` evaluates the checkpoint and
exits. Exit codes: 0 done (or saved and stopped on SIGTERM, --exit-duration-in-mins or
--exit-interval: docs/preemption.md), 2 invalid flags, 3 NaN/inf in the loss or gradients.
"""

import argparse
import os
import sys
import tempfile
from typing import List, Optional

import torch
from megatron.core import parallel_state
from megatron.core.num_microbatches_calculator import (
    destroy_num_microbatches_calculator,
    init_num_microbatches_calculator,
)
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatron_moma.platform import activate_platform
from megatron_moma.training import checkpointing, configs, data, loop
from megatron_moma.training.arguments import ArgumentError, parse_args
from megatron_moma.training.checkpointing import TrainState
from megatron_moma.training.logging import TrainingLogger, print_rank_last

EXIT_BAD_ARGUMENTS = 2


def initialize_distributed(device: str) -> None:
    """torch.distributed from torchrun's environment, or a one-process group of our own."""
    if torch.distributed.is_initialized():
        return
    if device == "cpu":
        activate_platform()  # megatron-core on CPU where there is no CUDA
    backend = "gloo" if device == "cpu" else "nccl"  # CPU tensors on a CUDA machine too
    if "RANK" in os.environ:
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.distributed.init_process_group(backend)
    else:
        store = os.path.join(tempfile.mkdtemp(prefix="pretrain-moma-"), "store")
        torch.distributed.init_process_group(backend, init_method=f"file://{store}", rank=0,
                                             world_size=1)


def _set_seeds(seed: int) -> None:
    import random

    import numpy

    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def _same_layout(root: str, run_config: dict) -> bool:
    iteration = checkpointing.read_tracker(root)
    saved = checkpointing.read_run_config(checkpointing.checkpoint_dir(root, iteration))
    return (saved["world_size"], saved["parallel_layout"]) == (
        run_config["world_size"], run_config["parallel_layout"])


def _padded_vocab_size(args, vocab_size: int) -> int:
    """Megatron-LM's padded vocabulary, or the checkpoint's when resuming: padding depends on the
    TP size, and a resumed run under another TP size must keep the saved embedding shape."""
    if not args.load or checkpointing.read_tracker(args.load) is None:
        return configs.padded_vocab_size(vocab_size, args)
    saved = checkpointing.read_run_config(
        checkpointing.checkpoint_dir(args.load, checkpointing.read_tracker(args.load)))
    padded = saved["padded_vocab_size"]
    if padded % args.tensor_model_parallel_size:
        raise ArgumentError(f"the checkpoint's padded vocabulary ({padded}) does not split over "
                            f"--tensor-model-parallel-size {args.tensor_model_parallel_size}")
    return padded


def build_run(args) -> loop.Run:
    """Parallel state, data, model, optimizer, and the state loaded from --load if any."""
    layout = configs.parallel_layout(args)
    layout.initialize()
    _set_seeds(args.seed)
    init_num_microbatches_calculator(torch.distributed.get_rank(), None, args.global_batch_size,
                                     args.micro_batch_size, parallel_state.get_data_parallel_world_size())
    vocab = configs.vocabulary(args)
    vocab_size = _padded_vocab_size(args, vocab.vocab_size)
    data_layout = vocab.modality_layout
    config = configs.transformer_config(args, data_layout)
    chunks = loop.build_model(args, config, vocab_size)
    optimizer, scheduler = loop.build_optimizer(args, chunks)
    run_config = checkpointing.make_run_config(args, vocab, vocab_size, config.architecture,
                                              torch.distributed.get_world_size())
    state = TrainState()
    if args.load and checkpointing.read_tracker(args.load) is not None:
        loaded = checkpointing.load_checkpoint(
            args.load, [c.module for c in chunks], optimizer, scheduler,
            same_layout=_same_layout(args.load, run_config),
            load_optimizer=not (args.no_load_optim or args.finetune or args.train_aux_routers
                                or args.skip_train),
            load_rng=not (args.no_load_rng or args.finetune))
        state = TrainState() if args.finetune or args.train_aux_routers else loaded
        print_rank_last(f" loaded checkpoint from {args.load} at iteration {loaded.iteration}")
    elif args.train_aux_routers or args.skip_train:
        flag = "--train-aux-routers" if args.train_aux_routers else "--skip-train"
        raise ArgumentError(f"{flag}: no checkpoint in --load {args.load} "
                            f"(no {checkpointing.TRACKER})")
    return loop.Run(args=args, config=config, vocab_size=vocab_size, chunks=chunks,
                    optimizer=optimizer, scheduler=scheduler, splits=data.build_splits(args, vocab),
                    logger=TrainingLogger(args.train_iters, args.log_interval, args.tensorboard_dir,
                                          args.tensorboard_log_interval),
                    state=state, run_config=run_config, data_layout=data_layout)


def pretrain(argv: Optional[List[str]] = None) -> int:
    """Parse, build and train on an initialised torch.distributed; returns the exit code."""
    args = parse_args(argv, world_size=torch.distributed.get_world_size())
    early_exit = loop.EarlyExit(args)
    run = build_run(args)
    try:
        return loop.evaluate_checkpoint(run) if args.skip_train else loop.train(run, early_exit)
    finally:
        run.logger.close()
        destroy_num_microbatches_calculator()


def _requested_device(argv: List[str]) -> str:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None)
    device = parser.parse_known_args(argv)[0].device
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    initialize_distributed(_requested_device(argv))
    try:
        code = pretrain(argv)
    except ArgumentError as error:
        print(f"pretrain-moma: error: {error}", file=sys.stderr, flush=True)
        code = EXIT_BAD_ARGUMENTS
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
