"""benchmarks/bench_layers.py: how variants are matched and what a run writes (never a time)."""

import importlib.util
import json
import os

import pytest
import torch

from megatron_moma.testing.multiprocess import run_on_ranks

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(BENCHMARKS)
    spec = importlib.util.spec_from_file_location("bench_layers",
                                                  os.path.join(BENCHMARKS, "bench_layers.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mod_stacks_get_the_layers_that_match_dense_flops(bench):
    args = bench.parse_args(["--seq-length", "1024"])
    # Hidden 256, FFN 1024, s = 1024. A dense layer: projections 8h^2 = 524,288, attention
    # 4sh = 1,048,576, SwiGLU 6hf = 1,572,864: 3,145,728 per token. A routed MoD layer (c_d = 1/4,
    # attending over s/4): (524,288 + 262,144 + 1,572,864) / 4 + router 2h = 590,336. MoD on
    # layers 0, 2, ...: 7 layers = 4 routed + 3 whole = 11,798,528 (0.938 of 4 dense layers),
    # 8 layers = 14,944,256 (1.188): 7 is closest.
    assert bench.matched_num_layers(args, "small", "mod", 4) == 7
    dense = bench.flops_per_token(bench.layer_config(args, "small", "dense", 4), 1024, 0.3)
    mod = bench.flops_per_token(bench.layer_config(args, "small", "mod", 7), 1024, 0.3)
    assert (dense, mod) == pytest.approx((4 * 3_145_728, 11_798_528))
    assert bench.matched_num_layers(args, "435m", "mod+moma_4t4i", 1) == 2
    assert bench.matched_num_layers(args, "small", "mot", 4) == 4


def test_each_sequence_holds_one_image_span_at_its_own_offset(bench):
    ids = bench.modality_ids(seq_length=8, micro_batch_size=2, image_share=0.25)
    assert ids.tolist() == [[1, 1, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 0, 0]]


def test_a_small_run_writes_every_variant_with_ratios_memory_and_flops(bench, tmp_path):
    path = str(tmp_path / "layers.json")
    argv = ["--runs", "small:1", "--seq-length", "32", "--micro-batch-size", "2", "--iters", "2",
            "--warmup", "0", "--image-shares", "0.5", "--json", path,
            "--variants", "moma_4t4i", "moe_8x", "mot", "mod"]
    assert run_on_ranks(bench.main, 1, argv, timeout=300) == [0]
    with open(path) as results_file:
        results = json.load(results_file)
    (run,) = results["runs"]
    assert (run["shape"], run["dense_layers"], run["image_share"], run["tokens"]) == ("small", 1, 0.5, 64)
    rows = run["variants"]
    assert list(rows) == ["dense", "moma_4t4i", "moe_8x", "mot", "mod"]
    assert rows["dense"]["time_vs_dense"] == 1.0 and rows["mod"]["layers"] == 2
    assert rows["mot"]["flops_vs_dense"] == 1.0
    # Experts of the dense FFN's size: 8 of them hold 8x the dense MLP's weights.
    assert rows["moma_4t4i"]["parameter_mb"] > 4 * rows["dense"]["parameter_mb"]
    for row in rows.values():
        assert row["median_ms"] > 0 and row["peak_step_mb"] > 0 and "mfu" not in row
    assert results["machine"]["torch"] == torch.__version__


@pytest.mark.gpu
def test_cuda_run_reports_tflops_and_mfu(bench, tmp_path):
    path = str(tmp_path / "layers.json")
    assert bench.main(["--device", "cuda", "--runs", "small:1", "--iters", "2", "--warmup", "1",
                       "--image-shares", "0.3", "--peak-tflops", "100", "--json", path]) == 0
    with open(path) as results_file:
        rows = json.load(results_file)["runs"][0]["variants"]
    for row in rows.values():
        assert row["achieved_tflops"] > 0 and row["mfu"] == pytest.approx(row["achieved_tflops"] / 100)
