"""Forward+backward time and peak memory of the modality-aware layers as ratios to dense, at equal
active FLOPs per token, measured in one run. Benchmarks are not tests: nothing here asserts a time.

Variants (each a stack of `--runs` SHAPE:LAYERS layers; Megatron's TransformerBlock without the
final norm; local megatron-core modules on CPU, Transformer Engine modules where TE imports):
  dense           Megatron's SwiGLU layer.
  moma_1t1i       MoMa, one expert per modality (modality untying, no router).
  moma_4t4i       MoMa, 4 text + 4 image experts, expert choice at capacity factor 1, without
                  auxiliary routers (the papers train those in a second stage, model frozen).
  moma_4t4i+aux   the same with auxiliary routers trained alongside (this project's default).
  moe_8x          8 experts in one group shared by every modality (the MoMa paper's baseline).
  mot             Mixture-of-Transformers: every non-embedding weight per modality.
  mot+moma_4t4i   MoT with MoMa 4t4i MLPs.
  mod             Mixture-of-Depths (c_d = 0.25, alternating layers from 0) over dense layers.
  mod+moma_4t4i   the same over MoMa 4t4i layers.
MoD here routes with its training rule and has no auxiliary router, like MoMa above.

How FLOPs are matched: every expert has the dense FFN's size, and expert choice at capacity factor
1 gives each token one expert pass on average, so MoMa and moe_8x cost the dense FLOPs plus their
routers; MoT keeps the dense shapes per modality (exactly the dense FLOPs); a MoD stack gets the
number of layers whose FLOPs per token are closest to the dense stack's (4 dense layers -> 7 with
MoD on layers 0, 2, 4, 6: equal; 1 -> 2: 1.25x). FLOPs are megatron_moma.training.flops's count
(Megatron's convention) and the table prints each variant's as a ratio to dense.

Tokens: `--micro-batch-size` sequences of `--seq-length`; each holds one image span of
`image share x seq-length` tokens, sequence i's starting at i x seq-length / micro-batch-size
(wrapping), so Megatron's [s, b] token rows interleave text and image as in a mixed batch.

Timing: every variant of a run is built in one process; after warm-up, each of `--iters` rounds
times every variant once (the order rotating per round). `vs dense` is the median over rounds of
(variant time / dense time of the same round), with the 25th-75th percentile range: a change of
load on a shared machine hits both sides of each ratio. `--clock cpu` times the process's CPU time
instead of wall time: with one thread, time other processes take from the cores does not count.

Memory: the peak of one step above what was allocated before it (activations, gradients,
workspaces; parameters are listed apart). CUDA: torch.cuda.max_memory_allocated. CPU: the peak of
the running sum of the tensor allocations and frees recorded by torch's profiler
(profile_memory=True): torch's own accounting, not the process's RSS.

GPU (`--device cuda --dtype bf16`, `--fp8` for Transformer Engine FP8 via Megatron's `fp8`
config): adds achieved TFLOP/s (3 x the forward FLOPs of the step, as Megatron-LM counts
training FLOPs) and MFU against the device's dense peak (PEAK_TFLOPS by device name, or
`--peak-tflops`).

`--profile-dir DIR` writes, per run and variant, torch's profiler table (self time by operator)
and puts in the JSON the operators whose self time (median over `--profile-steps` rounds of one
profiled step per variant) grows most over dense's.

    PYTHONPATH=. python benchmarks/bench_layers.py --json bench_layers.json
    PYTHONPATH=. python benchmarks/bench_layers.py --device cuda --dtype bf16 --runs 435m:4
"""

import argparse
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from megatron_moma.config import ModalityTransformerConfig, MoDOptions, MoMaOptions, MoTOptions
from megatron_moma.layers.routing_statistics import ROUTING_STATISTICS
from megatron_moma.modality import ModalityIndex, ModalityLayout
from megatron_moma.modality.context import ModalityContext, attach_context
from megatron_moma.training.flops import forward_flops_per_token

