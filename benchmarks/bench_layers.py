"""Forward+backward time of one transformer layer of each architecture, as a ratio to dense.

Every variant has the dense layer's active FLOPs per token (MoMa and moe_8x: expert choice at
capacity factor 1 over experts of the dense FFN's size; MoT: the dense shapes per modality) except
MoD, whose layer processes `capacity` of the tokens (printed as its FLOPs ratio: exact for the
projections and MLP, an upper bound for attention, which scales with capacity squared).
Each variant runs in its own forked process (one gloo rank) on the same tokens, after warm-up;
the table gives the median time of `--iters` steps as a ratio to dense measured in the same run,
and the growth of the process's peak resident memory. Results also go to a JSON file.

    python benchmarks/bench_layers.py --hidden-size 256 --seq-length 1024 --json layers.json

Benchmarks are not tests: nothing here asserts a time.
"""

import argparse
import json
import platform as host_platform
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from megatron_moma.config import ModalityTransformerConfig, MoDOptions, MoMaOptions, MoTOptions
from megatron_moma.modality import ModalityIndex, ModalityLayout
from megatron_moma.modality.context import ModalityContext, attach_context
from megatron_moma.testing.multiprocess import run_on_ranks

VARIANTS = {
    # name: (option groups, single mixed group?)
    "dense": (dict(), False),
    "moma_1t1i": (dict(moma=MoMaOptions(experts_per_modality=(1, 1))), False),
    "moma_4t4i": (dict(moma=MoMaOptions(experts_per_modality=(4, 4))), False),
    "moe_8x": (dict(moma=MoMaOptions(experts_per_modality=(8,))), True),
    "mot": (dict(mot=MoTOptions()), False),
    "mot+moma_4t4i": (dict(mot=MoTOptions(), moma=MoMaOptions(experts_per_modality=(4, 4))), False),
    "mod+moma_1t1i": (dict(mod=MoDOptions(), moma=MoMaOptions(experts_per_modality=(1, 1))), False),
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-attention-heads", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--image-shares", type=float, nargs="+", default=[0.3, 0.7],
                        help="share of image tokens in the micro-batch (one table per share)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--json", default="bench_layers.json")
    return parser.parse_args()


def layer_config(args, variant: str) -> ModalityTransformerConfig:
    options, single_group = VARIANTS[variant]
    layout = ModalityLayout() if single_group else ModalityLayout.text_and_image(32768, 65535)
    return ModalityTransformerConfig(
        num_layers=1, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=4 * args.hidden_size, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, normalization="RMSNorm", hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, modality_layout=layout, **options,
    )


def modality_ids(args, image_share: float) -> torch.Tensor:
    """[b, s]: each sequence is a text span followed by an image span of the given share."""
    image_tokens = int(round(image_share * args.seq_length))
    ids = torch.zeros(args.micro_batch_size, args.seq_length, dtype=torch.long)
    ids[:, args.seq_length - image_tokens :] = 1
    return ids


def time_variant(args, variant: str, image_share: float) -> dict:
    """Runs on one forked gloo rank: build the layer, time forward+backward."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.spec_utils import build_module

    from megatron_moma.models import get_layer_spec

    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(0)
    config = layer_config(args, variant)
    layer = build_module(get_layer_spec(config), config=config, layer_number=1)
    context = ModalityContext()
    attach_context(layer, context)
    ids = modality_ids(args, image_share)
    if VARIANTS[variant][1]:
        ids = torch.zeros_like(ids)
    context.index = ModalityIndex.from_batch(ids, config.modality_layout.num_modalities)
    hidden = torch.randn(args.seq_length, args.micro_batch_size, args.hidden_size,
                         generator=torch.Generator().manual_seed(0))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for step in range(args.warmup + args.iters):
        x = hidden.clone().requires_grad_(True)
        start = time.perf_counter()
        output, _ = layer(x, attention_mask=None)
        output.float().square().mean().backward()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
        layer.zero_grad(set_to_none=True)
    peak_growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    return {"median_s": statistics.median(times), "peak_rss_growth_mb": peak_growth_mb,
            "flops_ratio": config.mod.capacity if config.mod else 1.0}


def main():
    args = parse_args()
    results = {"machine": f"{host_platform.machine()} {host_platform.processor()} "
                          f"{torch.get_num_threads()} threads, torch {torch.__version__}",
               "shape": vars(args), "tables": {}}
    for share in args.image_shares:
        rows = {}
        for variant in ["dense"] + [v for v in args.variants if v != "dense"]:
            rows[variant] = run_on_ranks(time_variant, 1, args, variant, share,
                                         threads_per_rank=torch.get_num_threads(), timeout=1800)[0]
        dense = rows["dense"]["median_s"]
        for row in rows.values():
            row["time_vs_dense"] = row["median_s"] / dense
        results["tables"][f"image_share_{share}"] = rows
        print(f"\nimage share {share:.0%}, tokens {args.seq_length} x {args.micro_batch_size}, "
              f"hidden {args.hidden_size}, ffn {4 * args.hidden_size}")
        print(f"{'variant':<16}{'fwd+bwd ms':>12}{'vs dense':>10}{'FLOPs vs dense':>16}{'peak RSS +MB':>14}")
        for name, row in rows.items():
            print(f"{name:<16}{row['median_s'] * 1e3:>12.1f}{row['time_vs_dense']:>10.2f}"
                  f"{row['flops_ratio']:>16.2f}{row['peak_rss_growth_mb']:>14.1f}")
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
