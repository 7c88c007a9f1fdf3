#!/usr/bin/env python3
"""One command that verifies and measures megatron-moma on a bare CUDA machine, offline.

    python3 tools/gpu_check.py --download-wheels .whl     # beforehand, on a machine with PyPI
    bash tools/gpu_check.sh --wheels .whl --out results   # on the GPU machine (no internet)
    bash tools/gpu_check.sh --dry-run --out results       # the same logic on CPU, tiny shapes

Steps, in order (each a subprocess with a time limit; a failed step is recorded and the next
runs; `--only` picks some):
  install         pip install --no-index --no-deps of every wheel in --wheels into a private
                  folder put first on PYTHONPATH (megatron-core and what the image lacks)
  build           the csrc extension with nvcc (`setup.py build_ext --inplace`), then checks that
                  CUDA tensors run on the CUDA kernels
  pytest          `pytest -m gpu`: pass / fail / skip counts and the failures' names
  bench_layers    benchmarks/bench_layers.py in bf16 at the 435M and 1.4B shapes (4 layers,
                  2 x 4096 tokens): dense, MoMa 4t4i, moe_8x, MoT; TFLOP/s, MFU, ratios to dense
  bench_dispatch  benchmarks/bench_dispatch.py on the GPU: fraction of the measured copy bandwidth
  data            the digits sample corpus, preprocessed (the training runs' data)
  train           pretrain_moma for --train-iters iterations at a 151M-parameter dense shape
                  (16 layers, hidden 768, FFN 3072, 12 heads, sequences of 2048): dense, MoMa 4t4i
                  and MoT in bf16, MoMa 4t4i with torch-native FP8 experts; tokens/s, TFLOP/s,
                  MFU and peak memory of each
Everything lands in --out: results.json (every figure, each step's status, command and time),
results.md (the tables) and log.txt (every step's output). Intermediate files stay in a scratch
folder. The whole run keeps to --budget-seconds (default 480): a step gets what is left.

`--dry-run` runs every step's real logic on the CPU with tiny shapes and 2-3 iterations (the
install only checks the wheel folder, the build only checks that the extension imports; FP8 is
refused by the trainer on CPU, which is recorded as such); tests/test_gpu_check.py runs it.
"""

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from typing import Dict, List, Optional

REPOSITORY = os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir))

# What the GPU image lacks (its package list: the device notes of this project); cp312 wheels.
WHEELS = ["megatron-core==0.16.1"]
WHEEL_PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                   "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]
STEPS = ["install", "build", "pytest", "bench_layers", "bench_dispatch", "data", "train"]
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "A100": 312.0}
# Targets of the H200 check (issue 16); ratios are throughput against dense at equal FLOPs.
TARGETS = {"dense_mfu": 0.45, "moma_4t4i_vs_dense": 0.90, "mot_vs_dense": 0.97,
           "dispatch_of_copy_bandwidth": 0.70}

TRAIN_SHAPE = ["--num-layers", "16", "--hidden-size", "768", "--ffn-hidden-size", "3072",
               "--num-attention-heads", "12", "--seq-length", "2048", "--micro-batch-size", "4"]
TINY_TRAIN_SHAPE = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
                    "--num-attention-heads", "4", "--seq-length", "64", "--micro-batch-size", "2"]
TRAIN_COMMON = ["--swiglu", "--disable-bias-linear", "--normalization", "RMSNorm",
                "--position-embedding-type", "rope", "--untie-embeddings-and-output-weights",
                "--hidden-dropout", "0", "--attention-dropout", "0", "--lr", "3e-4",
                "--min-lr", "3e-5", "--lr-decay-style", "cosine", "--split", "98,2,0",
                "--eval-iters", "0", "--eval-interval", "100000", "--seed", "1234"]
MOMA_4T4I = ["--architecture", "moma", "--moma-experts-per-modality", "4", "4",
             "--moma-no-aux-router", "--moma-inference-routing", "expert_choice"]
