"""Command-line arguments of `pretrain_moma`: Megatron-LM's flag names and defaults, plus ours.

Every flag that exists in Megatron-LM (megatron/training/arguments.py) keeps its name and default,
so a Megatron-LM launch script translates line by line. Our own flags (architecture, MoMa, MoT,
MoD, the auxiliary-router stage, `--device`) sit in their own groups. `parse_args` validates the
combination and raises `ArgumentError` with a message that names the flags involved; the option
groups of the model are built from the flags in `megatron_moma.training.configs`.
"""

import argparse
import math
import os
from typing import Any, Dict, List, Optional, Tuple

from megatron_moma.command_line import (
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    PROBABILITY,
    ArgumentError,
    CommandLineParser,
    integer,
    number,
    writable_directory_problem,
)
from megatron_moma.config.fp8 import FP8_FORMATS, FP8_RECIPES
from megatron_moma.config.mod import INFERENCE_ROUTINGS as MOD_INFERENCE_ROUTINGS
from megatron_moma.config.mod import TOPK_SCOPES as MOD_TOPK_SCOPES
from megatron_moma.config.moma import INFERENCE_ROUTINGS as MOMA_INFERENCE_ROUTINGS
from megatron_moma.config.moma import ROUTINGS as MOMA_ROUTINGS
from megatron_moma.config.mot import NORM_PLACEMENTS, UNTIE_CHOICES

ARCHITECTURES = ("dense", "moma", "mot", "mot+moma")
# docs/layers.md §3: peak LR 1e-4, linear decay to 1e-6, 1k-2k warm-up over 5k-10k steps.
AUX_ROUTER_SCHEDULE = {"lr": 1e-4, "min_lr": 1e-6, "lr_warmup_fraction": 0.2,
                       "lr_decay_style": "linear"}
ATTENTION_BACKENDS = ("flash", "fused", "unfused", "local", "auto")  # Megatron-LM's AttnBackend
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")




def modality_weight(text: str) -> str:
    """An argparse type for --modality-loss-weights: `name=weight`, weight a finite number >= 0
    (the names are checked against the dataset's modalities once the vocabulary is read)."""
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"expected name=weight (e.g. image=0.5), got {text!r}")
    try:
        NON_NEGATIVE(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number >= 0 after {name}=")
    return text


def _parallel(parser):
    group = parser.add_argument_group("distributed (Megatron-LM)")
    group.add_argument("--tensor-model-parallel-size", type=POSITIVE_INT, default=1)
    group.add_argument("--pipeline-model-parallel-size", type=POSITIVE_INT, default=1)
    group.add_argument("--num-layers-per-virtual-pipeline-stage", type=POSITIVE_INT, default=None)
    group.add_argument("--expert-model-parallel-size", type=POSITIVE_INT, default=1)
    group.add_argument("--expert-tensor-parallel-size", type=POSITIVE_INT, default=None)
    group.add_argument("--sequence-parallel", action="store_true")
    group.add_argument("--use-distributed-optimizer", action="store_true")
    group.add_argument("--overlap-grad-reduce", action="store_true")
    group.add_argument("--device", choices=("cuda", "cpu"), default=None,
                       help="ours: where to run; cpu uses gloo (default: cuda when available)")


def _model(parser):
    group = parser.add_argument_group("network size (Megatron-LM)")
    group.add_argument("--num-layers", type=POSITIVE_INT, required=True)
    group.add_argument("--hidden-size", type=POSITIVE_INT, required=True)
    group.add_argument("--ffn-hidden-size", type=POSITIVE_INT, default=None, help="default 4 * hidden size")
    group.add_argument("--num-attention-heads", type=POSITIVE_INT, required=True)
    group.add_argument("--group-query-attention", action="store_true")
    group.add_argument("--num-query-groups", type=POSITIVE_INT, default=1)
    group.add_argument("--kv-channels", type=POSITIVE_INT, default=None)
    group.add_argument("--max-position-embeddings", type=POSITIVE_INT, default=None)
    group.add_argument("--position-embedding-type", choices=("learned_absolute", "rope"),
                       default="learned_absolute")
    group.add_argument("--rotary-base", type=POSITIVE_INT, default=10000)
    group.add_argument("--normalization", choices=("LayerNorm", "RMSNorm"), default="LayerNorm")
    group.add_argument("--norm-epsilon", type=POSITIVE, default=1e-5)
    group.add_argument("--swiglu", action="store_true")
    group.add_argument("--disable-bias-linear", action="store_true")
    group.add_argument("--qk-layernorm", action="store_true")
    group.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    group.add_argument("--make-vocab-size-divisible-by", type=POSITIVE_INT, default=128)
    group.add_argument("--init-method-std", type=NON_NEGATIVE, default=0.02)
    group.add_argument("--hidden-dropout", type=PROBABILITY, default=0.1)
    group.add_argument("--attention-dropout", type=PROBABILITY, default=0.1)
    group.add_argument("--bf16", action="store_true")
    group.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default="auto",
                       help="local: megatron-core's DotProductAttention; otherwise Transformer "
                            "Engine's attention (NVTE kernel choice), or without it torch's "
                            "scaled_dot_product_attention: auto (torch's choice), flash, fused "
                            "(cuDNN / memory-efficient, CUDA only), unfused (math)")
    group.add_argument("--recompute-granularity", choices=("full", "selective"), default=None)
    group.add_argument("--recompute-method", choices=("uniform", "block"), default=None)
    group.add_argument("--recompute-num-layers", type=POSITIVE_INT, default=None)


