"""Invalid flags of `pretrain-moma`, `moma-upcycle` and `moma-convert`, run through their `main`:
exit code 2, one line `PROG: error: ...` naming the flag as typed and what is expected, and for
the trainer no model built (its model builder is replaced by one that records the call)."""

import contextlib
import io
import os
import re

import pytest

from megatron_moma.command_line import integer, number, writable_directory_problem
from megatron_moma.testing.multiprocess import run_on_ranks
from megatron_moma.testing.trainer_runs import pretrain_on_ranks, trainer_flags


class _ModelBuilt(Exception):
    pass


def _run_mains(cases):
    """[(exit code or "model built", stderr)] of each (module, argv) main, in this rank."""
    from megatron_moma.conversion import cli
    from megatron_moma.training import loop, pretrain_moma, upcycling

    def refuse_to_build(*args, **kwargs):
        raise _ModelBuilt()

    loop.build_model = refuse_to_build
    mains = {"pretrain-moma": pretrain_moma.main, "moma-upcycle": upcycling.main,
             "moma-convert": cli.main}
    results = []
    for prog, argv in cases:
        error = io.StringIO()
        try:
            with contextlib.redirect_stderr(error):
                code = mains[prog](argv)
        except _ModelBuilt:
            code = "model built"
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
        results.append((code, error.getvalue()))
    return results


def _override(argv, flag, *values):
    """`argv` with `flag`'s values replaced (or the flag added)."""
    argv = list(argv)
    if flag in argv:
        start = end = argv.index(flag)
        end += 1
        while end < len(argv) and not argv[end].startswith("--"):
            end += 1
        del argv[start:end]
    return argv + [flag, *values]


def _trainer_cases(data_path, root):
    base = trainer_flags(data_path, root, "run", 1, "--lr", "1e-3", "--global-batch-size", "2")
    a_file = os.path.join(root, "a-file")
    open(a_file, "w").close()
    empty = os.path.join(root, "empty")
    os.makedirs(empty)
    moma = ["--architecture", "moma"]
    cases = [  # (changes to the base flags, what the error line must say)
        ([("--load", os.path.join(root, "nowhere"))], "--load " + os.path.join(root, "nowhere") +
         ": no such folder"),
        ([("--load", empty)], f"--load {empty} holds no checkpoint (no latest_checkpointed_iteration"),
        ([("--save", a_file)], f"--save {a_file} exists and is not a folder"),
        ([("--save", os.path.join(a_file, "sub"))], f"cannot be created: {a_file} is not a folder"),
        ([("--tensorboard-dir", a_file)], f"--tensorboard-dir {a_file} exists and is not a folder"),
        ([("--lr", "-1")], "argument --lr: expected a finite number >= 0, got '-1'"),
        ([("--lr", "nan")], "argument --lr: expected a finite number >= 0, got 'nan'"),
        ([("--min-lr", "1")], "--min-lr 1.0 must not exceed --lr 0.001"),
        ([("--lr-warmup-init", "1")], "--lr-warmup-init 1.0 must not exceed --lr 0.001"),
        ([("--lr-warmup-fraction", "0.1"), ("--lr-warmup-iters", "1")],
         "--lr-warmup-fraction and --lr-warmup-iters exclude each other"),
        ([("--micro-batch-size", "0")], "argument --micro-batch-size: expected an integer >= 1, got '0'"),
        ([("--train-iters", "x")], "argument --train-iters: expected an integer >= 1, got 'x'"),
        ([("--tensor-model-parallel-size", "0")], "argument --tensor-model-parallel-size: expected"),
        ([("--group-query-attention",), ("--num-query-groups", "3")],
         "--num-query-groups 3 must divide --num-attention-heads 4"),
        ([("--max-position-embeddings", "16")],
         "--max-position-embeddings 16 must be at least --seq-length 32"),
        ([("--hidden-dropout", "1.5")], "argument --hidden-dropout: expected a finite number in [0, 1]"),
        ([("--adam-beta2", "1")], "argument --adam-beta2: expected a finite number in [0, 1), got '1'"),
        ([("--seed", "-1")], "argument --seed: expected an integer in [0, 4294967295]"),
        ([("--kv-channels", "7")], "--position-embedding-type rope rotates pairs of channels"),
        ([("--recompute-granularity", "full")], "--recompute-granularity full needs --recompute-method"),
        ([("--modality-loss-weights", "text=1", "audio=2")],
         "--modality-loss-weights audio=2: 'audio' is not a modality of the dataset (the dataset's "
         "modalities: text, image)"),
        ([("--modality-loss-weights", "text=abc")],
         "argument --modality-loss-weights: 'text=abc': expected a finite number >= 0 after text="),
        ([("--modality-loss-weights", "image")], "expected name=weight (e.g. image=0.5), got 'image'"),
        ([("--mod",), ("--mod-capacity", "2")], "argument --mod-capacity: expected a finite number in (0, 1]"),
        ([("--mod",), ("--mod-layers", "5")], "--mod-layers 5: the model's layers are 0 to 1"),
        ([("--mod-layers", "1")], "--mod-layers needs --mod"),
        ([(*moma,), ("--moma-experts-per-modality", "2", "2", "2")],
         "--moma-experts-per-modality 2 2 2: 3 groups, expected one per modality of the dataset"),
        ([(*moma,), ("--moma-routing", "token_choice"), ("--moma-token-choice-topk", "2")],
         "--moma-token-choice-topk 2 exceeds the smallest expert group"),
        ([(*moma,), ("--moma-no-aux-router",)], "--moma-no-aux-router needs --moma-inference-routing"),
        ([("--split", "0,10,0")], "--split '0,10,0' leaves no training data"),
        ([("--data-path", os.path.join(root, "nodata"))], "--data-path " + os.path.join(root, "nodata") +
         ": no "),
        ([("--data-path", "0.5", data_path, "0.5")], "a blend is weight prefix pairs"),
        ([("--exit-duration-in-mins", "0")], "argument --exit-duration-in-mins: expected a finite number > 0"),
        ([("--device", "gpu")], "argument --device: invalid choice: 'gpu'"),
        ([("--frobnicate",)], "unrecognized arguments: --frobnicate"),
        ([("--finetune",)], "--finetune needs --load"),
        ([("--train-aux-routers",), ("--load", empty), ("--save", empty)],
         f"--load {empty} holds no checkpoint (no latest_checkpointed_iteration.txt; a checkpoint "
         "root as written by --save is expected, for --train-aux-routers)"),
    ]
    built = []
    for changes, message in cases:
        argv = base
        for flag, *values in changes:
            argv = _override(argv, flag, *values)
        built.append((argv, message))
    return built


