"""`benchmarks/reproduce_flops_savings.py --quick` end to end: the real trainer on a small digits
corpus, then the saving factors, the markdown table and the plots (seconds on CPU)."""

import importlib.util
import json
import os

import pytest
import torch

from megatron_moma.training.flops_savings import LOSS_TAGS

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
QUICK_ARCHITECTURES = ["dense", "moe_8x", "moma_1t1i", "moma_4t4i", "mot", "mot+moma_4t4i"]


@pytest.fixture
def reproduce(monkeypatch):
    """The script as a module (its sibling modules importable, as when it runs as a script)."""
    monkeypatch.syspath_prepend(BENCHMARKS)
    spec = importlib.util.spec_from_file_location(
        "reproduce_flops_savings", os.path.join(BENCHMARKS, "reproduce_flops_savings.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # The script forks its trainer with the parent's thread count. GNU OpenMP cannot start a
    # thread team in a child forked after the parent used one (this pytest process has; a fresh
    # `python reproduce_flops_savings.py` has not), so the runs here are single-threaded.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield module
    torch.set_num_threads(threads)


def test_quick_run_writes_factors_table_and_plots_and_reuses_finished_runs(reproduce, tmp_path, capsys):
    output = str(tmp_path / "out")
    assert reproduce.main(["--quick", "--output-dir", output]) == 0
    with open(os.path.join(output, "results.json")) as results_file:
        results = json.load(results_file)
    setting = results["setting"]
    assert setting["seeds"] == [1] and setting["train_iters"] == 12
    assert list(results["runs"]) == QUICK_ARCHITECTURES
    assert list(results["saving_factors"]) == QUICK_ARCHITECTURES[1:]

    # The FLOPs recovered from the logged throughput equal megatron_moma.training.flops's count:
    # 3 x forward FLOPs per token x tokens per step x steps (every modality costs the same here).
    dense = results["runs"]["dense"]["1"]
    per_token = reproduce.forward_flops(dense["flags"])
    tokens = setting["global_batch_size"] * setting["seq_length"] * setting["train_iters"]
    assert dense["total_flops"] == pytest.approx(3 * per_token * tokens, rel=1e-5)
    moe = results["runs"]["moe_8x"]["1"]
    assert moe["total_flops"] > dense["total_flops"], "moe_8x pays for its router"

    for name in QUICK_ARCHITECTURES[1:]:
        for tag in LOSS_TAGS:
            entry = results["saving_factors"][name][tag]
            seed = entry["per_seed"]["1"]
            assert seed["target_loss"] == pytest.approx(dense["final_loss"][tag])
            assert 0 < seed["dense_flops"] <= dense["total_flops"]
            if seed["factor"] is None:
                assert seed["model_flops"] is None and entry["mean"] is None
            else:
                assert seed["factor"] == pytest.approx(seed["dense_flops"] / seed["model_flops"])
                assert entry["mean"] == pytest.approx(seed["factor"])

    # Expert-choice coverage: shares of every group's tokens taken by 0 / 1 / 2+ experts sum to
    # one; at capacity factor 1 the experts take as many (token, expert) pairs as there are
    # tokens (up to rounding each expert's capacity up), so 1 x share_1 + 2 x share_2plus <= ~1.
    assert results["runs"]["dense"]["1"]["coverage"] == {}
    for name in ("moma_4t4i", "moe_8x"):
        coverage = results["runs"][name]["1"]["coverage"]
        assert coverage, name
        for shares in coverage.values():
            assert sum(shares.values()) == pytest.approx(1.0)
            assert shares["1"] + 2 * shares["2plus"] <= 1.1
    assert sorted(results["runs"]["moma_4t4i"]["1"]["coverage"]) == ["image", "text"]

    with open(os.path.join(output, "results.md")) as table_file:
        table = table_file.read()
    assert "| moma_4t4i | image | " in table  # the coverage table
    for name in QUICK_ARCHITECTURES[1:]:
        assert f"| {name} |" in table
    assert "3.7x" in table and "5.2x" in table  # the paper's MoMa 4t4i numbers beside ours
    for plot in ("loss_vs_flops_lm.png", "loss_vs_flops_text.png", "loss_vs_flops_image.png"):
        with open(os.path.join(output, plot), "rb") as png:
            assert png.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not [name for name in os.listdir(os.path.join(output, "runs")) if name.endswith(".tmp")]

    capsys.readouterr()
    assert reproduce.main(["--quick", "--output-dir", output, "--architectures", "moma_4t4i"]) == 0
    printed = capsys.readouterr().out
    assert "dense seed 1: reusing" in printed and "moma_4t4i seed 1: reusing" in printed
    with open(os.path.join(output, "results.json")) as results_file:
        assert list(json.load(results_file)["saving_factors"]) == ["moma_4t4i"]