def _fp8(parser):
    group = parser.add_argument_group(
        "FP8 (Megatron-LM's Transformer-Engine group)",
        "With Transformer Engine these are megatron-core's FP8 settings (every TE linear, MoMa's "
        "experts included); without it FP8 covers the MoMa expert GEMMs, on torch's scaled "
        "matmuls, with --fp8-recipe tensorwise or rowwise.")
    group.add_argument("--fp8-format", choices=FP8_FORMATS, default=None,
                       help="e4m3 everywhere, or hybrid: e4m3 forward, e5m2 gradients")
    group.add_argument("--fp8-recipe", choices=FP8_RECIPES, default="delayed",
                       help="Transformer Engine: delayed, tensorwise, mxfp8, blockwise; without "
                            "it: tensorwise or rowwise (ours: per row and output channel)")
    group.add_argument("--fp8-margin", type=NON_NEGATIVE_INT, default=0,
                       help="delayed scaling: scaling margin")
    group.add_argument("--fp8-amax-history-len", type=POSITIVE_INT, default=1,
                       help="delayed scaling: steps of amax history per tensor")
    group.add_argument("--fp8-amax-compute-algo", choices=("most_recent", "max"),
                       default="most_recent", help="delayed scaling: amax from the history")


def _architecture(parser):
    group = parser.add_argument_group("modality-aware architecture (ours)")
    group.add_argument("--architecture", choices=ARCHITECTURES, default="dense")
    group.add_argument("--mod", action="store_true", help="Mixture-of-Depths layers")
    group.add_argument("--moma-experts-per-modality", type=POSITIVE_INT, nargs="+", default=[1, 1],
                       help="experts of each modality group, text first: 4 4 is MoMa 4t4i; "
                            "one value is one group for every modality (8: the paper's moe_8x)")
    group.add_argument("--moma-routing", choices=MOMA_ROUTINGS, default="expert_choice")
    group.add_argument("--moma-capacity-factor", type=POSITIVE, default=1.0)
    group.add_argument("--moma-token-choice-topk", type=POSITIVE_INT, default=1)
    group.add_argument("--moma-gumbel-noise", action="store_true")
    group.add_argument("--moma-inference-routing", choices=MOMA_INFERENCE_ROUTINGS, default="aux",
                       help="evaluation routing: expert_choice (looks ahead) or aux (causal)")
    group.add_argument("--moma-no-aux-router", action="store_true")
    group.add_argument("--moma-aux-loss-coeff", type=NON_NEGATIVE, default=1.0)
    group.add_argument("--moe-aux-loss-coeff", type=NON_NEGATIVE, default=0.0,
                       help="Megatron-LM's: weight of the load-balancing loss of --moma-routing "
                            "token_choice (Switch Transformer's, per expert group)")
    group.add_argument("--moe-z-loss-coeff", type=NON_NEGATIVE, default=None,
                       help="Megatron-LM's: weight of the router z-loss of token choice")
    group.add_argument("--moe-grouped-gemm", action="store_true",
                       help="Megatron-LM's: MoMa experts as grouped GEMMs (TEGroupedMLP with "
                            "Transformer Engine, torch's grouped matmul without)")
    group.add_argument("--mot-untie", nargs="+", choices=sorted(UNTIE_CHOICES),
                       default=sorted(UNTIE_CHOICES))
    group.add_argument("--mot-norm-placement", choices=NORM_PLACEMENTS, default="pre")
    group.add_argument("--mod-capacity", type=number(0, 1, above=True), default=0.25)
    group.add_argument("--mod-topk-scope", choices=MOD_TOPK_SCOPES, default="batch",
                       help="tokens a MoD layer's top-k ranks: the micro-batch's (the MoMa "
                            "paper's) or each sequence's (the MoD paper's)")
    group.add_argument("--mod-layers", type=NON_NEGATIVE_INT, nargs="+", default=None,
                       help="0-based MoD layers (default: alternating from layer 0)")
    group.add_argument("--mod-inference-routing", choices=MOD_INFERENCE_ROUTINGS, default="aux")
    group.add_argument("--mod-no-aux-router", action="store_true")
    group.add_argument("--mod-aux-loss-coeff", type=NON_NEGATIVE, default=1.0)
    group.add_argument("--train-aux-routers", action="store_true",
                       help="stage 2 (docs/layers.md §3): load --load, freeze all but "
                            "the aux routers; LR flags not given default to the paper's "
                            "schedule: --lr 1e-4 --min-lr 1e-6 --lr-warmup-fraction 0.2 "
                            "--lr-decay-style linear")


