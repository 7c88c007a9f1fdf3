"""`moma-convert` (tools/convert_checkpoint.py): pretrain_moma checkpoints to and from Hugging Face.

    moma-convert export-hf --load CKPT_DIR [--iteration N] --out HF_DIR [--tokenizer PATH]
                           [--dtype fp32|bf16] [--max-shard-size 5GB] [--overwrite]
    moma-convert import-hf --hf HF_DIR --out CKPT_DIR [--tensor-model-parallel-size N]
                           [--pipeline-model-parallel-size N] [--expert-model-parallel-size N]
                           [--num-layers-per-virtual-pipeline-stage N] [--sequence-parallel]
                           [--overwrite]

Runs in one process on the CPU (no torchrun). Every error prints one line `moma-convert: error:
...` and writes nothing. Exit code 2: an invalid flag (a value of the wrong kind, a --load or
--iteration that names no checkpoint, an --hf folder that is not an export, a --tokenizer that
does not fit, a target layout that does not split the model, an existing or unwritable --out).
Exit code 1: the input's content is bad (a missing run config or weight file, a model the
Hugging Face side does not implement, weights that do not fit their config).
"""

import argparse
import sys
from typing import List, Optional

import torch

from megatron_moma.command_line import (
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    ArgumentError,
    CommandLineParser,
    report_argument_error,
)
from megatron_moma.conversion.errors import ConversionError
from megatron_moma.conversion.safetensors_shards import parse_size


def _shard_size(text: str) -> int:
    """--max-shard-size as bytes (an argparse type: the error names the flag)."""
    try:
        return parse_size(text)
    except ConversionError as error:
        raise argparse.ArgumentTypeError(str(error))


def _add_export(commands) -> None:
    export = commands.add_parser("export-hf", help="checkpoint -> Hugging Face folder",
                                 description="Write a Hugging Face model folder (config, code, "
                                             "sharded safetensors, generation config, tokenizer) "
                                             "for a checkpoint saved under any parallel layout.")
    export.add_argument("--load", required=True,
                        help="checkpoint root (as given to pretrain_moma --save), or one "
                             "iter_NNNNNNN folder in it")
    export.add_argument("--iteration", type=NON_NEGATIVE_INT, default=None,
                        help="iteration to export (default: latest_checkpointed_iteration.txt)")
    export.add_argument("--out", required=True, help="Hugging Face folder to write")
    export.add_argument("--tokenizer", default=None,
                        help="Hugging Face tokenizer folder (or a name in the local cache) to save "
                             "with the model")
    export.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                        help="weights' dtype (default: the run's, bf16 with --bf16 else fp32)")
    export.add_argument("--max-shard-size", type=_shard_size, default="5GB",
                        help="largest safetensors file, e.g. 5GB, 500MB, 2GiB (default 5GB)")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def _add_import(commands) -> None:
    imported = commands.add_parser("import-hf", help="Hugging Face folder -> checkpoint",
                                   description="Write a checkpoint (iteration 0, no optimizer "
                                               "state) that pretrain_moma --load resumes from "
                                               "under the target parallel sizes.")
    imported.add_argument("--hf", required=True, help="Hugging Face folder written by export-hf")
    imported.add_argument("--out", required=True, help="checkpoint root to write")
    imported.add_argument("--tensor-model-parallel-size", type=POSITIVE_INT, default=1)
    imported.add_argument("--pipeline-model-parallel-size", type=POSITIVE_INT, default=1)
    imported.add_argument("--expert-model-parallel-size", type=POSITIVE_INT, default=1)
    imported.add_argument("--num-layers-per-virtual-pipeline-stage", type=POSITIVE_INT, default=None)
    imported.add_argument("--sequence-parallel", action="store_true")
    imported.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(
        prog="moma-convert", allow_abbrev=False,
        description="Convert pretrain_moma checkpoints to and from Hugging Face model folders "
                    "(one process, CPU).")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_export(commands)
    _add_import(commands)
    return parser


def _export(args: argparse.Namespace) -> str:
    from megatron_moma.conversion.hf_export import export_hf

    summary = export_hf(args.load, args.out, iteration=args.iteration, tokenizer=args.tokenizer,
                        dtype=args.dtype, max_shard_size=args.max_shard_size,
                        overwrite=args.overwrite)
    return (f"wrote {summary.out}: {summary.architecture} model of {summary.checkpoint}, "
            f"{summary.num_tensors} tensors in {summary.num_shards} safetensors shard(s), "
            f"{summary.dtype}; load with AutoModelForCausalLM.from_pretrained({summary.out!r}, "
            "trust_remote_code=True)")


def _import(args: argparse.Namespace) -> str:
    from megatron_moma.conversion.hf_import import TARGET_PARALLEL_FLAGS, import_hf

    summary = import_hf(args.hf, args.out, {name: getattr(args, name) for name in TARGET_PARALLEL_FLAGS},
                        overwrite=args.overwrite)
    return (f"wrote {summary.out}: {summary.architecture} model, {summary.num_tensors} tensors, "
            f"iteration 0 for the layout {summary.parallel_layout}; train with pretrain_moma "
            f"--load {args.out} (fresh optimizer and LR schedule)")


def main(argv: Optional[List[str]] = None) -> int:
    from megatron_moma.training.pretrain_moma import initialize_distributed

    try:
        args = build_parser().parse_args(argv)
        initialize_distributed("cpu")
        if torch.distributed.get_world_size() != 1:
            raise ArgumentError("moma-convert runs as one process; do not start it with torchrun")
        message = _export(args) if args.command == "export-hf" else _import(args)
    except ArgumentError as error:
        return report_argument_error("moma-convert", error)
    except ConversionError as error:
        print(f"moma-convert: error: {error}", file=sys.stderr, flush=True)
        return 1
    except ModuleNotFoundError as error:
        if error.name != "transformers":
            raise
        print("moma-convert: error: needs transformers: pip install 'megatron-moma[hf]'",
              file=sys.stderr, flush=True)
        return 1
    print(message, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