import machine
from atomic_files import write_text
from flops_matching import closest_num_layers

# name: (hidden size, attention heads, FFN hidden size). 435m and 1.4b: the MoMa paper's 435M and
# 1.4B dense bases (docs/layers.md §8: 24 layers of these each).
SHAPES = {"small": (256, 4, 1024), "435m": (1024, 16, 4096), "1.4b": (2048, 16, 8192)}

# Dense (no sparsity) tensor-core peak TFLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp8": 1979.0},
    "H100 80GB HBM3": {"bf16": 989.0, "fp8": 1979.0},
    "H100 PCIe": {"bf16": 756.0, "fp8": 1513.0},
    "A100": {"bf16": 312.0},
}

IMAGE_LAYOUT = ModalityLayout.text_and_image(4, 8195)


@dataclass(frozen=True)
class Variant:
    """Option groups of one variant; `mixed_group`: one expert group for every modality."""

    moma: Optional[MoMaOptions] = None
    mot: Optional[MoTOptions] = None
    mod: Optional[MoDOptions] = None
    mixed_group: bool = False


STAGE_ONE = dict(aux_router=False, inference_routing="expert_choice")
MOMA_4T4I = MoMaOptions(experts_per_modality=(4, 4), **STAGE_ONE)
MOD = MoDOptions(capacity=0.25, aux_router=False, inference_routing="top_k")
VARIANTS = {
    "dense": Variant(),
    "moma_1t1i": Variant(moma=MoMaOptions(experts_per_modality=(1, 1))),
    "moma_4t4i": Variant(moma=MOMA_4T4I),
    "moma_4t4i+aux": Variant(moma=MoMaOptions(experts_per_modality=(4, 4))),
    "moe_8x": Variant(moma=MoMaOptions(experts_per_modality=(8,), **STAGE_ONE), mixed_group=True),
    "mot": Variant(mot=MoTOptions()),
    "mot+moma_4t4i": Variant(mot=MoTOptions(), moma=MOMA_4T4I),
    "mod": Variant(mod=MOD),
    "mod+moma_4t4i": Variant(moma=MOMA_4T4I, mod=MOD),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["small:1", "small:4", "435m:1"],
                        help=f"SHAPE:LAYERS stacks to time, SHAPE one of {sorted(SHAPES)}")
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--image-shares", type=float, nargs="+", default=[0.3, 0.7],
                        help="share of image tokens in each sequence (one table per share)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--iters", type=int, default=10, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: the process's CPU time (CPU only; robust to other processes on a "
                             "shared machine when single-threaded, OMP_NUM_THREADS=1)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                        help="default fp32 on cpu, bf16 on cuda")
    parser.add_argument("--fp8", action="store_true",
                        help="Transformer Engine FP8 (Megatron's fp8='hybrid'); cuda with TE only")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak for MFU (default: PEAK_TFLOPS by device name)")
    parser.add_argument("--profile-dir", default=None,
                        help="write torch profiler tables per run and variant here")
    parser.add_argument("--profile-steps", type=int, default=5,
                        help="profiled rounds (per operator: the median over rounds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="bench_layers.json")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    for run in args.runs:
        shape, _, layers = run.partition(":")
        if shape not in SHAPES or not layers.isdigit() or int(layers) < 1:
            parser.error(f"--runs {run!r}: expected SHAPE:LAYERS with SHAPE in {sorted(SHAPES)}")
    if args.clock == "cpu" and args.device != "cpu":
        parser.error("--clock cpu measures CPU time: --device cpu only")
    if args.fp8 and args.device != "cuda":
        parser.error("--fp8 needs --device cuda (Transformer Engine)")
    if "dense" not in args.variants:
        args.variants = ["dense"] + args.variants
    return args


# ----------------------------------------------------------------------------- configs and FLOPs
def layer_config(args, shape: str, variant: str, num_layers: int) -> ModalityTransformerConfig:
    hidden, heads, ffn = SHAPES[shape]
    options = VARIANTS[variant]
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    return ModalityTransformerConfig(
        num_layers=num_layers, hidden_size=hidden, num_attention_heads=heads,
        ffn_hidden_size=ffn, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, normalization="RMSNorm", hidden_dropout=0.0,
        attention_dropout=0.0, bf16=args.dtype == "bf16", params_dtype=dtype,
        use_cpu_initialization=args.device == "cpu", fp8="hybrid" if args.fp8 else None,
        modality_layout=ModalityLayout() if options.mixed_group else IMAGE_LAYOUT,
        moma=options.moma, mot=options.mot, mod=options.mod,
    )


def flops_per_token(config: ModalityTransformerConfig, seq_length: int, image_share: float) -> float:
    """Forward FLOPs per token of the layers (no output layer), averaged over the token mix."""
    per_modality = forward_flops_per_token(config, vocab_size=0, seq_length=seq_length)
    if len(per_modality) == 1:
        return per_modality["text"]
    return (1 - image_share) * per_modality["text"] + image_share * per_modality["image"]


def matched_num_layers(args, shape: str, variant: str, dense_layers: int) -> int:
    """Layers of `variant` with the FLOPs per token of `dense_layers` dense layers (flops_matching)."""
    if VARIANTS[variant].mod is None:
        return dense_layers
    share = args.image_shares[0]
    target = flops_per_token(layer_config(args, shape, "dense", dense_layers), args.seq_length, share)
    return closest_num_layers(
        lambda n: flops_per_token(layer_config(args, shape, variant, n), args.seq_length, share),
        target, dense_layers)


# ----------------------------------------------------------------------------- one step
def modality_ids(seq_length: int, micro_batch_size: int, image_share: float) -> torch.Tensor:
    """[b, s] ids, 1 = image: one image span per sequence (see the module docstring)."""
    ids = torch.zeros(micro_batch_size, seq_length, dtype=torch.long)
    image_tokens = round(image_share * seq_length)
    for i in range(micro_batch_size):
        start = i * seq_length // micro_batch_size
        ids[i, (start + torch.arange(image_tokens)) % seq_length] = 1
    return ids


class Stack:
    """One variant's layers, its modality context and a forward+backward step."""

    def __init__(self, config: ModalityTransformerConfig, device: str):
        from megatron.core.transformer.transformer_block import TransformerBlock

        from megatron_moma.models import get_layer_spec

        self.config = config
        self.block = TransformerBlock(config, get_layer_spec(config), post_layer_norm=False)
        if device == "cuda":
            self.block.cuda()
        self.context = ModalityContext()
        attach_context(self.block, self.context)
        self.hidden = None

    def set_batch(self, hidden: torch.Tensor, ids_bs: torch.Tensor) -> None:
        """hidden [s, b, h]; ids_bs [b, s] text/image ids (all text for a mixed expert group)."""
        layout = self.config.modality_layout
        ids = ids_bs if layout.num_modalities > 1 else torch.zeros_like(ids_bs)
        self.context.index = ModalityIndex.from_batch(ids.to(hidden.device), layout.num_modalities)
        self.hidden = hidden

    def step(self) -> None:
        x = self.hidden.detach().requires_grad_(True)
        output = self.block(x, attention_mask=None)
        output.float().square().mean().backward()
        self.block.zero_grad(set_to_none=True)

    def untimed_step(self) -> None:
        """A step, then the routing statistics MoMa and MoD layers add in training are dropped:
        they are keyed by layer number, which the variants share."""
        self.step()
        ROUTING_STATISTICS.report()

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.block.parameters())


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def seconds(step: Callable[[], None], device: str, clock: str) -> float:
    """Wall time of `step` (after the device finished), or with `clock="cpu"` the CPU time the
    process spent in it (all its threads), which other processes on the machine do not inflate."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    synchronize(device)
    start = now()
    step()
    synchronize(device)
    return now() - start


def peak_step_bytes(step: Callable[[], None], device: str) -> int:
    """Peak memory of one step above what was allocated before it (module docstring)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    changes = sorted((event.time_range.start, event.self_cpu_memory_usage)
                     for event in prof.events() if event.self_cpu_memory_usage)
    live = peak = 0
    for _, change in changes:
        live += change
        peak = max(peak, live)
    return peak