def _training(parser):
    group = parser.add_argument_group("training (Megatron-LM)")
    group.add_argument("--micro-batch-size", type=POSITIVE_INT, default=None)
    group.add_argument("--global-batch-size", type=POSITIVE_INT, default=None)
    group.add_argument("--train-iters", type=POSITIVE_INT, required=True)
    group.add_argument("--seed", type=integer(0, 2**32 - 1), default=1234)
    group.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    group.add_argument("--lr", type=NON_NEGATIVE, default=None)
    group.add_argument("--min-lr", type=NON_NEGATIVE, default=0.0)
    group.add_argument("--lr-decay-style", choices=LR_DECAY_STYLES, default="linear")
    group.add_argument("--lr-decay-iters", type=POSITIVE_INT, default=None)
    group.add_argument("--lr-warmup-iters", type=NON_NEGATIVE_INT, default=0)
    group.add_argument("--lr-warmup-fraction", type=number(0, 1, below=True), default=None)
    group.add_argument("--lr-warmup-init", type=NON_NEGATIVE, default=0.0)
    group.add_argument("--weight-decay", type=NON_NEGATIVE, default=0.01)
    group.add_argument("--clip-grad", type=NON_NEGATIVE, default=1.0)
    group.add_argument("--adam-beta1", type=number(0, 1, below=True), default=0.9)
    group.add_argument("--adam-beta2", type=number(0, 1, below=True), default=0.999)
    group.add_argument("--adam-eps", type=POSITIVE, default=1e-08)
    group.add_argument("--sgd-momentum", type=NON_NEGATIVE, default=0.9)
    group.add_argument("--override-opt_param-scheduler", action="store_true")
    group.add_argument("--exit-signal-handler", action="store_true",
                       help="on SIGTERM to any process (torchrun, every rank, one rank): finish "
                            "the step, save, exit 0")
    group.add_argument("--exit-duration-in-mins", type=POSITIVE, default=None,
                       help="save and exit after the first step that ends this many minutes "
                            "after the start")
    group.add_argument("--exit-interval", type=POSITIVE_INT, default=None,
                       help="save and exit after the first iteration divisible by this value")
    group.add_argument("--skip-train", action="store_true",
                       help="bypass the training loop: evaluate the --load checkpoint on the "
                            "validation split (--eval-iters batches, the --*-inference-routing "
                            "given), print and log the losses, exit; nothing is saved")