def test_invalid_flags_are_one_line_exit_2_and_build_no_model(data_path, tmp_path):
    root = str(tmp_path)
    checkpoint = os.path.join(root, "ckpt")
    assert pretrain_on_ranks(1, trainer_flags(data_path, root, "ckpt", 1, "--lr", "1e-3",
                                              "--global-batch-size", "2", "--save", checkpoint)) == 0
    trainer = _trainer_cases(data_path, root)
    a_file = os.path.join(root, "a-file")
    upcycle = [
        (["--load", checkpoint, "--save", root + "/up", "--moma-experts-per-modality", "0", "2"],
         "argument --moma-experts-per-modality: expected an integer >= 1, got '0'"),
        (["--load", root + "/nowhere", "--save", root + "/up", "--moma-experts-per-modality", "2", "2"],
         f"--load {root}/nowhere: no such checkpoint directory"),
        (["--load", checkpoint, "--save", a_file, "--moma-experts-per-modality", "2", "2"],
         f"--save {a_file} exists and is not a folder"),
        (["--load", checkpoint, "--save", checkpoint, "--moma-experts-per-modality", "2", "2"],
         f"--save {checkpoint} is the --load checkpoint"),
        (["--load", checkpoint, "--save", root + "/up", "--moma-experts-per-modality", "4"],
         "--moma-experts-per-modality 4: 1 values, expected one per modality of the checkpoint's "
         "data (text, image)"),
    ]
    convert = [
        (["export-hf", "--load", checkpoint, "--out", root + "/hf", "--max-shard-size", "abc"],
         "argument --max-shard-size: size 'abc': expected a positive number of bytes"),
        (["export-hf", "--load", checkpoint, "--out", a_file], f"--out {a_file} exists and is not a folder"),
        (["export-hf", "--load", checkpoint, "--out", root + "/hf", "--iteration", "-1"],
         "argument --iteration: expected an integer >= 0, got '-1'"),
        (["import-hf", "--hf", root + "/nowhere", "--out", root + "/ck2"],
         f"--hf {root}/nowhere: no such Hugging Face model directory"),
        (["import-hf", "--hf", root, "--out", root + "/ck2", "--expert-model-parallel-size", "0"],
         "argument --expert-model-parallel-size: expected an integer >= 1, got '0'"),
        (["frobnicate"], "argument command: invalid choice: 'frobnicate'"),
    ]
    cases = ([("pretrain-moma", argv) for argv, _ in trainer] + [("moma-upcycle", a) for a, _ in upcycle]
             + [("moma-convert", a) for a, _ in convert])
    messages = [m for _, m in trainer] + [m for _, m in upcycle] + [m for _, m in convert]
    # The resume idiom, --load and --save on the same new folder, is accepted: the run gets to
    # building its model (which shows the builder replacement sees a model being built).
    fresh = os.path.join(root, "fresh")
    resume = trainer_flags(data_path, root, "run", 1, "--lr", "1e-3", "--load", fresh, "--save", fresh)
    results = run_on_ranks(_run_mains, 1, cases + [("pretrain-moma", resume)], timeout=300)[0]
    assert results.pop()[0] == "model built"
    assert len(results) == len(messages)
    for (prog, argv), message, (code, error) in zip(cases, messages, results):
        assert code == 2, (argv, code, error)
        assert error.count("\n") == 1 and error.startswith(f"{prog}: error: "), (argv, error)
        assert message in error, (argv, error)
    assert not os.path.exists(os.path.join(root, "up")) and not os.path.exists(os.path.join(root, "hf"))


@pytest.mark.parametrize("parse, text, expected", [
    (integer(1), "0", "expected an integer >= 1, got '0'"),
    (integer(0, 9), "10", "expected an integer in [0, 9], got '10'"),
    (integer(), "1.5", "expected an integer, got '1.5'"),
    (number(0, above=True), "0", "expected a finite number > 0, got '0'"),
    (number(0, 1, below=True), "1", "expected a finite number in [0, 1), got '1'"),
    (number(), "inf", "expected a finite number, got 'inf'"),
])
def test_value_types_say_what_they_expect(parse, text, expected):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(expected)):
        parse(text)


def test_value_types_accept_their_bounds():
    assert integer(1)("1") == 1 and number(0, 1)("1") == 1.0 and number(0)("0") == 0.0


def test_writable_directory_problem(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert writable_directory_problem(str(tmp_path / "new" / "deeper")) is None
    assert writable_directory_problem(str(tmp_path)) is None
    assert writable_directory_problem(str(a_file)) == "exists and is not a folder"
    assert writable_directory_problem(str(a_file / "x")) == f"cannot be created: {a_file} is not a folder"
