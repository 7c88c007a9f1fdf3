"""Reproduce the papers' FLOPs-saving measurement on a bundled corpus, on CPU (or a GPU).

`--corpus digits` (the default, fast) is the scikit-learn digits corpus; `--corpus real` is
`moma-sample-data --corpus real` (emoji images with captions and plain-text documents from
package-registry downloads, 1.34M tokens), trained on for about 1.15 passes, with a token-choice
MoMa 4t4i beside the expert-choice one. Trains dense, moe_8x, MoMa 1t1i, MoMa 4t4i, MoT and
MoT+MoMa 4t4i (and MoD+MoMa 4t4i with `--with-mod`) with the real trainer (`pretrain_moma`, one forked gloo rank per run, as the tests
run it) at matched FLOPs per token, with fixed seeds (two by default: the seed changes the
initialisation and the data order, the same for every architecture). From each run's TensorBoard
scalars it takes the training loss per step, overall and per modality, against the FLOPs the
trainer counted (megatron_moma.training.flops), and computes the papers' FLOPs-saving factor:
the FLOPs dense needs to reach its own final training loss divided by the FLOPs each model needs
to reach it (megatron_moma.training.flops_savings documents the smoothing and interpolation;
"not reached" when a model never gets there). Writes to `--output-dir`:

  results.json                   settings, machine, per-run losses, FLOPs and times, the factors
  results.md                     the factors (each seed and the mean) beside the papers' numbers
  loss_vs_flops_{lm,text,image}.png   smoothed training-loss curves against FLOPs
  coverage                       in results.json/.md: the share of each MoMa group's tokens taken
                                 by 0, 1 and 2+ experts over the last fifth of training
  runs/{architecture}_seed{N}/   each run's TensorBoard events (a finished run with the same
                                 flags is reused when the script is run again)
  data/                          the digits corpus, preprocessed

Matched FLOPs: every expert has the dense FFN's size and expert choice runs at capacity factor 1
(one expert pass per token on average, plus a router); MoT keeps the dense shapes per modality;
MoD gets the number of layers whose FLOPs per token are closest to dense's. MoMa and MoD train
without auxiliary routers, as in the papers' first stage.

    PYTHONPATH=. python benchmarks/reproduce_flops_savings.py --output-dir flops_savings
    PYTHONPATH=. python benchmarks/reproduce_flops_savings.py --corpus real --output-dir real
    PYTHONPATH=. python benchmarks/reproduce_flops_savings.py --corpus real --scale 4 --device cuda
    PYTHONPATH=. python benchmarks/reproduce_flops_savings.py --quick --output-dir /tmp/quick
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Dict, List

import torch

from megatron_moma.data import preprocess, sample_corpus
from megatron_moma.data.vocabulary import sidecar_path
from megatron_moma.testing.multiprocess import run_on_ranks
from megatron_moma.training import configs
from megatron_moma.training.arguments import parse_args
from megatron_moma.training.flops import forward_flops_per_token
from megatron_moma.training.flops_savings import LOSS_TAGS, read_loss_curves, saving_factor, smooth

import machine
from atomic_files import save_png, write_text
from flops_matching import closest_num_layers

STAGE_ONE = ["--moma-no-aux-router", "--moma-inference-routing", "expert_choice"]
ARCHITECTURES = {
    "dense": ["--architecture", "dense"],
    "moe_8x": ["--architecture", "moma", "--moma-experts-per-modality", "8", *STAGE_ONE],
    "moma_1t1i": ["--architecture", "moma", "--moma-experts-per-modality", "1", "1"],
    "moma_4t4i": ["--architecture", "moma", "--moma-experts-per-modality", "4", "4", *STAGE_ONE],
    "mot": ["--architecture", "mot"],
    "mot+moma_4t4i": ["--architecture", "mot+moma", "--moma-experts-per-modality", "4", "4",
                      *STAGE_ONE],
}
# MoMa 4t4i with token choice in each modality group (top-1, Megatron's TopKRouter, no capacity:
# every token gets exactly one expert): the default comparison on the real corpus.
TOKEN_CHOICE = {
    "moma_4t4i_token_choice": ["--architecture", "moma", "--moma-experts-per-modality", "4", "4",
                               "--moma-routing", "token_choice", *STAGE_ONE],
}
# Why MoMa 4t4i trails dense, where it does: the same model with one thing changed.
DIAGNOSTICS = {
    "moma_4t4i_capacity2": ARCHITECTURES["moma_4t4i"] + ["--moma-capacity-factor", "2"],
    "moma_4t4i_half_lr": ARCHITECTURES["moma_4t4i"] + ["--lr", "1.5e-3", "--min-lr", "1.5e-4"],
    "dense_half_lr": ARCHITECTURES["dense"] + ["--lr", "1.5e-3", "--min-lr", "1.5e-4"],
}
MOD_ARCHITECTURES = {
    "mod+moma_4t4i": ["--architecture", "moma", "--moma-experts-per-modality", "4", "4",
                      *STAGE_ONE, "--mod", "--mod-no-aux-router", "--mod-inference-routing", "top_k"],
}
ALL_ARCHITECTURES = {**ARCHITECTURES, **TOKEN_CHOICE, **MOD_ARCHITECTURES, **DIAGNOSTICS}

# docs/layers.md §9 (MoMa: 1.4B models, 1T tokens, training loss; MoT: 7B, Chameleon setting).
PAPER = {
    "moe_8x": {"lm loss": "3.0x (MoMa 1.4B)"},
    "moma_4t4i": {"lm loss": "3.7x", "text loss": "2.6x", "image loss": "5.2x"},
    "mod+moma_4t4i": {"lm loss": "4.2x (MoMa + MoD)"},
    "mot": {"lm loss": "1.79x (MoT 7B: dense validation loss at 55.8% of the FLOPs)"},
}
TAG_NAMES = {"lm loss": "overall", "text loss": "text", "image loss": "image"}
PLOT_NAMES = {"lm loss": "loss_vs_flops_lm.png", "text loss": "loss_vs_flops_text.png",
              "image loss": "loss_vs_flops_image.png"}


@dataclass(frozen=True)
class Setting:
    """The size of the experiment: the corpus, the model (Megatron-LM flags) and the schedule."""

    num_images: int = 1797
    num_layers: int = 4
    hidden_size: int = 64
    ffn_hidden_size: int = 256
    num_attention_heads: int = 4
    seq_length: int = 256
    global_batch_size: int = 8
    train_iters: int = 300
    lr: float = 3e-3
    min_lr: float = 3e-4
    log_interval: int = 50
    smoothing_window: int = 25
    seeds: tuple = (1, 2)


# About 40 minutes for the 14 default runs on an idle 2-core machine (docs/results.md section 3).
REAL = Setting(num_images=0, global_batch_size=16, train_iters=375, log_interval=25)
QUICK = Setting(num_images=300, num_layers=2, hidden_size=32, ffn_hidden_size=64, seq_length=64,
                global_batch_size=4, train_iters=12, log_interval=4, smoothing_window=3, seeds=(1,))


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="flops_savings")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 1 2 (quick: 1)")
    parser.add_argument("--train-iters", type=int, default=None, help="default 300 (quick: 12)")
    parser.add_argument("--corpus", choices=("digits", "real"), default="digits")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiplies the hidden and FFN sizes (the tokens stay those of the "
                             "corpus); e.g. 4 with --device cuda")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--cache-dir", default=None,
                        help="--corpus real: where the fetched packages are kept")
    parser.add_argument("--architectures", nargs="+", default=None,
                        choices=list(ALL_ARCHITECTURES),
                        help="default: all but MoD and the diagnostics (dense is always trained: "
                             "the reference); token choice only with --corpus real")
    parser.add_argument("--with-mod", action="store_true", help="add MoD + MoMa 4t4i")
    parser.add_argument("--smoothing-window", type=int, default=None,
                        help="logged steps per trailing mean (default 25; quick: 3)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny setting that runs in seconds (for tests), one seed")
    parser.add_argument("--data-path", default=None,
                        help="a preprocessed corpus prefix (default: make the digits corpus)")
    args = parser.parse_args(argv)
    setting = QUICK if args.quick else REAL if args.corpus == "real" else Setting()
    if args.scale != 1.0:
        setting = replace(setting, hidden_size=_scaled(setting.hidden_size, args.scale, setting),
                          ffn_hidden_size=_scaled(setting.ffn_hidden_size, args.scale, setting))
    overrides = {"seeds": tuple(args.seeds) if args.seeds else None,
                 "train_iters": args.train_iters, "smoothing_window": args.smoothing_window}
    args.setting = replace(setting, **{k: v for k, v in overrides.items() if v is not None})
    if args.setting.train_iters < args.setting.smoothing_window:
        parser.error(f"--train-iters {args.setting.train_iters} is shorter than the smoothing "
                     f"window {args.setting.smoothing_window}")
    default = list(ARCHITECTURES) + (list(TOKEN_CHOICE) if args.corpus == "real" else [])
    names = args.architectures or default + (list(MOD_ARCHITECTURES) if args.with_mod else [])
    args.names = ["dense"] + [name for name in names if name != "dense"]
    return args


def _scaled(size: int, scale: float, setting: Setting) -> int:
    """size x scale, rounded to a multiple of the attention heads (at least one per head)."""
    heads = setting.num_attention_heads
    return max(heads, int(round(size * scale / heads)) * heads)


# ----------------------------------------------------------------------------- data and flags
def prepare_corpus(directory: str, num_images: int) -> str:
    """The digits corpus, preprocessed (kept and reused): the dataset prefix."""
    prefix = os.path.join(directory, "digits")
    if not os.path.exists(prefix + "_text_document.idx"):
        print(f"making the digits corpus ({num_images} images) in {directory}", flush=True)
        if sample_corpus.main(["--output-dir", directory, "--num-images", str(num_images),
                               "--code-format", "inline"]) != 0:
            raise RuntimeError("moma-sample-data failed")
        if preprocess.main(["--input", os.path.join(directory, "digits.jsonl"), "--output-prefix",
                            prefix, "--codebook-size", "8", "--codes-per-image", "64",
                            "--append-eod", "--workers", "1"]) != 0:
            raise RuntimeError("moma-preprocess failed")
    return prefix + "_text_document"


def prepare_real_corpus(directory: str, cache_dir) -> str:
    """`moma-sample-data --corpus real`, preprocessed (kept and reused): the dataset prefix."""
    corpus = os.path.join(directory, "real")
    prefix = os.path.join(directory, "real")
    if not os.path.exists(prefix + "_text_document.idx"):
        print(f"making the real corpus in {corpus}", flush=True)
        cache = ["--cache-dir", cache_dir] if cache_dir else []
        if not os.path.exists(os.path.join(corpus, "real.jsonl")) and sample_corpus.main(
                ["--corpus", "real", "--output-dir", corpus, *cache]) != 0:
            raise RuntimeError("moma-sample-data --corpus real failed")
        if preprocess.main(["--input", os.path.join(corpus, "real.jsonl"), "--output-prefix",
                            prefix, "--codebook-size", "512", "--codes-per-image", "64",
                            "--append-eod", "--workers", "1"]) != 0:
            raise RuntimeError("moma-preprocess failed")
    return prefix + "_text_document"


def corpus_tokens(data_path: str) -> Dict[str, int]:
    """Tokens of each modality in the corpus, as moma-preprocess recorded them (empty if not)."""
    with open(sidecar_path(data_path), encoding="utf-8") as sidecar:
        return json.load(sidecar).get("source", {}).get("tokens", {})


def common_flags(setting: Setting, data_path: str, seed: int, device: str = "cpu") -> List[str]:
    """Megatron-LM flags shared by every run: the model, the schedule, the data, logging."""
    return [
        "--device", device, "--num-layers", str(setting.num_layers),
        "--hidden-size", str(setting.hidden_size), "--ffn-hidden-size", str(setting.ffn_hidden_size),
        "--num-attention-heads", str(setting.num_attention_heads),
        "--seq-length", str(setting.seq_length), "--max-position-embeddings", str(setting.seq_length),
        "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
        "--disable-bias-linear", "--untie-embeddings-and-output-weights",
        "--hidden-dropout", "0", "--attention-dropout", "0",
        "--micro-batch-size", str(setting.global_batch_size),
        "--global-batch-size", str(setting.global_batch_size),
        "--train-iters", str(setting.train_iters), "--lr", str(setting.lr),
        "--min-lr", str(setting.min_lr), "--lr-decay-style", "cosine", "--lr-warmup-fraction", "0.05",
        "--weight-decay", "0.1", "--clip-grad", "1.0", "--adam-beta2", "0.95",
        "--data-path", data_path, "--split", "100,0,0", "--eval-iters", "0",
        "--log-interval", str(setting.log_interval), "--seed", str(seed),
    ]


def forward_flops(argv: List[str]) -> float:
    """Forward FLOPs per token of the model `argv` describes, averaged over its modalities."""
    args = parse_args(argv)
    vocab = configs.vocabulary(args)
    config = configs.transformer_config(args, vocab.modality_layout)
    per_modality = forward_flops_per_token(
        config, configs.padded_vocab_size(vocab.vocab_size, args), args.seq_length)
    return statistics.mean(per_modality.values())


def with_num_layers(argv: List[str], num_layers: int) -> List[str]:
    position = argv.index("--num-layers") + 1
    return argv[:position] + [str(num_layers)] + argv[position + 1:]


def run_flags(name: str, setting: Setting, data_path: str, seed: int,
              device: str = "cpu") -> List[str]:
    """The run's flags (an architecture's own flags come last and win over the common ones);
    a MoD model gets the layer count that matches dense's FLOPs per token."""
    base = common_flags(setting, data_path, seed, device)
    flags = base + ALL_ARCHITECTURES[name]
    if "--mod" not in flags:
        return flags
    target = forward_flops(base + ARCHITECTURES["dense"])
    layers = closest_num_layers(lambda n: forward_flops(with_num_layers(flags, n)), target,
                                setting.num_layers)
    return with_num_layers(flags, layers)