# ----------------------------------------------------------------------------- profiling
def profile_step(step: Callable[[], None], device: str) -> Tuple[str, Dict[str, float]]:
    """torch profiler over one step: (its table, self time in ms per operator)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        synchronize(device)
    averages = prof.key_averages()
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    return (averages.table(sort_by=key, row_limit=40),
            {event.key: getattr(event, key) / 1e3 for event in averages})


def profile_rounds(stacks: Dict[str, "Stack"], args, label: str, top: int = 15) -> Dict[str, list]:
    """`--profile-steps` rounds of one profiled step per variant; per operator, the median over
    the rounds of its self ms. Writes each variant's table (last round) and returns, per variant,
    the `top` operators by median self ms added over dense's."""
    os.makedirs(args.profile_dir, exist_ok=True)
    rounds, tables = {name: [] for name in stacks}, {}
    for _ in range(args.profile_steps):
        for name, stack in stacks.items():
            tables[name], self_ms = profile_step(stack.untimed_step, args.device)
            rounds[name].append(self_ms)
    medians = {}
    for name, per_round in rounds.items():
        with open(os.path.join(args.profile_dir, f"{label}_{name}.txt"), "w", encoding="utf-8") as out:
            out.write(tables[name])
        operators = set().union(*per_round)
        medians[name] = {op: statistics.median(r.get(op, 0.0) for r in per_round) for op in operators}
    growth = {}
    for name, self_ms in medians.items():
        added = {op: ms - medians["dense"].get(op, 0.0) for op, ms in self_ms.items()}
        growth[name] = sorted(([op, round(ms, 3)] for op, ms in added.items()),
                              key=lambda item: -item[1])[:top]
    return growth