TRAIN_RUNS = {
    "dense": [],
    "moma_4t4i": MOMA_4T4I,
    "mot": ["--architecture", "mot"],
    "moma_4t4i_fp8": MOMA_4T4I + ["--fp8-format", "hybrid", "--fp8-recipe", "rowwise"],
}
CONSOLE_LINE = re.compile(
    r"elapsed time per iteration \(ms\): ([\d.]+) \| throughput per GPU \(TFLOP/s/GPU\): "
    r"([\d.]+) \| tokens/s: (\d+)")


class Check:
    """The run's state: where things go, the time left, every step's record."""

    def __init__(self, args):
        self.args = args
        self.out = os.path.abspath(args.out)
        os.makedirs(self.out, exist_ok=True)
        self.scratch = tempfile.mkdtemp(prefix="gpu-check-")
        self.deadline = time.monotonic() + args.budget_seconds
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.env["PYTHONPATH"] = os.pathsep.join(
            [REPOSITORY] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        if args.dry_run:
            self.env["CUDA_VISIBLE_DEVICES"] = ""
        self.log = open(os.path.join(self.out, "log.txt"), "w", encoding="utf-8")
        self.results = {"dry_run": args.dry_run, "budget_seconds": args.budget_seconds,
                        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "steps": {}}

    @property
    def device(self) -> str:
        return "cpu" if self.args.dry_run else "cuda"

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, command: List[str], limit: float, cwd: str = REPOSITORY) -> dict:
        """Run `command`, its output into log.txt; {rc, seconds, output} (rc None: timed out)."""
        limit = max(1.0, min(limit, self.seconds_left()))
        self.log.write(f"\n===== {name}: {' '.join(command)} (limit {limit:.0f} s)\n")
        self.log.flush()
        start = time.monotonic()
        try:
            done = subprocess.run(command, cwd=cwd, env=self.env, capture_output=True, text=True,
                                  timeout=limit)
            rc, output = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as expired:
            rc = None
            output = "".join(part.decode(errors="replace") if isinstance(part, bytes) else part or ""
                             for part in (expired.stdout, expired.stderr))
            output += f"\n[gpu_check: stopped after {limit:.0f} s]\n"
        seconds = time.monotonic() - start
        self.log.write(output)
        self.log.write(f"===== {name}: rc {rc}, {seconds:.1f} s\n")
        self.log.flush()
        return {"command": command, "rc": rc, "seconds": round(seconds, 1), "output": output}

    def record(self, step: str, status: str, **details) -> None:
        self.results["steps"][step] = {"status": status, **details}
        print(f"gpu_check: {step}: {status}", flush=True)
        self.write()

    def write(self) -> None:
        """results.json and results.md, rewritten after every step (atomically)."""
        for name, text in (("results.json", json.dumps(self.results, indent=2, default=str)),
                           ("results.md", markdown(self.results))):
            path = os.path.join(self.out, name)
            with open(path + ".tmp", "w", encoding="utf-8") as handle:
                handle.write(text + "\n")
            os.replace(path + ".tmp", path)


def outcome(run: dict) -> str:
    if run["rc"] is None:
        return "timed out"
    return "ok" if run["rc"] == 0 else f"failed (rc {run['rc']})"


def brief(run: dict) -> dict:
    """A step record without the output (which is in log.txt), plus its last lines on failure."""
    kept = {key: value for key, value in run.items() if key != "output"}
    if run["rc"] != 0:
        kept["output_tail"] = run["output"].strip().splitlines()[-15:]
    return kept


# ----------------------------------------------------------------------------- the steps
def step_install(check: Check) -> None:
    wheels = sorted(glob.glob(os.path.join(check.args.wheels, "*.whl"))) if check.args.wheels else []
    if check.args.wheels and not wheels:
        check.record("install", f"failed: no .whl files in {check.args.wheels}")
        return
    if check.args.dry_run or not wheels:
        reason = "dry run" if check.args.dry_run else "no --wheels given"
        check.record("install", f"skipped ({reason})", wheels=[os.path.basename(w) for w in wheels])
        return
    site = os.path.join(check.scratch, "site")
    run = check.run("install", [sys.executable, "-m", "pip", "install", "-q", "--no-index",
                                "--no-deps", "--no-compile", "--no-cache-dir", "--target", site]
                    + wheels, 120)
    if run["rc"] == 0:
        check.env["PYTHONPATH"] = os.pathsep.join([site, check.env["PYTHONPATH"]])
    check.record("install", outcome(run), wheels=[os.path.basename(w) for w in wheels], site=site,
                 **brief(run))


