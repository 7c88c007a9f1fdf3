"""`moma-convert` end to end: checkpoints of every architecture saved under TP2xSP (xEP2 for
MoMa), PP2 and PP2xVPP2 -> Hugging Face folders whose models (loaded as remote code) give
Megatron's logits; export -> import -> export is bit-exact; an imported checkpoint trains under
another layout; `pretrain_moma --skip-train` evaluates in the routing the Hugging Face model
uses; bad input is refused with nothing written.

Most checkpoints are the trainer's model with every weight set from its global name
(`save_named_weight_checkpoints`), so that what the reader returns is checked against known
values; one is a real training run (Adam, distributed optimizer) under TP2xSPxEP2.
"""

import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_moma.conversion.safetensors_shards import INDEX_FILE, parse_size
from megatron_moma.data.vocabulary import read_sidecar, sidecar_path
from megatron_moma.testing.multiprocess import run_on_ranks
from megatron_moma.testing.trainer_runs import (
    MOMA_2T2I,
    pretrain_on_ranks,
    save_named_weight_checkpoints,
    tensorboard_scalars,
    trainer_flags,
)
from megatron_moma.training import checkpointing

# fp32 logits of O(1) that differ only in the order of floating-point operations (measured:
# at most 3.6e-7 over every case here, on logits up to 1.9).
LOGITS_ATOL = 1e-5
# A loss from an EP2 evaluation or training step against one computed at world size 1 or by the
# Hugging Face model (fp32 sums in another order; measured: 6.6e-7 for the evaluation against
# the Hugging Face model, 3e-9 against megatron_logits, 0 for the resumed training step).
LOSS_ATOL = 1e-5
MAX_SHARD_SIZE = "100KB"

ARCHITECTURES = {
    "dense": ["--architecture", "dense"],
    "moma": MOMA_2T2I,
    "mot": ["--architecture", "mot"],
    "mot+moma": ["--architecture", "mot+moma", "--moma-experts-per-modality", "2", "2"],
    "moma+mod": MOMA_2T2I + ["--mod", "--mod-capacity", "0.5"],
}
TP2_SP_EP2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel",
              "--expert-model-parallel-size", "2"]
LAYOUTS = {  # saved on 4 ranks (data parallelism takes the rest); EP needs experts (MoMa)
    "tp2-sp": TP2_SP_EP2[:3],
    "tp2-sp-ep2": TP2_SP_EP2,
    "pp2": ["--pipeline-model-parallel-size", "2"],
    "pp2-vpp2": ["--pipeline-model-parallel-size", "2", "--num-layers", "4",
                 "--num-layers-per-virtual-pipeline-stage", "1", "--global-batch-size", "8"],
}
CASES = [f"{architecture}@{'tp2-sp-ep2' if 'moma' in architecture else 'tp2-sp'}"
         for architecture in ARCHITECTURES]
CASES += [f"{architecture}@pp2" for architecture in ARCHITECTURES] + ["moma+mod@pp2-vpp2"]


def _convert(argv):
    from megatron_moma.conversion.cli import main

    return main(argv)


def convert(*argv) -> int:
    """`moma-convert argv` on a forked rank (it initialises torch.distributed)."""
    return run_on_ranks(_convert, 1, list(argv), timeout=120)[0]


def mixed_tokens(vocabulary, batch: int = 2) -> torch.Tensor:
    """[batch, 24] ids: text, then an image between its sentinels, then text."""
    generator = torch.Generator().manual_seed(0)
    image = vocabulary.range_of("image")
    text = lambda n: torch.randint(0, image.first_id - 4, (batch, n), generator=generator)  # noqa: E731
    codes = torch.randint(image.first_id, image.last_id + 1, (batch, 10), generator=generator)
    begin = torch.full((batch, 1), vocabulary.begin_of_image)
    end = torch.full((batch, 1), vocabulary.end_of_image)
    return torch.cat([text(6), begin, codes, end, text(6)], dim=1)


def load_hf(folder: str):
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, local_files_only=True)
    assert type(model).__module__.startswith("transformers_modules.")  # the code shipped in `folder`
    return model.eval()