# ----------------------------------------------------------------------------- training
def _pretrain(argv: List[str]) -> int:
    from megatron_moma.training.pretrain_moma import pretrain

    return pretrain(argv)


def train(run_dir: str, flags: List[str], label: str) -> dict:
    """Train one run into `run_dir` (reused when it finished with the same flags); a run is
    written to `run_dir.tmp` and renamed when it finishes, so a failed run leaves nothing."""
    record_path = os.path.join(run_dir, "run.json")
    if os.path.exists(record_path):
        with open(record_path, encoding="utf-8") as record_file:
            record = json.load(record_file)
        if record["flags"] == flags:
            print(f"{label}: reusing the finished run in {run_dir}", flush=True)
            return record
    partial = run_dir + ".tmp"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    argv = flags + ["--tensorboard-dir", os.path.join(partial, "tensorboard")]
    print(f"{label}: training ({' '.join(flags[flags.index('--architecture'):])})", flush=True)
    start = time.perf_counter()
    code = run_on_ranks(_pretrain, 1, argv, timeout=4 * 3600,
                        threads_per_rank=torch.get_num_threads())[0]
    if code != 0:
        raise RuntimeError(f"{label}: pretrain_moma exited with code {code}")
    record = {"flags": flags, "seconds": time.perf_counter() - start,
              "load_average_after": machine.load_average()}
    with open(os.path.join(partial, "run.json"), "w", encoding="utf-8") as record_file:
        json.dump(record, record_file, indent=2)
    replaced = run_dir + ".old"
    if os.path.exists(run_dir):
        os.replace(run_dir, replaced)
    os.replace(partial, run_dir)
    shutil.rmtree(replaced, ignore_errors=True)
    print(f"{label}: done in {record['seconds']:.0f} s", flush=True)
    return record