def _data(parser):
    group = parser.add_argument_group("data (Megatron-LM)")
    group.add_argument("--data-path", nargs="*", default=None,
                       help="prefixes, or weight prefix weight prefix ... for a blend")
    group.add_argument("--split", type=str, default="969, 30, 1")
    group.add_argument("--seq-length", type=POSITIVE_INT, required=True)
    group.add_argument("--data-cache-path", type=str, default=None)
    group.add_argument("--eod-mask-loss", action="store_true")
    group.add_argument("--reset-position-ids", action="store_true")
    group.add_argument("--modality-loss-weights", type=modality_weight, nargs="+", default=None,
                       help="ours: name=weight pairs, e.g. text=1 image=0.5")


def _checkpointing(parser):
    group = parser.add_argument_group("checkpointing (Megatron-LM)")
    group.add_argument("--save", type=str, default=None)
    group.add_argument("--load", type=str, default=None)
    group.add_argument("--save-interval", type=POSITIVE_INT, default=None)
    group.add_argument("--no-save-optim", action="store_true")
    group.add_argument("--no-save-rng", action="store_true")
    group.add_argument("--no-load-optim", action="store_true")
    group.add_argument("--no-load-rng", action="store_true")
    group.add_argument("--finetune", action="store_true")
    group.add_argument("--ckpt-format", choices=("torch_dist",), default="torch_dist")


