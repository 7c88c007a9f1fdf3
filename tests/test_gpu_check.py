"""tools/gpu_check.py --dry-run: every step of the GPU check runs its real logic on the CPU with
tiny shapes, and the results folder holds the figures each step reports."""

import json
import os
import subprocess
import sys

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")


def test_dry_run_runs_every_step_and_writes_the_results(tmp_path):
    out = tmp_path / "results"
    done = subprocess.run(["bash", os.path.join(TOOLS, "gpu_check.sh"), "--dry-run", "--out",
                           str(out)], capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(os.listdir(out)) == ["log.txt", "results.json", "results.md"]
    results = json.loads((out / "results.json").read_text())
    steps = results["steps"]
    assert list(steps) == ["install", "build", "pytest", "bench_layers", "bench_dispatch", "data",
                           "train"]
    assert steps["install"]["status"] == "skipped (dry run)"
    assert results["machine"]["kernels_before_build"]["backend"] == "cpp"
    # CUDA is hidden: every gpu test is collected and skipped, none fails.
    counts = steps["pytest"]["counts"]
    assert counts["skipped"] > 10 and counts["failed"] == counts["errors"] == 0
    variants = {row["variant"] for row in steps["bench_layers"]["figures"]}
    assert variants == {"dense", "moma_4t4i", "moe_8x", "mot"}
    assert all(row["tflops"] >= 0 and row["ms"] > 0 for row in steps["bench_layers"]["figures"])
    assert steps["bench_dispatch"]["figures"][0]["backend"] == "cpp"
    runs = steps["train"]["runs"]
    for name in ("dense", "moma_4t4i", "mot"):
        assert runs[name]["status"] == "ok", runs[name]
        assert runs[name]["figures"]["tokens_per_s"] > 0 and runs[name]["figures"]["intervals"] == 3
    assert runs["moma_4t4i_fp8"]["status"].startswith("refused on CPU")
    table = (out / "results.md").read_text()
    assert "| moma_4t4i | ok |" in table and "## bench_dispatch" in table


def test_download_wheels_names_the_cp312_manylinux_wheels(monkeypatch):
    sys.path.insert(0, TOOLS)
    try:
        import gpu_check
    finally:
        sys.path.remove(TOOLS)
    calls = []
    monkeypatch.setattr(gpu_check.subprocess, "call", lambda command: calls.append(command) or 0)
    assert gpu_check.main(["--download-wheels", "wheels"]) == 0
    command = calls[0]
    assert command[1:4] == ["-m", "pip", "download"] and "--no-deps" in command
    assert command[command.index("--python-version") + 1] == "3.12"
    assert "manylinux_2_28_x86_64" in command and command[-1] == "megatron-core==0.16.1"