# ----------------------------------------------------------------------------- analysis
COVERAGE_KINDS = ("0", "1", "2plus")


def expert_coverage(tensorboard_dir: str) -> Dict[str, Dict[str, float]]:
    """{group: {"0", "1", "2plus": share of the group's tokens taken by that many experts}},
    averaged over the layers and the logged intervals of the last fifth of training (empty for a
    model without MoMa layers)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(tensorboard_dir, size_guidance={"scalars": 0})
    events.Reload()
    shares: Dict[str, Dict[str, List[float]]] = {}
    for tag in events.Tags()["scalars"]:
        parts = tag.split("/")  # moma/layer001/{group}/tokens_taken_by_{kind} (also "... vs samples")
        if parts[0] != "moma" or parts[-1] not in {f"tokens_taken_by_{k}" for k in COVERAGE_KINDS}:
            continue
        scalars = sorted(events.Scalars(tag), key=lambda event: event.step)
        last = scalars[-1].step
        late = [e.value for e in scalars if e.step > last - (last / 5)] or [scalars[-1].value]
        kind = parts[-1][len("tokens_taken_by_"):]
        shares.setdefault(parts[2], {}).setdefault(kind, []).append(statistics.mean(late))
    return {group: {kind: statistics.mean(values) for kind, values in kinds.items()}
            for group, kinds in sorted(shares.items())}


def analyse(curves: Dict[str, Dict[int, dict]], names: List[str], seeds, window: int) -> dict:
    """Saving factors of every model against dense, per seed and loss, and their means."""
    factors = {}
    for name in names[1:]:
        factors[name] = {}
        for tag in LOSS_TAGS:
            per_seed = {seed: asdict(saving_factor(curves["dense"][seed][tag], curves[name][seed][tag],
                                                   window)) for seed in seeds}
            values = [result["factor"] for result in per_seed.values()]
            mean = statistics.mean(values) if None not in values else None
            factors[name][tag] = {"per_seed": per_seed, "mean": mean}
    return factors


def _factor_text(result: dict) -> str:
    if result["factor"] is None:
        return "not reached"
    return ("≥" if result["reached_at_first_point"] else "") + f"{result['factor']:.2f}x"


def markdown(results: dict) -> str:
    setting, seeds = results["setting"], results["setting"]["seeds"]
    seed_names = ", ".join(f"seed {seed}" for seed in seeds)
    tokens = setting["train_iters"] * setting["global_batch_size"] * setting["seq_length"]
    corpus = sum(results["corpus_tokens"].values())
    epochs = f" ({tokens / corpus:.1f} passes over the {corpus:,}-token corpus)" if corpus else ""
    lines = [
        "# FLOPs-saving factor against dense (training loss)",
        "",
        f"{setting['num_layers']} layers, hidden {setting['hidden_size']}, FFN "
        f"{setting['ffn_hidden_size']}, {setting['num_attention_heads']} heads, sequences of "
        f"{setting['seq_length']}; {setting['train_iters']} steps of {setting['global_batch_size']} "
        f"sequences = {tokens:,} tokens per run{epochs}.",
        "",
        f"Each cell: {seed_names} (mean). The FLOPs dense needs to reach its own final training "
        f"loss / the FLOPs the model needs to reach it (smoothed over {setting['smoothing_window']} "
        f"steps, interpolated); \"not reached\": the model never gets down to it; ≥: already "
        f"there at the first smoothed point.",
        "",
        "| architecture | overall | text | image | papers (docs/layers.md §9) |",
        "|---|---|---|---|---|",
    ]
    for name, per_tag in results["saving_factors"].items():
        cells = []
        for tag in LOSS_TAGS:
            entry = per_tag[tag]
            per_seed = " / ".join(_factor_text(entry["per_seed"][seed]) for seed in seeds)
            mean = f" ({entry['mean']:.2f}x)" if entry["mean"] is not None and len(seeds) > 1 else ""
            cells.append(per_seed + mean)
        paper = "; ".join(f"{TAG_NAMES[tag]} {value}" for tag, value in PAPER.get(name, {}).items())
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {paper or '-'} |")
    lines += ["", "# Expert-choice coverage: share of a group's tokens taken by 0 / 1 / 2+ experts",
              "", "Mean over the layers and the last fifth of training; each seed.", "",
              "| architecture | group | " + " | ".join(f"seed {seed}" for seed in seeds) + " |",
              "|---|---|" + "---|" * len(seeds)]
    for name, per_seed in results["runs"].items():
        groups = sorted({group for run in per_seed.values() for group in run.get("coverage", {})})
        for group in groups:
            cells = []
            for seed in seeds:
                shares = per_seed.get(seed, {}).get("coverage", {}).get(group, {})
                cells.append(" / ".join(f"{100 * shares.get(kind, 0):.0f}%" for kind in COVERAGE_KINDS))
            lines.append(f"| {name} | {group} | " + " | ".join(cells) + " |")
    lines += ["", "# Final training loss (smoothed), training FLOPs and wall time", "",
              "| architecture | seed | overall | text | image | FLOPs | seconds |",
              "|---|---|---|---|---|---|---|"]
    for name, per_seed in results["runs"].items():
        for seed, run in per_seed.items():
            final = run["final_loss"]
            lines.append(f"| {name} | {seed} | " + " | ".join(f"{final[tag]:.4f}" for tag in LOSS_TAGS)
                         + f" | {run['total_flops']:.3e} | {run['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, curves, window: int, directory: str) -> List[str]:
    """One PNG per loss: smoothed curves of every architecture and seed against FLOPs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    styles = ["-", "--", ":", "-."]
    for tag in LOSS_TAGS:
        figure, axes = plt.subplots(figsize=(8, 5))
        smoothed = []
        for color, (name, per_seed) in enumerate(curves.items()):
            for index, (seed, seed_curves) in enumerate(per_seed.items()):
                curve = smooth(seed_curves[tag], window)
                smoothed.append(curve)
                axes.plot(curve.flops, curve.loss, styles[index % len(styles)], color=f"C{color}",
                          label=f"{name} seed {seed}", linewidth=1.2)
        # Zoom on where the factor is decided: from a fifth of the run to the lowest loss.
        lowest = min(min(curve.loss) for curve in smoothed)
        top = max(curve.loss[len(curve.loss) // 5] for curve in smoothed)
        axes.set_ylim(lowest - 0.05 * (top - lowest), top)
        targets = [results["runs"]["dense"][seed]["final_loss"][tag] for seed in results["runs"]["dense"]]
        axes.axhline(statistics.mean(targets), color="black", linewidth=0.6,
                     label="dense final loss (mean of seeds)")
        axes.set_xlabel("training FLOPs")
        axes.set_ylabel(f"{TAG_NAMES[tag]} training loss (smoothed)")
        axes.set_title(f"{TAG_NAMES[tag]} training loss vs FLOPs, {results['corpus']} corpus "
                       f"(from 1/5 of the run)")
        axes.legend(fontsize=7, ncol=2)
        axes.grid(alpha=0.3)
        path = os.path.join(directory, PLOT_NAMES[tag])
        save_png(figure, path)
        plt.close(figure)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    args = parse_arguments(argv)
    setting = args.setting
    output = os.path.abspath(args.output_dir)
    os.makedirs(os.path.join(output, "runs"), exist_ok=True)
    if args.data_path:
        data_path = args.data_path
    elif args.corpus == "real":
        data_path = prepare_real_corpus(os.path.join(output, "data"), args.cache_dir)
    else:
        data_path = prepare_corpus(os.path.join(output, "data"), setting.num_images)
    total = len(args.names) * len(setting.seeds)
    print(f"{total} runs: {', '.join(args.names)} x seeds {list(setting.seeds)}, "
          f"{setting.train_iters} iterations each, {torch.get_num_threads()} threads", flush=True)
    runs, curves, done = {}, {}, 0
    started = time.perf_counter()
    for seed in setting.seeds:
        for name in args.names:
            done += 1
            label = f"[{done}/{total}] {name} seed {seed}"
            run_dir = os.path.join(output, "runs", f"{name}_seed{seed}")
            record = train(run_dir, run_flags(name, setting, data_path, seed, args.device), label)
            seed_curves = read_loss_curves(os.path.join(run_dir, "tensorboard"))
            curves.setdefault(name, {})[seed] = seed_curves
            runs.setdefault(name, {})[seed] = {
                "flags": record["flags"], "seconds": record["seconds"],
                "load_average_after": record["load_average_after"],
                "total_flops": seed_curves["lm loss"].flops[-1],
                "final_loss": {tag: smooth(seed_curves[tag], setting.smoothing_window).loss[-1]
                               for tag in LOSS_TAGS},
                "coverage": expert_coverage(os.path.join(run_dir, "tensorboard")),
            }
    results = {
        "machine": machine.describe("cpu"),
        "command": " ".join(sys.argv),
        "corpus": args.corpus,
        "setting": asdict(setting),
        "corpus_tokens": corpus_tokens(data_path),
        "training_seconds": sum(run["seconds"] for per_seed in runs.values()
                                for run in per_seed.values()),
        "script_seconds": time.perf_counter() - started,
        "runs": runs,
        "saving_factors": analyse(curves, args.names, setting.seeds, setting.smoothing_window),
        "paper": PAPER,
    }
    write_text(os.path.join(output, "results.json"), json.dumps(results, indent=2))
    table = markdown(results)
    write_text(os.path.join(output, "results.md"), table)
    plot(results, curves, setting.smoothing_window, output)
    print("\n" + table + f"\nwrote {output}/results.json, results.md and loss_vs_flops_*.png",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
