"""The real launcher: torchrun starts the CPU smoke run, whose losses equal world size 1."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from megatron_moma.parallel.layout import ParallelLayout
from megatron_moma.testing import gpt_runs
from megatron_moma.testing.multiprocess import run_on_ranks

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "cpu_parallel_smoke.py"


def test_torchrun_tp2_sp_ep2_matches_world_size_1(tmp_path):
    output = tmp_path / "run.json"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(SCRIPT), "--num-experts", "4", "--tensor-model-parallel-size", "2",
        "--sequence-parallel", "--expert-model-parallel-size", "2",
        "--expert-tensor-parallel-size", "1", "--train-iters", "3", "--json", str(output),
    ]
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "iteration    3/3 | lm loss" in completed.stdout
    run = json.loads(output.read_text())

    spec = gpt_runs.TrainSpec(optimizer="adam", lr=1e-2, steps=3)
    reference = run_on_ranks(
        gpt_runs.train, 1, gpt_runs.TinyGPT(num_experts=4), ParallelLayout(), spec, timeout=120
    )[0]
    assert run["layout"] == "tp2-sp-ep2-etp1"
    torch.testing.assert_close(run["lm_loss"], reference.losses, rtol=1e-6, atol=2e-6)
    torch.testing.assert_close(run["grad_norm"], reference.grad_norms, rtol=2e-5, atol=1e-6)