def _probe(check: Check, code: str, limit: float = 120) -> dict:
    run = check.run("probe", [sys.executable, "-c", code], limit)
    for line in reversed(run["output"].splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"error": run["output"].strip().splitlines()[-5:]}


KERNELS_PROBE = """
import json, torch
from megatron_moma.ops import kernels
device = "cuda" if torch.cuda.is_available() else "cpu"
kernels_found = {"extension": kernels.extension is not None,
                 "backend": kernels.backend_for(torch.zeros(1, device=device))}
"""
MACHINE_PROBE = KERNELS_PROBE + """
import os, platform
import megatron.core
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
print(json.dumps({"python": platform.python_version(), "torch": torch.__version__,
                  "cuda": torch.version.cuda, "gpu": gpu, "megatron_core": megatron.core.__version__,
                  "cpus": os.cpu_count(), "kernels_before_build": kernels_found}))
"""
KERNELS_PROBE += "print(json.dumps(kernels_found))\n"


def step_build(check: Check) -> None:
    if check.args.dry_run:
        probe = check.results["machine"].get("kernels_before_build")
        status = "skipped (dry run: nvcc not run)"
        check.record("build", status if probe else "failed: megatron_moma.ops does not import",
                     kernels=probe)
        return
    build_env = {"MAX_JOBS": str(os.cpu_count() or 4)}
    check.env.update(build_env)
    run = check.run("build", [sys.executable, "setup.py", "build_ext", "--inplace"], 300)
    probe = _probe(check, KERNELS_PROBE)
    status = outcome(run)
    if status == "ok" and probe.get("backend") != "cuda":
        status = "failed: the built extension does not run CUDA tensors"
    check.record("build", status, kernels=probe, **brief(run))


def step_pytest(check: Check) -> None:
    report = os.path.join(check.scratch, "pytest.xml")
    targets = (["tests/test_gpu.py", "tests/test_sdpa_attention.py", "tests/test_ops_dispatch.py"]
               if check.args.dry_run else ["tests"])
    run = check.run("pytest", [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs",
                               "-p", "no:cacheprovider", f"--junitxml={report}"] + targets, 300)
    counts = junit_counts(report) if os.path.exists(report) else {}
    status = outcome(run)
    if run["rc"] == 5:
        status = "failed: no gpu test collected"
    check.record("pytest", status, counts=counts, **brief(run))


def junit_counts(path: str) -> dict:
    """passed / failed / errors / skipped and the failed tests' names, from a JUnit XML report."""
    root = ElementTree.parse(path).getroot()
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None:
            counts["failed"] += 1
            counts["failures"].append(name)
        elif case.find("error") is not None:
            counts["errors"] += 1
            counts["failures"].append(name)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


def step_bench_layers(check: Check) -> None:
    output = os.path.join(check.scratch, "bench_layers.json")
    variants = ["--variants", "dense", "moma_4t4i", "moe_8x", "mot", "--image-shares", "0.3"]
    if check.args.dry_run:
        shape = ["--device", "cpu", "--runs", "small:1", "--seq-length", "64",
                 "--micro-batch-size", "1", "--iters", "1", "--warmup", "0"]
    else:
        shape = ["--device", "cuda", "--dtype", "bf16", "--runs", "435m:4", "1.4b:4",
                 "--seq-length", "4096", "--micro-batch-size", "2", "--iters", "5", "--warmup", "2"]
    run = check.run("bench_layers", [sys.executable, "benchmarks/bench_layers.py"] + shape + variants
                    + ["--json", output], 240)
    figures = layer_figures(json.load(open(output))) if run["rc"] == 0 else {}
    check.record("bench_layers", outcome(run), figures=figures, **brief(run))