def _logging(parser):
    group = parser.add_argument_group("logging and evaluation (Megatron-LM)")
    group.add_argument("--log-interval", type=POSITIVE_INT, default=100)
    group.add_argument("--eval-interval", type=POSITIVE_INT, default=1000)
    group.add_argument("--eval-iters", type=NON_NEGATIVE_INT, default=100)
    group.add_argument("--tensorboard-dir", type=str, default=None)
    group.add_argument("--tensorboard-log-interval", type=POSITIVE_INT, default=1)
    group.add_argument("--log-params-norm", action="store_true")
    group.add_argument("--log-num-zeros-in-grad", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(
        prog="pretrain-moma", allow_abbrev=False,
        description="Pretrain a mixed-modal model (dense, MoMa, MoT, MoT+MoMa, with or without MoD)",
    )
    for add_group in (_parallel, _model, _fp8, _architecture, _training, _data, _checkpointing,
                      _logging):
        add_group(parser)
    return parser


def default_arguments() -> Dict[str, Any]:
    """Every flag's default by argparse dest (required flags: None), before derived values."""
    return {action.dest: action.default for action in build_parser()._actions
            if action.dest != "help"}


def parse_args(argv: Optional[List[str]] = None, world_size: int = 1) -> argparse.Namespace:
    """Parse and validate; fills Megatron-LM's derived defaults (ffn size, batch sizes, ...)."""
    args = build_parser().parse_args(argv)
    args.world_size = world_size
    if args.train_aux_routers:
        _apply_aux_router_schedule(args, argv or [])
    _require(args.lr_warmup_fraction is None or args.lr_warmup_iters == 0,
             "--lr-warmup-fraction and --lr-warmup-iters exclude each other (as in Megatron-LM)")
    _fill_defaults(args)
    validate(args)
    return args


def _apply_aux_router_schedule(args: argparse.Namespace, argv: List[str]) -> None:
    """The paper's stage-2 schedule for every LR flag the command line does not set."""
    given = {arg.split("=")[0] for arg in argv if arg.startswith("--")}
    for name, value in AUX_ROUTER_SCHEDULE.items():
        if "--" + name.replace("_", "-") not in given:
            setattr(args, name, value)
    if "--lr-warmup-iters" in given:
        args.lr_warmup_fraction = None


def _fill_defaults(args: argparse.Namespace) -> None:
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = 4 * args.hidden_size
    if args.kv_channels is None and args.hidden_size % args.num_attention_heads == 0:
        args.kv_channels = args.hidden_size // args.num_attention_heads
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.micro_batch_size is None:
        args.micro_batch_size = 1
    model_parallel = args.tensor_model_parallel_size * args.pipeline_model_parallel_size
    args.data_parallel_size = args.world_size // model_parallel if model_parallel else 0
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * max(args.data_parallel_size, 1)
    if args.lr is None and args.skip_train:
        args.lr = 0.0  # nothing is trained
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ArgumentError(message)


def validate(args: argparse.Namespace) -> None:
    """Raise ArgumentError for every combination Megatron-LM or our layers would reject later."""
    _require(args.lr is not None, "--lr is required")
    _require(args.data_path, "--data-path is required (a prefix, or weight prefix pairs)")
    _require(not args.skip_train or args.load is not None,
             "--skip-train needs --load (the checkpoint to evaluate)")
    model_parallel = args.tensor_model_parallel_size * args.pipeline_model_parallel_size
    _require(args.world_size % model_parallel == 0,
             f"world size {args.world_size} is not divisible by --tensor-model-parallel-size x "
             f"--pipeline-model-parallel-size = {model_parallel}")
    per_step = args.micro_batch_size * args.data_parallel_size
    _require(args.global_batch_size % per_step == 0,
             f"--global-batch-size {args.global_batch_size} is not divisible by "
             f"--micro-batch-size x data-parallel size = {per_step}")
    _require(args.hidden_size % args.num_attention_heads == 0 or args.kv_channels is not None,
             "--hidden-size must be divisible by --num-attention-heads (or set --kv-channels)")
    expert_ranks = (expert_tensor_parallel_size(args) * args.expert_model_parallel_size
                    * args.pipeline_model_parallel_size)
    _require(args.world_size % expert_ranks == 0,
             f"world size {args.world_size} is not divisible by --expert-tensor-parallel-size x "
             f"--expert-model-parallel-size x --pipeline-model-parallel-size = {expert_ranks}")
    warmup_iters, decay_iters = lr_schedule_iters(args)
    _require(warmup_iters < decay_iters,
             f"--lr-warmup-iters {warmup_iters} must be smaller than --lr-decay-iters "
             f"{decay_iters} (default --train-iters)")
    _require(not args.use_distributed_optimizer or args.optimizer == "adam",
             "--use-distributed-optimizer supports --optimizer adam only (as megatron-core)")
    _require(args.save_interval is None or args.save is not None, "--save-interval needs --save")
    _require(not args.train_aux_routers or args.load is not None,
             "--train-aux-routers needs --load (the trained checkpoint whose routers to imitate)")
    _require(not args.finetune or args.load is not None,
             "--finetune needs --load (the checkpoint whose weights to start from)")
    _validate_schedule(args)
    _validate_model_shape(args)
    _validate_layer_options(args)
    _validate_blend(args.data_path)
    _validate_split(args.split)
    validate_model_split(args)
    _validate_interleaving(args)


def _validate_schedule(args: argparse.Namespace) -> None:
    """The LR schedule megatron-core's OptimizerParamScheduler asserts on."""
    _require(args.min_lr <= args.lr, f"--min-lr {args.min_lr} must not exceed --lr {args.lr}")
    _require(args.lr_warmup_init <= args.lr,
             f"--lr-warmup-init {args.lr_warmup_init} must not exceed --lr {args.lr}")


def _validate_model_shape(args: argparse.Namespace) -> None:
    """Shapes and settings megatron-core would only reject with a traceback while building or
    running the model."""
    _require(not args.group_query_attention or args.num_attention_heads % args.num_query_groups == 0,
             f"--num-query-groups {args.num_query_groups} must divide --num-attention-heads "
             f"{args.num_attention_heads}")
    _require(args.max_position_embeddings >= args.seq_length,
             f"--max-position-embeddings {args.max_position_embeddings} must be at least "
             f"--seq-length {args.seq_length}")
    _require(args.recompute_method is None or args.recompute_granularity == "full",
             "--recompute-method needs --recompute-granularity full")
    _require(args.recompute_granularity != "full" or args.recompute_method is not None,
             "--recompute-granularity full needs --recompute-method uniform or block")
    _require(args.recompute_granularity is None or args.device != "cpu",
             f"--recompute-granularity {args.recompute_granularity} does not run with --device "
             "cpu (megatron-core's activation recompute needs CUDA)")
    per_stage = args.num_layers // args.pipeline_model_parallel_size
    _require(args.recompute_num_layers is None or args.recompute_num_layers <= per_stage,
             f"--recompute-num-layers {args.recompute_num_layers} exceeds the {per_stage} layers of "
             "a pipeline stage")
    if args.position_embedding_type == "rope":
        head_size = args.kv_channels or args.hidden_size // args.num_attention_heads
        _require(head_size % 2 == 0,
                 f"--position-embedding-type rope rotates pairs of channels: the head size "
                 f"({head_size}: --kv-channels, default --hidden-size / --num-attention-heads) "
                 "must be even")


def _validate_layer_options(args: argparse.Namespace) -> None:
    """The MoMa, MoT and MoD flags that their option groups would reject by field name."""
    moma = "moma" in args.architecture
    if moma and args.moma_routing == "token_choice":
        smallest = min(args.moma_experts_per_modality)
        _require(args.moma_token_choice_topk <= smallest,
                 f"--moma-token-choice-topk {args.moma_token_choice_topk} exceeds the smallest "
                 f"expert group of --moma-experts-per-modality "
                 f"{' '.join(map(str, args.moma_experts_per_modality))} ({smallest})")
    _require(not (moma and args.moma_routing == "expert_choice" and args.moma_no_aux_router
                  and args.moma_inference_routing == "aux"),
             "--moma-no-aux-router needs --moma-inference-routing expert_choice (aux routing, the "
             "default, evaluates with the auxiliary routers)")
    _require(not (args.mod and args.mod_no_aux_router and args.mod_inference_routing == "aux"),
             "--mod-no-aux-router needs --mod-inference-routing expert_choice (aux routing, the "
             "default, evaluates with the auxiliary routers)")
    _require(not (args.architecture == "mot+moma" and args.mot_norm_placement == "post"),
             "--mot-norm-placement post is not supported with --architecture mot+moma (pre only)")
    if args.mod_layers is not None:
        outside = sorted(layer for layer in args.mod_layers if layer >= args.num_layers)
        _require(not outside, f"--mod-layers {' '.join(map(str, outside))}: the model's layers are "
                              f"0 to {args.num_layers - 1} (--num-layers {args.num_layers})")
        _require(args.mod, "--mod-layers needs --mod")


def _same_folder(first: str, second: Optional[str]) -> bool:
    return second is not None and os.path.realpath(first) == os.path.realpath(second)


def validate_paths(args: argparse.Namespace) -> None:
    """Raise ArgumentError unless the paths the flags name are what the run needs: every
    --data-path prefix a dataset; --save, --tensorboard-dir and --data-cache-path folders this
    process can write (made if missing); --load a checkpoint folder, except when it is the
    --save folder (Megatron-LM's resume idiom: a first run with --load and --save on the same
    new folder starts from scratch) and no flag needs a checkpoint (--skip-train,
    --train-aux-routers, --finetune). The trainer checks them after `parse_args`, before
    building anything; `parse_args` alone looks at the flags only."""
    for prefix in _blend_prefixes(args.data_path):
        missing = [prefix + ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
        _require(not missing, f"--data-path {prefix}: no {' or '.join(missing)} (expected the "
                              "prefix of a moma-preprocess output, e.g. out_text_document)")
    if args.save is not None:
        problem = writable_directory_problem(args.save)
        _require(problem is None, f"--save {args.save} {problem}")
    for flag, folder in (("--tensorboard-dir", args.tensorboard_dir),
                         ("--data-cache-path", args.data_cache_path)):
        problem = None if folder is None else writable_directory_problem(folder)
        _require(problem is None, f"{flag} {folder} {problem}")
    needs_checkpoint = [flag for flag, given in (("--skip-train", args.skip_train),
                                                 ("--train-aux-routers", args.train_aux_routers),
                                                 ("--finetune", args.finetune)) if given]
    if args.load is None or (_same_folder(args.load, args.save) and not needs_checkpoint):
        return
    _require(os.path.isdir(args.load), f"--load {args.load}: no such folder")
    from megatron_moma.training.checkpointing import TRACKER

    purpose = f", for {' '.join(needs_checkpoint)}" if needs_checkpoint else ""
    _require(os.path.isfile(os.path.join(args.load, TRACKER)),
             f"--load {args.load} holds no checkpoint (no {TRACKER}; a checkpoint root as "
             f"written by --save is expected{purpose})")


def validate_model_split(args: argparse.Namespace) -> None:
    """Raise ArgumentError unless the model splits under the parallel-size flags: heads and
    query groups over TP, layers over PP (and virtual stages), each MoMa group's experts over
    EP. The checkpoint converter checks a target layout with it too."""
    tp = args.tensor_model_parallel_size
    _require(not args.sequence_parallel or tp > 1,
             "--sequence-parallel needs --tensor-model-parallel-size > 1")
    _require(args.num_attention_heads % tp == 0,
             f"--num-attention-heads {args.num_attention_heads} is not divisible by "
             f"--tensor-model-parallel-size {tp}")
    _require(not args.group_query_attention or args.num_query_groups % tp == 0,
             f"--num-query-groups {args.num_query_groups} is not divisible by "
             f"--tensor-model-parallel-size {tp}")
    _validate_pipeline(args)
    _validate_moma(args)
    _validate_fp8(args)
    _validate_attention_backend(args)


def _is_blend(data_path: List[str]) -> bool:
    """`weight prefix weight prefix ...` (Megatron-LM: a first value that is a number)."""
    try:
        float(data_path[0])
    except ValueError:
        return False
    return len(data_path) > 1


def _blend_prefixes(data_path: List[str]) -> List[str]:
    return data_path[1::2] if _is_blend(data_path) else data_path


def _validate_blend(data_path: List[str]) -> None:
    """A blend is pairs of a weight >= 0 and a prefix, with weights that do not sum to 0."""
    if not _is_blend(data_path):
        return
    _require(len(data_path) % 2 == 0, f"--data-path {' '.join(data_path)}: a blend is weight "
                                      "prefix pairs, this has an odd number of values")
    for weight in data_path[0::2]:
        try:
            NON_NEGATIVE(weight)
        except argparse.ArgumentTypeError:
            raise ArgumentError(f"--data-path: blend weight {weight!r} is not a finite number "
                                ">= 0 (expected weight prefix pairs)")
    _require(sum(float(w) for w in data_path[0::2]) > 0, "--data-path: the blend weights sum to 0")


def _validate_split(split: str) -> None:
    try:
        weights = [float(part) for part in split.replace("/", ",").split(",")]
    except ValueError:
        raise ArgumentError(f"--split {split!r} must be comma-separated numbers, e.g. '969,30,1'")
    _require(len(weights) <= 3 and sum(weights) > 0 and min(weights) >= 0
             and all(map(math.isfinite, weights)),
             f"--split {split!r}: up to 3 finite weights >= 0, sum > 0")
    _require(weights[0] > 0, f"--split {split!r} leaves no training data (the first weight is 0)")


def _validate_pipeline(args: argparse.Namespace) -> None:
    pp = args.pipeline_model_parallel_size
    _require(args.num_layers % pp == 0,
             f"--num-layers {args.num_layers} is not divisible by --pipeline-model-parallel-size {pp}")
    per_stage = args.num_layers_per_virtual_pipeline_stage
    if per_stage is not None:
        _require(pp > 1, "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")
        _require((args.num_layers // pp) % per_stage == 0,
                 f"layers per pipeline stage {args.num_layers // pp} are not divisible by "
                 f"--num-layers-per-virtual-pipeline-stage {per_stage}")


def _validate_interleaving(args: argparse.Namespace) -> None:
    pp = args.pipeline_model_parallel_size
    if args.num_layers_per_virtual_pipeline_stage is not None:
        num_microbatches = args.global_batch_size // (args.micro_batch_size * args.data_parallel_size)
        _require(num_microbatches % pp == 0,
                 f"interleaved pipelining needs the number of micro-batches ({num_microbatches}) "
                 f"to be a multiple of --pipeline-model-parallel-size {pp}")


def _validate_moma(args: argparse.Namespace) -> None:
    if "moma" not in args.architecture:
        return
    _require(args.disable_bias_linear, "MoMa experts need --disable-bias-linear (as Megatron's MoE on CPU)")
    _require(args.tensor_model_parallel_size == 1 or args.sequence_parallel
             or args.moma_routing == "expert_choice",
             "MoMa --moma-routing token_choice with --tensor-model-parallel-size > 1 needs "
             "--sequence-parallel (as Megatron's MoE)")
    _require(args.moma_routing == "token_choice" or (not args.moe_aux_loss_coeff
                                                      and args.moe_z_loss_coeff is None),
             "--moe-aux-loss-coeff and --moe-z-loss-coeff weight token choice's router losses: "
             "they need --moma-routing token_choice")
    expert_tp = expert_tensor_parallel_size(args)
    _require(args.ffn_hidden_size % expert_tp == 0,
             f"--ffn-hidden-size {args.ffn_hidden_size} is not divisible by the expert-tensor-parallel "
             f"size {expert_tp} (--expert-tensor-parallel-size, default the TP size) that splits "
             "every MoMa expert")
    ep = args.expert_model_parallel_size
    for experts in args.moma_experts_per_modality:
        _require(experts % ep == 0,
                 f"--moma-experts-per-modality {args.moma_experts_per_modality}: every group must be "
                 f"divisible by --expert-model-parallel-size {ep}")


def _validate_fp8(args: argparse.Namespace) -> None:
    """FP8 that this machine, this build and this architecture can run, or an error saying why."""
    if args.fp8_format is None:
        return
    import torch

    from megatron_moma.layers.fp8 import fp8_support_problem
    from megatron_moma.specs import backend

    use_te = backend.transformer_engine_available()
    capability = (torch.cuda.get_device_capability()
                  if args.device == "cuda" and torch.cuda.is_available() else None)
    problem = fp8_support_problem(args.fp8_recipe, use_te, args.device, capability)
    _require(problem is None, f"--fp8-format {args.fp8_format} --fp8-recipe {args.fp8_recipe}: "
                              f"{problem}")
    _require(args.bf16, "--fp8-format needs --bf16 (FP8 GEMMs take and return bf16)")
    if use_te:
        _require(args.architecture != "mot",
                 "--fp8-format with --architecture mot would change nothing: MoT's per-modality "
                 "projections are not Transformer Engine linears (use mot+moma for FP8 experts)")
    else:
        _require("moma" in args.architecture,
                 f"--fp8-format without Transformer Engine covers MoMa expert GEMMs only; "
                 f"--architecture {args.architecture} has none")
    _require(args.hidden_size % 16 == 0 and args.ffn_hidden_size % 16 == 0,
             f"--fp8-format needs --hidden-size ({args.hidden_size}) and --ffn-hidden-size "
             f"({args.ffn_hidden_size}) divisible by 16")


def lr_schedule_iters(args: argparse.Namespace, start_iteration: int = 0) -> Tuple[int, int]:
    """(warm-up, decay) iterations of an LR schedule that starts at iteration `start_iteration`
    (a fresh schedule on a resumed checkpoint: an upcycled one). Megatron-LM's semantics:
    --lr-decay-iters counts the schedule's iterations, by default those left to --train-iters,
    so the LR reaches --min-lr at the last iteration; --lr-warmup-fraction is a share of them."""
    decay = args.lr_decay_iters if args.lr_decay_iters is not None else args.train_iters - start_iteration
    if args.lr_warmup_fraction is not None:
        return int(args.lr_warmup_fraction * decay), decay
    return args.lr_warmup_iters, decay


def _validate_attention_backend(args: argparse.Namespace) -> None:
    if args.attention_backend != "fused" or args.device != "cpu":
        return
    from megatron_moma.specs import backend

    _require(backend.transformer_engine_available(),
             "--attention-backend fused is cuDNN / memory-efficient attention, CUDA only; on "
             "--device cpu use auto, flash, unfused or local")


def expert_tensor_parallel_size(args: argparse.Namespace) -> int:
    """--expert-tensor-parallel-size, or Megatron's default: the TP size."""
    return args.expert_tensor_parallel_size or args.tensor_model_parallel_size


def virtual_pipeline_size(args: argparse.Namespace) -> Optional[int]:
    """Model chunks per pipeline rank (Megatron-LM derives it the same way), or None."""
    if args.num_layers_per_virtual_pipeline_stage is None:
        return None
    layers_per_stage = args.num_layers // args.pipeline_model_parallel_size
    return math.ceil(layers_per_stage / args.num_layers_per_virtual_pipeline_stage)
