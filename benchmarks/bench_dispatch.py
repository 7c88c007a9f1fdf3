"""Permute + unpermute-combine, forward and backward, timed in one run for:
  ours      megatron_moma.ops on the csrc kernels (C++ on CPU, CUDA on a GPU), bucket included,
            from the (token, expert, weight) selections the MoMa layer produces;
  fallback  the same ops on the pure-torch fallback (MEGATRON_MOMA_DISABLE_EXT's path);
  mcore     megatron-core's unfused moe_utils.permute / unpermute with probs (its interface: the
            routing map and dense probs, which it turns into indices inside);
  copy      a plain tensor copy into a buffer allocated beforehand, for the bandwidth ratio.
Expert-choice routing with 8 experts at capacity factor 1 (a token can be taken by several
experts, or by none). The four are timed in turn, round after round, so a change in the load of
a shared machine falls on all of them alike; the medians are compared. Prints ratios (never
asserts a time) and the machine's load average, and writes JSON.

    PYTHONPATH=. python benchmarks/bench_dispatch.py [--device cuda] [--json out.json]
"""

import argparse
import json
import os
import statistics
import time

import torch
from megatron.core.transformer.moe import moe_utils

from megatron_moma.ops import bucket, kernels, permute, unpermute_combine

NUM_EXPERTS = 8


def expert_choice(num_tokens, device, generator):
    """Each expert takes its top num_tokens/8 tokens by a random score -> routing map [N, E]
    bool and probs [N, E] (0 where not taken)."""
    scores = torch.rand(num_tokens, NUM_EXPERTS, generator=generator).to(device)
    capacity = num_tokens // NUM_EXPERTS
    chosen = scores.topk(capacity, dim=0).indices  # [capacity, E]
    routing_map = torch.zeros_like(scores, dtype=torch.bool)
    routing_map.scatter_(0, chosen, True)
    return routing_map, scores * routing_map


def selections(routing_map, probs):
    """(token, expert, weight) [R] of every selection, expert-major, as the MoMa layer hands
    them to the dispatch (built outside the timed step, like the layer's routing)."""
    expert, token = routing_map.t().nonzero(as_tuple=True)
    return token, expert, probs[token, expert]


def run_ours(tokens, selected, grad_out):
    """bucket, permute, unpermute-combine, and the backward of both (tokens and weights)."""
    token, expert, weight = selected
    layout = bucket(token, expert, tokens.shape[0], NUM_EXPERTS)
    out = unpermute_combine(permute(tokens, layout), weight[layout.order], layout)
    out.backward(grad_out)


def run_mcore(tokens, routing_map, probs, grad_out):
    permuted, _, sorted_indices = moe_utils.permute(tokens, routing_map)
    out = moe_utils.unpermute(permuted, sorted_indices, tokens.shape, probs=probs,
                              routing_map=routing_map)
    out.backward(grad_out)


def median_seconds(steps, device, repeats, warmup=2):
    """{name: step} -> {name: median seconds}, each step timed once per round, in turn."""
    times = {name: [] for name in steps}
    for i in range(warmup + repeats):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def on_the_fallback(step):
    """The step with megatron_moma.ops on its pure-torch fallback."""
    def run():
        extension = kernels.extension
        kernels.extension = None
        try:
            step()
        finally:
            kernels.extension = extension
    return run


def bench_shape(num_tokens, hidden, dtype, device, repeats):
    generator = torch.Generator().manual_seed(0)
    routing_map, probs = expert_choice(num_tokens, device, generator)
    rows = int(routing_map.sum())
    x = torch.randn(num_tokens, hidden, generator=generator).to(device=device, dtype=dtype)
    grad_out = torch.randn(num_tokens, hidden, generator=generator).to(device=device, dtype=dtype)
    probs = probs.to(dtype)

    token, expert, weight = selections(routing_map, probs)

    def ours():
        run_ours(x.detach().requires_grad_(True),
                 (token, expert, weight.detach().requires_grad_(True)), grad_out)

    def mcore():
        run_mcore(x.detach().requires_grad_(True), routing_map, probs.detach().requires_grad_(True),
                  grad_out)

    # Rows moved by permute + combine, forward and backward: permute reads and writes R rows;
    # combine reads R, writes N; its backward reads R gathered + R and writes R; permute's
    # backward reads R and writes N.
    bytes_moved = (7 * rows + 2 * num_tokens) * hidden * x.element_size()
    source = torch.empty(bytes_moved // 2 // x.element_size(), dtype=dtype, device=device)
    target = torch.empty_like(source)
    seconds = median_seconds({
        "ours": ours,
        "fallback": on_the_fallback(ours),
        "mcore_unfused": mcore,
        "copy": lambda: target.copy_(source),
    }, device, repeats)
    copy_bandwidth = 2 * source.numel() * source.element_size() / seconds["copy"]
    ours_bandwidth = bytes_moved / seconds["ours"]
    return {
        "tokens": num_tokens, "hidden": hidden, "rows": rows, "dtype": str(dtype).split(".")[-1],
        "device": device.type, "backend": kernels.backend_for(x),
        "seconds": seconds,
        "speedup_vs_fallback": seconds["fallback"] / seconds["ours"],
        "speedup_vs_mcore_unfused": seconds["mcore_unfused"] / seconds["ours"],
        "bytes_moved": bytes_moved,
        "ours_bytes_per_s": ours_bandwidth,
        "copy_bytes_per_s": copy_bandwidth,
        "fraction_of_copy_bandwidth": ours_bandwidth / copy_bandwidth,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: fp32 on "
                        "CPU, bf16 on a GPU)")
    parser.add_argument("--shapes", default="4096x1024,16384x1024,32768x1024,4096x4096",
                        help="comma-separated TOKENSxHIDDEN")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", default="bench_dispatch.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))

    results = []
    header = (f"{'tokens':>7} {'hidden':>6} {'rows':>7} {'ours ms':>9} {'fallback':>9} "
              f"{'mcore':>9} {'vs fallback':>11} {'vs mcore':>9} {'of copy bw':>10}")
    load_before = os.getloadavg()
    print(f"backend: {kernels.backend_for(torch.zeros(1, dtype=dtype, device=device))}, "
          f"dtype {dtype}, device {device}, threads {torch.get_num_threads()}, "
          f"load average {load_before[0]:.2f} on {os.cpu_count()} CPUs")
    print(header)
    for shape in args.shapes.split(","):
        num_tokens, hidden = (int(v) for v in shape.split("x"))
        r = bench_shape(num_tokens, hidden, dtype, device, args.repeats)
        results.append(r)
        s = r["seconds"]
        print(f"{num_tokens:>7} {hidden:>6} {r['rows']:>7} {s['ours'] * 1e3:>9.2f} "
              f"{s['fallback'] * 1e3:>9.2f} {s['mcore_unfused'] * 1e3:>9.2f} "
              f"{r['speedup_vs_fallback']:>10.2f}x {r['speedup_vs_mcore_unfused']:>8.2f}x "
              f"{r['fraction_of_copy_bandwidth']:>9.0%}")
    load_after = os.getloadavg()
    print(f"load average at the end {load_after[0]:.2f}")
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump({"torch": torch.__version__, "cpus": os.cpu_count(),
                   "threads": torch.get_num_threads(),
                   "load_average_1min": {"start": load_before[0], "end": load_after[0]},
                   "results": results}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