# ----------------------------------------------------------------------------- one run
def peak_tflops(args) -> Optional[float]:
    if args.peak_tflops is not None:
        return args.peak_tflops
    if args.device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    precision = "fp8" if args.fp8 else "bf16"
    for key, peaks in PEAK_TFLOPS.items():
        if key in name and precision in peaks:
            return peaks[precision]
    print(f"no peak TFLOP/s known for {name!r} ({precision}): pass --peak-tflops for MFU")
    return None


def percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def time_rounds(stacks: Dict[str, Stack], args) -> Dict[str, List[float]]:
    """Seconds of each variant's step, per round, the order rotating every round."""
    names = list(stacks)
    for name in names:
        for _ in range(args.warmup):
            stacks[name].untimed_step()
    times = {name: [] for name in names}
    for round_index in range(args.iters):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(seconds(stacks[name].step, args.device, args.clock))
            ROUTING_STATISTICS.report()
    return times


def run_one_share(args, shape: str, num_layers: int, stacks: Dict[str, Stack], share: float,
                  peak: Optional[float]) -> dict:
    hidden_size = SHAPES[shape][0]
    generator = torch.Generator().manual_seed(args.seed)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    hidden = torch.randn(args.seq_length, args.micro_batch_size, hidden_size,
                         generator=generator).to(device=args.device, dtype=dtype)
    ids = modality_ids(args.seq_length, args.micro_batch_size, share)
    for stack in stacks.values():
        stack.set_batch(hidden, ids)
    times = time_rounds(stacks, args)
    tokens = args.seq_length * args.micro_batch_size
    dense_flops = flops_per_token(stacks["dense"].config, args.seq_length, share)
    rows = {}
    for name, stack in stacks.items():
        ratios = [t / d for t, d in zip(times[name], times["dense"])]
        per_token = flops_per_token(stack.config, args.seq_length, share)
        median_s = statistics.median(times[name])
        row = {
            "layers": stack.config.num_layers,
            "flops_per_token": per_token,
            "flops_vs_dense": per_token / dense_flops,
            "median_ms": 1e3 * median_s,
            "time_vs_dense": statistics.median(ratios),
            "time_vs_dense_p25_p75": [percentile(ratios, 0.25), percentile(ratios, 0.75)],
            "peak_step_mb": peak_step_bytes(stack.untimed_step, args.device) / 2**20,
            "parameter_mb": stack.parameter_bytes() / 2**20,
            "achieved_tflops": 3 * per_token * tokens / median_s / 1e12,
        }
        if peak is not None:
            row["mfu"] = row["achieved_tflops"] / peak
        rows[name] = row
    result = {"shape": shape, "hidden_size": hidden_size, "num_attention_heads": SHAPES[shape][1],
              "ffn_hidden_size": SHAPES[shape][2], "dense_layers": num_layers,
              "image_share": share, "tokens": tokens, "variants": rows,
              "load_average_after": machine.load_average()}
    if args.profile_dir:
        result["profile_self_ms_added_over_dense"] = profile_rounds(
            stacks, args, f"{shape}x{num_layers}_image{share:g}")
    print_table(args, result, peak)
    return result