def layer_figures(report: dict) -> List[dict]:
    rows = []
    for result in report["runs"]:
        for name, row in result["variants"].items():
            rows.append({"shape": result["shape"], "layers": row["layers"], "variant": name,
                         "ms": round(row["median_ms"], 3),
                         "throughput_vs_dense": round(1 / row["time_vs_dense"], 4),
                         "flops_vs_dense": round(row["flops_vs_dense"], 4),
                         "tflops": round(row["achieved_tflops"], 2), "mfu": row.get("mfu"),
                         "peak_mb": round(row["peak_step_mb"], 1)})
    return rows


def step_bench_dispatch(check: Check) -> None:
    output = os.path.join(check.scratch, "bench_dispatch.json")
    shapes = (["--device", "cpu", "--shapes", "256x64", "--repeats", "1"] if check.args.dry_run
              else ["--device", "cuda", "--repeats", "20"])
    run = check.run("bench_dispatch", [sys.executable, "benchmarks/bench_dispatch.py"] + shapes
                    + ["--json", output], 120)
    figures = []
    if run["rc"] == 0:
        for r in json.load(open(output))["results"]:
            figures.append({"tokens": r["tokens"], "hidden": r["hidden"], "backend": r["backend"],
                            "ours_ms": round(1e3 * r["seconds"]["ours"], 3),
                            "mcore_ms": round(1e3 * r["seconds"]["mcore_unfused"], 3),
                            "vs_mcore": round(r["speedup_vs_mcore_unfused"], 2),
                            "of_copy_bandwidth": round(r["fraction_of_copy_bandwidth"], 3)})
    check.record("bench_dispatch", outcome(run), figures=figures, **brief(run))


DATA_SCRIPT = """
import sys
from megatron_moma.data import preprocess, sample_corpus
directory, images = sys.argv[1:]
code = sample_corpus.main(["--output-dir", directory, "--num-images", images,
                           "--code-format", "inline"])
sys.exit(code or preprocess.main(["--input", directory + "/digits.jsonl", "--output-prefix",
                                  directory + "/digits", "--codebook-size", "8",
                                  "--codes-per-image", "64", "--append-eod"]))
"""


def step_data(check: Check) -> None:
    """moma-sample-data then moma-preprocess, in one process."""
    directory = os.path.join(check.scratch, "data")
    images = "200" if check.args.dry_run else "1797"
    run = check.run("data", [sys.executable, "-c", DATA_SCRIPT, directory, images], 120)
    prefix = os.path.join(directory, "digits_text_document")
    check.results["data_path"] = prefix if run["rc"] == 0 else None
    check.record("data", outcome(run), prefix=prefix, **brief(run))


def step_train(check: Check) -> None:
    if not check.results.get("data_path"):
        check.record("train", "skipped: no data (the data step failed or was not run)")
        return
    iters = "3" if check.args.dry_run else str(check.args.train_iters)
    log_interval = "1" if check.args.dry_run else "10"
    shape = TINY_TRAIN_SHAPE if check.args.dry_run else TRAIN_SHAPE + ["--bf16"]
    peak = None if check.args.dry_run else bf16_peak(check.results.get("machine", {}).get("gpu"))
    runs = {}
    for name, flags in TRAIN_RUNS.items():
        memory = os.path.join(check.scratch, f"train_{name}.json")
        argv = (shape + TRAIN_COMMON + flags + ["--device", check.device, "--data-path",
                                                check.results["data_path"], "--train-iters", iters,
                                                "--log-interval", log_interval])
        run = check.run(f"train {name}", [sys.executable, os.path.abspath(__file__), "--train-one",
                                          memory, "--"] + argv, 150)
        figures = train_figures(run["output"], peak)
        if os.path.exists(memory):
            figures.update(json.load(open(memory)))
        status = outcome(run)
        if run["rc"] == 2 and check.args.dry_run and "--fp8-format" in flags:
            status = "refused on CPU (expected: FP8 needs a CUDA GPU)"
        runs[name] = {"status": status, "figures": figures, **brief(run)}
    failed = [name for name, r in runs.items() if r["status"] not in ("ok",)
              and not r["status"].startswith("refused on CPU")]
    check.record("train", "ok" if not failed else f"failed: {', '.join(failed)}", runs=runs,
                 shape=" ".join(shape), iterations=int(iters))