def masked_mean_loss(logits: torch.Tensor, batches) -> float:
    """Megatron's lm loss: next-token cross-entropy summed over loss_mask, over its count."""
    labels = torch.cat([b["labels"] for b in batches])
    mask = torch.cat([b["loss_mask"] for b in batches]).float()
    losses = F.cross_entropy(logits.flatten(0, 1).double(), labels.flatten(), reduction="none")
    return float((losses * mask.flatten()).sum() / mask.sum())


@pytest.fixture(scope="module")
def vocabulary(data_path):
    return read_sidecar(sidecar_path(data_path))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, data_path, vocabulary):
    """{case: checkpoint root}: every case's model saved under its layout (4 ranks) at iteration 1."""
    root = str(tmp_path_factory.mktemp("saved"))
    roots = {case: os.path.join(root, case) for case in CASES}
    checkpoints = {roots[case]: trainer_flags(data_path, root, case, 1, *ARCHITECTURES[case.split("@")[0]],
                                              *LAYOUTS[case.split("@")[1]]) for case in CASES}
    run_on_ranks(save_named_weight_checkpoints, 4, checkpoints, vocabulary, timeout=300)
    return roots


def _export_all(saved, out_root, tokens, tokenizer):
    """On one rank: export every case and compute Megatron's logits of its checkpoint."""
    from megatron_moma.conversion.cli import main
    from megatron_moma.conversion.megatron_logits import megatron_logits

    results = {}
    for case, checkpoint in saved.items():
        out = os.path.join(out_root, "moma_export_" + case.replace("@", "_").replace("+", "_"))
        extra = ["--tokenizer", tokenizer] if case == "moma@tp2-sp-ep2" else []
        code = main(["export-hf", "--load", checkpoint, "--out", out, "--max-shard-size",
                     MAX_SHARD_SIZE, *extra])
        results[case] = (code, out, megatron_logits(checkpoint, tokens))
    return results


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory, vocabulary):
    """A Hugging Face tokenizer whose end-of-sequence id is the corpus' end-of-document id."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocabulary.eod)}
    words.update({"<eod>": vocabulary.eod, "<pad>": vocabulary.pad})
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="w0"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    folder = str(tmp_path_factory.mktemp("tokenizer"))
    PreTrainedTokenizerFast(tokenizer_object=model, eos_token="<eod>", pad_token="<pad>",
                            unk_token="w0").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def exported(saved, tmp_path_factory, vocabulary, tokenizer_folder):
    """{case: (exit code, Hugging Face folder, Megatron's logits of mixed_tokens)}."""
    out_root = str(tmp_path_factory.mktemp("exported"))
    return run_on_ranks(_export_all, 1, saved, out_root, mixed_tokens(vocabulary), tokenizer_folder,
                        timeout=300)[0]


def _read_back(saved):
    """On one rank: for every case, the global keys of the weights the world-size-1 model read
    from the checkpoint, and those that differ from the values saved."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    from megatron_moma.conversion.megatron_checkpoint import load_world_size_one_model
    from megatron_moma.conversion.world_size_one import world_size_one_parallel_state
    from megatron_moma.testing.gpt_runs import global_initial_value

    checked = {}
    for case, checkpoint in saved.items():
        with world_size_one_parallel_state():
            sharded = load_world_size_one_model(checkpoint).model.sharded_state_dict()
            apply_factories(sharded)
            shards = [s for s in nested_values(sharded)
                      if isinstance(s, ShardedTensor) and not s.key.endswith("_extra_state")]
            differ = [s.key for s in shards if not torch.equal(
                s.data, global_initial_value(s.key, tuple(s.global_shape))[s.global_slice()])]
            checked[case] = ({s.key for s in shards}, differ)
    return checked


def test_the_world_size_one_reader_returns_every_saved_weight(saved):
    """The whole model read from TP2xSP(xEP2), PP2 and PP2xVPP2 shards holds exactly the values
    each rank saved (every weight was set from its global name before saving)."""
    checked = run_on_ranks(_read_back, 1, saved, timeout=300)[0]
    for case, (keys, differ) in checked.items():
        assert differ == [], case
        assert "embedding.word_embeddings.weight" in keys and "decoder.final_layernorm.weight" in keys
    assert any(".mlp.experts.image.experts.linear_fc1" in k for k in checked["moma@tp2-sp-ep2"][0])
    assert any("mod_aux_router" in k for k in checked["moma+mod@pp2-vpp2"][0])


def _upcycle(argv):
    from megatron_moma.training.upcycling import main

    return main(argv)


def test_upcycling_needs_only_the_checkpoint(saved, tmp_path):
    """moma-upcycle rebuilds the model from run_config.json like the converter: the dataset
    named there (`unused`) does not exist."""
    source = saved["dense@pp2"]
    run_config = checkpointing.read_run_config(checkpointing.checkpoint_dir(source, 1))
    assert not os.path.exists(run_config["arguments"]["data_path"][0])
    upcycled = str(tmp_path / "upcycled")
    assert run_on_ranks(_upcycle, 1, ["--load", source, "--save", upcycled,
                                      "--moma-experts-per-modality", "2", "2"], timeout=120) == [0]
    assert checkpointing.read_run_config(checkpointing.checkpoint_dir(upcycled, 1))["architecture"] == "moma"


@pytest.mark.parametrize("case", CASES)
def test_exported_model_gives_megatrons_logits(exported, vocabulary, case):
    code, folder, megatron = exported[case]
    assert code == 0
    with torch.no_grad():
        logits = load_hf(folder)(mixed_tokens(vocabulary)).logits
    assert logits.shape == megatron.shape == (2, 24, megatron.shape[-1])
    torch.testing.assert_close(logits, megatron, atol=LOGITS_ATOL, rtol=0)


def test_export_folder_holds_config_code_shards_generation_config_and_tokenizer(exported, vocabulary):
    _, folder, _ = exported["moma@tp2-sp-ep2"]
    names = set(os.listdir(folder))
    assert {"config.json", "configuration_moma.py", "modeling_moma.py", INDEX_FILE,
            "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    config = json.load(open(os.path.join(folder, "config.json")))
    assert config["model_type"] == "megatron_moma" and config["architectures"] == ["MoMaForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_moma.MoMaForCausalLM"
    assert config["dtype"] == "float32" and config["moma_experts_per_modality"] == [2, 2]
    generation = json.load(open(os.path.join(folder, "generation_config.json")))
    assert (generation["eos_token_id"], generation["pad_token_id"]) == (vocabulary.eod, vocabulary.pad)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert tokenizer.eos_token_id == vocabulary.eod
    prompt = mixed_tokens(vocabulary)[:, :8]
    generated = load_hf(folder).generate(prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape == (2, 12) and torch.equal(generated[:, :8], prompt)


def test_a_small_max_shard_size_gives_several_shards_indexed_once_each(exported):
    _, folder, _ = exported["mot+moma@pp2"]
    index = json.load(open(os.path.join(folder, INDEX_FILE)))
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files == sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    seen, total = [], 0
    for name in files:
        with safe_open(os.path.join(folder, name), framework="pt") as shard:
            keys = list(shard.keys())
            sizes = [shard.get_tensor(k).nbytes for k in keys]
        assert all(index["weight_map"][k] == name for k in keys)
        assert sum(sizes) <= parse_size(MAX_SHARD_SIZE) or len(keys) == 1
        seen += keys
        total += sum(sizes)
    assert sorted(seen) == sorted(index["weight_map"]) and len(seen) == len(set(seen))
    assert index["metadata"]["total_size"] == total


def test_parse_size_reads_hugging_face_sizes():
    assert [parse_size(s) for s in ("5GB", "500MB", "100KB", "2GiB", "1234")] == [
        5 * 10**9, 500 * 10**6, 100 * 10**3, 2 * 2**30, 1234]


def _files(folder):
    return sorted(n for n in os.listdir(folder) if not n.startswith("tokenizer"))


@pytest.mark.parametrize("case, target, dtype", [
    ("moma+mod@pp2-vpp2", TP2_SP_EP2, "fp32"),
    ("mot+moma@tp2-sp-ep2", ["--pipeline-model-parallel-size", "2"], "fp32"),
    ("dense@pp2", [], "fp32"),
    ("mot@tp2-sp", ["--tensor-model-parallel-size", "2"], "bf16"),
])
def test_export_import_export_is_bit_exact(saved, exported, tmp_path, case, target, dtype):
    """The second export reads the imported checkpoint's iteration folder and takes its dtype
    from the imported run config."""
    first, checkpoint, second = exported[case][1], str(tmp_path / "imported"), str(tmp_path / "again")
    if dtype == "bf16":
        first = str(tmp_path / "bf16")
        assert convert("export-hf", "--load", saved[case], "--out", first, "--dtype", "bf16",
                       "--max-shard-size", MAX_SHARD_SIZE) == 0
        assert json.load(open(os.path.join(first, "config.json")))["dtype"] == "bfloat16"
    assert convert("import-hf", "--hf", first, "--out", checkpoint, *target) == 0
    assert convert("export-hf", "--load", os.path.join(checkpoint, "iter_0000000"), "--out", second,
                   "--max-shard-size", MAX_SHARD_SIZE) == 0
    assert _files(first) == _files(second)
    for name in _files(first):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(first, name), "pt") as a:
                with safe_open(os.path.join(second, name), "pt") as b:
                    assert list(a.keys()) == list(b.keys())
                    for key in a.keys():
                        assert torch.equal(a.get_tensor(key), b.get_tensor(key)), (name, key)
        else:
            assert open(os.path.join(first, name)).read() == open(os.path.join(second, name)).read(), name


# ---------------------------------------------------------------- a real training run


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_path):
    """MoMa 2t2i trained 2 iterations under TP2xSPxEP2 (Adam, distributed optimizer): (root, flags)."""
    root = str(tmp_path_factory.mktemp("trained"))
    flags = MOMA_2T2I + ["--global-batch-size", "4", "--lr", "3e-3"]
    save = os.path.join(root, "ckpt")
    assert pretrain_on_ranks(4, trainer_flags(data_path, root, "train", 2, *flags, *TP2_SP_EP2,
                                              "--use-distributed-optimizer", "--save", save)) == 0
    return save, flags


@pytest.fixture(scope="module")
def trained_export(trained, tmp_path_factory):
    """The Hugging Face folder of the trained checkpoint."""
    hf = str(tmp_path_factory.mktemp("trained-hf") / "moma_trained")
    assert convert("export-hf", "--load", trained[0], "--out", hf) == 0
    return hf


def _first_global_batches(argv):
    """On one rank: the first global batch of the training and of the validation split."""
    from megatron_moma.parallel.layout import ParallelLayout
    from megatron_moma.training import configs, data
    from megatron_moma.training.arguments import parse_args

    args = parse_args(argv)
    ParallelLayout().initialize()
    splits = data.build_splits(args, configs.vocabulary(args))
    return {"train": data.micro_batches(splits.train, 0, args),
            "valid": data.micro_batches(splits.valid, 0, args)}


def _megatron_logits(checkpoint, tokens, routing):
    from megatron_moma.conversion.megatron_logits import megatron_logits

    return megatron_logits(checkpoint, tokens, moma_inference_routing=routing)


def test_skip_train_evaluates_in_the_routing_the_hugging_face_model_uses(trained, trained_export,
                                                                         data_path, tmp_path):
    """--skip-train under EP2 (aux routing, causal) gives the exported model's loss on the
    validation batch; with --moma-inference-routing expert_choice, at world size 1, the loss of
    megatron_logits in that routing. Nothing is saved. (Not under TP: after 2 steps from
    Megatron's init the routers' scores are nearly equal, and TP's other order of fp32 sums
    flips some routing decisions at near ties: measured 9e-4 on this loss.)"""
    save, flags = trained
    root = str(tmp_path)
    before = sorted(os.listdir(save))
    assert pretrain_on_ranks(2, trainer_flags(data_path, root, "aux", 2, *flags, "--skip-train",
                                              "--expert-model-parallel-size", "2", "--load", save,
                                              "--save", save)) == 0
    without_lr = [f for f in flags if f not in ("--lr", "3e-3")]
    assert pretrain_on_ranks(1, trainer_flags(data_path, root, "ec", 2, *without_lr, "--skip-train",
                                              "--load", save, "--moma-inference-routing",
                                              "expert_choice")) == 0
    assert sorted(os.listdir(save)) == before
    aux = tensorboard_scalars(os.path.join(root, "tb-aux"), "lm loss validation")
    expert_choice = tensorboard_scalars(os.path.join(root, "tb-ec"), "lm loss validation")
    assert list(aux) == list(expert_choice) == [2]  # logged at the checkpoint's iteration

    valid = run_on_ranks(_first_global_batches, 1, trainer_flags(data_path, root, "b", 2, *flags))[0]["valid"]
    tokens = torch.cat([b["tokens"] for b in valid])
    with torch.no_grad():
        hf_loss = masked_mean_loss(load_hf(trained_export)(tokens).logits, valid)
    assert aux[2] == pytest.approx(hf_loss, abs=LOSS_ATOL)
    # Expert choice ranks the tokens of a micro-batch: evaluate micro-batch by micro-batch.
    logits = torch.cat([run_on_ranks(_megatron_logits, 1, save, b["tokens"], "expert_choice")[0]
                        for b in valid])
    assert expert_choice[2] == pytest.approx(masked_mean_loss(logits, valid), abs=LOSS_ATOL)
    assert abs(aux[2] - expert_choice[2]) > 1e-3  # the routing flag changes what is evaluated


def test_imported_checkpoint_resumes_training_under_expert_parallelism(trained, trained_export,
                                                                       data_path, tmp_path):
    """Import the exported TP2xSPxEP2 run for EP2 and train 2 iterations on 2 ranks: the first
    loss is the world-size-1 loss of the same weights (the trained checkpoint, --finetune)."""
    save, flags = trained
    root, imported = str(tmp_path), str(tmp_path / "imported")
    assert convert("import-hf", "--hf", trained_export, "--out", imported,
                   "--expert-model-parallel-size", "2") == 0
    run_config = checkpointing.read_run_config(checkpointing.checkpoint_dir(imported, 0))
    assert run_config["arguments"]["expert_model_parallel_size"] == 2 and run_config["world_size"] == 2
    assert checkpointing.read_tracker(imported) == 0

    ep2 = ["--expert-model-parallel-size", "2"]
    assert pretrain_on_ranks(2, trainer_flags(data_path, root, "resumed", 2, *flags, *ep2,
                                              "--load", imported, "--save", imported)) == 0
    assert pretrain_on_ranks(1, trainer_flags(data_path, root, "reference", 1, *flags, "--load", save,
                                              "--finetune")) == 0
    resumed = tensorboard_scalars(os.path.join(root, "tb-resumed"), "lm loss")
    reference = tensorboard_scalars(os.path.join(root, "tb-reference"), "lm loss")
    assert sorted(resumed) == [1, 2]
    assert resumed[1] == pytest.approx(reference[1], abs=LOSS_ATOL)
    assert checkpointing.read_tracker(imported) == 2


# ---------------------------------------------------------------- bad input


def _edited_copy(checkpoint, destination, **arguments):
    """A copy of `checkpoint` whose run_config.json has `arguments` changed."""
    shutil.copytree(checkpoint, destination)
    path = os.path.join(checkpointing.checkpoint_dir(destination, 1), "run_config.json")
    run_config = json.load(open(path))
    run_config["arguments"].update(arguments)
    json.dump(run_config, open(path, "w"))
    return destination


def _bad_inputs(saved, exported, tmp_path, data_path, tokenizer_folder):
    """(command line before --out, exit code, expected message) for each bad input: 2 for a
    flag that names no usable input or a layout that does not fit, 1 for bad input content."""
    moma = saved["moma@tp2-sp-ep2"]
    no_config = str(tmp_path / "no-config")
    shutil.copytree(moma, no_config)
    os.remove(os.path.join(checkpointing.checkpoint_dir(no_config, 1), "run_config.json"))
    hf = exported["moma@pp2"][1]
    shards = sorted(set(json.load(open(os.path.join(hf, INDEX_FILE)))["weight_map"].values()))
    missing_shard, missing_key = str(tmp_path / "missing-shard"), str(tmp_path / "missing-key")
    shutil.copytree(hf, missing_shard)
    os.remove(os.path.join(missing_shard, shards[1]))
    shutil.copytree(hf, missing_key)
    index_path = os.path.join(missing_key, INDEX_FILE)
    index = json.load(open(index_path))
    index["weight_map"]["model.layers.9.mlp.gate_proj.weight"] = shards[0]
    json.dump(index, open(index_path, "w"))
    wrong_eos = str(tmp_path / "wrong-eos")
    shutil.copytree(tokenizer_folder, wrong_eos)
    tokenizer_config = os.path.join(wrong_eos, "tokenizer_config.json")
    json.dump(dict(json.load(open(tokenizer_config)), eos_token="w3"), open(tokenizer_config, "w"))
    return [
        (["export-hf", "--load", moma, "--iteration", "7"], 2,
         f"{moma}: no checkpoint of iteration 7 (no iter_0000007/; saved iterations: [1])"),
        (["export-hf", "--load", os.path.dirname(data_path)], 2,
         "is not a pretrain_moma checkpoint directory: no latest_checkpointed_iteration.txt"),
        (["export-hf", "--load", str(tmp_path / "nowhere")], 2, "no such checkpoint directory"),
        (["export-hf", "--load", no_config], 1, "iter_0000001: no run_config.json"),
        (["export-hf", "--load", _edited_copy(moma, str(tmp_path / "no-aux"), moma_no_aux_router=True)], 1,
         "unsupported flag --moma-no-aux-router"),
        (["export-hf", "--load", _edited_copy(moma, str(tmp_path / "wider"), hidden_size=64)], 1,
         "the checkpoint does not hold the moma model its run_config.json describes"),
        (["export-hf", "--load", moma, "--max-shard-size", "5XB"], 2, "argument --max-shard-size: size '5XB': expected"),
        (["export-hf", "--load", moma, "--tokenizer", str(tmp_path / "nowhere")], 2,
         "not a Hugging Face tokenizer folder"),
        (["export-hf", "--load", moma, "--tokenizer", wrong_eos], 2,
         f"its end-of-sequence id 3 is not the run's end-of-document id {256}"),
        (["import-hf", "--hf", hf, "--tensor-model-parallel-size", "3", "--sequence-parallel"], 2,
         "--num-attention-heads 4 is not divisible by --tensor-model-parallel-size 3"),
        (["import-hf", "--hf", hf, "--expert-model-parallel-size", "4"], 2,
         "every group must be divisible by --expert-model-parallel-size 4"),
        (["import-hf", "--hf", hf, "--pipeline-model-parallel-size", "4"], 2,
         "--num-layers 2 is not divisible by --pipeline-model-parallel-size 4"),
        (["import-hf", "--hf", moma], 2, "no config.json"),
        (["import-hf", "--hf", missing_shard], 1, f"names files that do not exist: ['{shards[1]}']"),
        (["import-hf", "--hf", missing_key], 1, "missing ['model.layers.9.mlp.gate_proj.weight']"),
    ]


def test_bad_input_is_an_error_that_names_it_and_writes_nothing(saved, exported, tmp_path, data_path,
                                                                 tokenizer_folder, capfd):
    cases = _bad_inputs(saved, exported, tmp_path, data_path, tokenizer_folder)
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    for number, (argv, code, message) in enumerate(cases):
        capfd.readouterr()
        out = str(outputs / f"out{number}")
        assert convert(*argv, "--out", out) == code, argv
        error = capfd.readouterr().err  # after any progress bars: the one error line
        assert error.endswith("\n") and "Traceback" not in error, error
        last = error.split("\r")[-1].splitlines()[-1]
        assert last.startswith("moma-convert: error: ") and message in last, (argv, error)
    assert os.listdir(outputs) == []  # no output folder, no staging folder left


def test_an_existing_output_folder_is_kept_unless_overwrite(exported, tmp_path, capfd):
    _, hf, _ = exported["dense@pp2"]
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "notes.txt").write_text("keep me")
    assert convert("import-hf", "--hf", hf, "--out", str(checkpoint)) == 2
    assert "--out " + str(checkpoint) + " exists and is not empty; pass --overwrite" in capfd.readouterr().err
    assert os.listdir(checkpoint) == ["notes.txt"]
    assert convert("import-hf", "--hf", hf, "--out", str(checkpoint), "--overwrite") == 0
    assert sorted(os.listdir(checkpoint)) == ["iter_0000000", "latest_checkpointed_iteration.txt"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