def print_table(args, result: dict, peak: Optional[float]) -> None:
    print(f"\n{result['shape']} x {result['dense_layers']} layer(s) (hidden {result['hidden_size']}, "
          f"heads {result['num_attention_heads']}, ffn {result['ffn_hidden_size']}), "
          f"{args.micro_batch_size} x {args.seq_length} tokens, image share "
          f"{result['image_share']:.0%}, {args.dtype}{' + fp8' if args.fp8 else ''} on {args.device}, "
          f"{args.clock} clock, {torch.get_num_threads()} threads (load average after: "
          f"{result['load_average_after']})")
    header = (f"{'variant':<15}{'layers':>7}{'FLOPs/dense':>12}{'fwd+bwd ms':>12}"
              f"{'vs dense':>10}{'(p25-p75)':>13}{'peak MB':>10}{'params MB':>11}{'TFLOP/s':>9}")
    print(header + (f"{'MFU':>7}" if peak else ""))
    for name, row in result["variants"].items():
        low, high = row["time_vs_dense_p25_p75"]
        line = (f"{name:<15}{row['layers']:>7}{row['flops_vs_dense']:>12.3f}{row['median_ms']:>12.1f}"
                f"{row['time_vs_dense']:>10.3f}{f'{low:.2f}-{high:.2f}':>13}{row['peak_step_mb']:>10.1f}"
                f"{row['parameter_mb']:>11.1f}{row['achieved_tflops']:>9.3f}")
        print(line + (f"{row['mfu']:>7.1%}" if peak else ""), flush=True)


def run(args, shape: str, num_layers: int, peak: Optional[float]) -> List[dict]:
    """Build every variant's stack of `shape`, time it at every image share, free it."""
    stacks = {name: Stack(layer_config(args, shape, name,
                                       matched_num_layers(args, shape, name, num_layers)),
                          args.device)
              for name in args.variants}
    try:
        return [run_one_share(args, shape, num_layers, stacks, share, peak)
                for share in args.image_shares]
    finally:
        del stacks
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_moma.training.pretrain_moma import initialize_distributed

    initialize_distributed(args.device)
    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(args.seed)
    peak = peak_tflops(args)
    results = {"machine": machine.describe(args.device), "command": " ".join(sys.argv),
               "settings": vars(args), "peak_tflops": peak, "runs": []}
    for spec in args.runs:
        shape, _, layers = spec.partition(":")
        results["runs"] += run(args, shape, int(layers), peak)
    write_text(args.json, json.dumps(results, indent=2))
    print(f"\nwrote {args.json}")
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