def train_figures(output: str, peak: Optional[float]) -> dict:
    """From pretrain_moma's console: the last log interval's ms per iteration, TFLOP/s, tokens/s
    (and MFU against `peak`), and the mean over the intervals after the first."""
    lines = [tuple(float(v) for v in m.groups()) for m in CONSOLE_LINE.finditer(output)]
    if not lines:
        return {}
    steady = lines[1:] or lines
    ms, tflops, tokens = lines[-1]
    figures = {"ms_per_iteration": ms, "tflops": tflops, "tokens_per_s": tokens,
               "tokens_per_s_mean_after_first_interval": sum(t for _, _, t in steady) / len(steady),
               "intervals": len(lines)}
    if peak:
        figures["mfu"] = tflops / peak
    return figures


def bf16_peak(gpu: Optional[str]) -> Optional[float]:
    for key, value in BF16_PEAK_TFLOPS.items():
        if gpu and key in gpu:
            return value
    return None


def train_one(memory_path: str, argv: List[str]) -> int:
    """Run pretrain_moma in this process and write its peak memory (CUDA: max allocated; CPU:
    the process's peak RSS) to `memory_path`."""
    import resource

    import torch

    from megatron_moma.training import pretrain_moma

    code = pretrain_moma.main(argv)
    figures = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        figures["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
    with open(memory_path, "w", encoding="utf-8") as handle:
        json.dump(figures, handle)
    return code


STEP_FUNCTIONS = {"install": step_install, "build": step_build, "pytest": step_pytest,
                  "bench_layers": step_bench_layers, "bench_dispatch": step_bench_dispatch,
                  "data": step_data, "train": step_train}


# ----------------------------------------------------------------------------- the report
def markdown(results: dict) -> str:
    machine = results.get("machine", {})
    lines = ["# gpu_check results", "",
             f"Started {results['started']}{' (dry run on CPU)' if results['dry_run'] else ''}; "
             f"machine: {json.dumps(machine)}", "", "| step | status | seconds |", "|---|---|---|"]
    for name, step in results["steps"].items():
        lines.append(f"| {name} | {step['status']} | {step.get('seconds', '')} |")
    steps = results["steps"]
    counts = steps.get("pytest", {}).get("counts")
    if counts:
        lines += ["", f"pytest -m gpu: {counts['passed']} passed, {counts['failed']} failed, "
                      f"{counts['errors']} errors, {counts['skipped']} skipped"]
        lines += [f"- failed: {name}" for name in counts["failures"]]
    layers = steps.get("bench_layers", {}).get("figures")
    if layers:
        lines += ["", "## bench_layers", "",
                  "| shape | layers | variant | ms | throughput / dense | FLOPs / dense | TFLOP/s "
                  "| MFU | peak MB |", "|---|---|---|---|---|---|---|---|---|"]
        for r in layers:
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
            lines.append(f"| {r['shape']} | {r['layers']} | {r['variant']} | {r['ms']} | "
                         f"{r['throughput_vs_dense']:.3f} | {r['flops_vs_dense']:.3f} | "
                         f"{r['tflops']} | {mfu} | {r['peak_mb']} |")
    dispatch = steps.get("bench_dispatch", {}).get("figures")
    if dispatch:
        lines += ["", "## bench_dispatch", "", "| tokens | hidden | backend | ours ms | mcore ms "
                  "| vs mcore | of copy bandwidth |", "|---|---|---|---|---|---|---|"]
        for r in dispatch:
            lines.append(f"| {r['tokens']} | {r['hidden']} | {r['backend']} | {r['ours_ms']} | "
                         f"{r['mcore_ms']} | {r['vs_mcore']}x | {r['of_copy_bandwidth']:.0%} |")
    train = steps.get("train", {}).get("runs")
    if train:
        lines += ["", f"## pretrain_moma ({steps['train'].get('shape')}, "
                      f"{steps['train'].get('iterations')} iterations)", "",
                  "| run | status | ms / iteration | tokens/s | TFLOP/s | MFU | peak memory |",
                  "|---|---|---|---|---|---|---|"]
        for name, run in train.items():
            f = run["figures"]
            memory = (f"{f['peak_allocated_gb']:.1f} GB allocated" if "peak_allocated_gb" in f
                      else f"{f['peak_rss_mb']:.0f} MB RSS" if "peak_rss_mb" in f else "-")
            mfu = f"{f['mfu']:.1%}" if "mfu" in f else "-"
            lines.append(f"| {name} | {run['status']} | {f.get('ms_per_iteration', '-')} | "
                         f"{f.get('tokens_per_s', '-')} | {f.get('tflops', '-')} | {mfu} | "
                         f"{memory} |")
    targets = results.get("targets")
    if targets:
        note = (" (dry run: tiny CPU shapes, one round; the figures say nothing about speed)"
                if results["dry_run"] else "")
        lines += ["", f"## targets{note}", "", "| target | wanted | measured | met |",
                  "|---|---|---|---|"]
        for name, t in targets.items():
            lines.append(f"| {name} | >= {t['wanted']} | {t['measured']} | {t['met']} |")
    return "\n".join(lines)


def target_checks(results: dict) -> Dict[str, dict]:
    """The H200 targets against the bench figures (dense MFU and ratios at the 1.4B shape)."""
    layers = {(r["shape"], r["variant"]): r
              for r in results["steps"].get("bench_layers", {}).get("figures", [])}
    measured = {}
    shape = "1.4b" if ("1.4b", "dense") in layers else "small"
    if (shape, "dense") in layers:
        measured["dense_mfu"] = layers[(shape, "dense")]["mfu"]
        for variant, key in (("moma_4t4i", "moma_4t4i_vs_dense"), ("mot", "mot_vs_dense")):
            if (shape, variant) in layers:
                measured[key] = layers[(shape, variant)]["throughput_vs_dense"]
    dispatch = results["steps"].get("bench_dispatch", {}).get("figures")
    if dispatch:
        measured["dispatch_of_copy_bandwidth"] = min(r["of_copy_bandwidth"] for r in dispatch)
    return {name: {"wanted": TARGETS[name], "measured": value,
                   "met": None if value is None else value >= TARGETS[name]}
            for name, value in measured.items()}


def download_wheels(directory: str) -> int:
    """The wheel folder for the GPU machine (cp312, manylinux x86-64), from PyPI."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp", "-d", directory]
    for platform in WHEEL_PLATFORMS:
        command += ["--platform", platform]
    return subprocess.call(command + WHEELS)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check_results", help="folder for the results")
    parser.add_argument("--wheels", default=None, help="folder of wheels to install (offline)")
    parser.add_argument("--dry-run", action="store_true",
                        help="every step on CPU with tiny shapes (what CI runs)")
    parser.add_argument("--only", nargs="+", choices=STEPS, default=None,
                        help="run these steps only (data runs before train when train is given)")
    parser.add_argument("--budget-seconds", type=float, default=480)
    parser.add_argument("--train-iters", type=int, default=60)
    parser.add_argument("--download-wheels", metavar="DIR", default=None,
                        help="download the wheel folder (needs PyPI) and exit")
    parser.add_argument("--train-one", metavar="JSON", default=None, help=argparse.SUPPRESS)
    parser.add_argument("train_argv", nargs="*", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.download_wheels:
        return download_wheels(args.download_wheels)
    if args.train_one:
        return train_one(args.train_one, args.train_argv)
    check = Check(args)
    steps = args.only or STEPS
    if "train" in steps and "data" not in steps:
        steps = [s for s in STEPS if s in steps or s == "data"]
    try:
        for name in steps:
            if check.seconds_left() <= 1:
                check.record(name, "skipped: the time budget was spent")
                continue
            if name != "install" and "machine" not in check.results:
                check.results["machine"] = _probe(check, MACHINE_PROBE)  # after the install
            STEP_FUNCTIONS[name](check)
        check.results["targets"] = target_checks(check.results)
        check.results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        check.write()
    finally:
        check.log.close()
        shutil.rmtree(check.scratch, ignore_errors=True)
    failed = [n for n, s in check.results["steps"].items()
              if s["status"].startswith(("failed", "timed out"))]
    print(f"gpu_check: results in {check.out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
