"""`pretrain_moma` flags: Megatron-LM's names and defaults, derived values, clear errors."""

import pytest

from megatron_moma.training.arguments import ArgumentError, parse_args, virtual_pipeline_size

REQUIRED = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
            "--seq-length", "32", "--train-iters", "10", "--lr", "1e-3", "--data-path", "data/x"]


def test_megatron_lm_defaults_and_derived_values():
    args = parse_args(REQUIRED, world_size=4)
    # Megatron-LM's defaults (megatron/training/arguments.py).
    assert (args.min_lr, args.lr_decay_style, args.lr_warmup_iters, args.weight_decay) == (
        0.0, "linear", 0, 0.01)
    assert (args.clip_grad, args.adam_beta1, args.adam_beta2, args.adam_eps) == (1.0, 0.9, 0.999, 1e-8)
    assert (args.split, args.seed, args.log_interval) == ("969, 30, 1", 1234, 100)
    assert (args.eval_interval, args.eval_iters, args.make_vocab_size_divisible_by) == (1000, 100, 128)
    assert (args.hidden_dropout, args.attention_dropout, args.init_method_std) == (0.1, 0.1, 0.02)
    assert args.attention_backend == "auto"
    # Derived as Megatron-LM derives them.
    assert args.ffn_hidden_size == 256 and args.kv_channels == 16
    assert args.max_position_embeddings == 32 and args.lr_decay_iters == 10
    assert args.data_parallel_size == 4 and args.global_batch_size == 4


def test_blend_and_virtual_pipeline_flags():
    args = parse_args(REQUIRED[:-1] + ["0.3", "data/a", "0.7", "data/b",
                                       "--pipeline-model-parallel-size", "2",
                                       "--num-layers-per-virtual-pipeline-stage", "1",
                                       "--global-batch-size", "4"], world_size=2)
    assert args.data_path == ["0.3", "data/a", "0.7", "data/b"]
    assert virtual_pipeline_size(args) == 2


@pytest.mark.parametrize("extra, world_size, message", [
    (["--global-batch-size", "6", "--micro-batch-size", "4"], 1, "--global-batch-size 6"),
    (["--tensor-model-parallel-size", "2"], 3, "world size 3"),
    (["--sequence-parallel"], 1, "--sequence-parallel needs"),
    (["--architecture", "moma"], 1, "--disable-bias-linear"),
    (["--architecture", "moma", "--disable-bias-linear", "--moma-experts-per-modality", "3", "4",
      "--expert-model-parallel-size", "2"], 2, "divisible by --expert-model-parallel-size 2"),
    (["--train-aux-routers"], 1, "--train-aux-routers needs --load"),
    (["--use-distributed-optimizer", "--optimizer", "sgd"], 1, "adam only"),
    (["--save-interval", "5"], 1, "--save-interval needs --save"),
    (["--split", "a,b"], 1, "--split 'a,b'"),
    (["--lr-warmup-iters", "10"], 1, "--lr-warmup-iters 10 must be smaller than --lr-decay-iters 10"),
    (["--pipeline-model-parallel-size", "3"], 3, "--num-layers 4 is not divisible"),
    (["--expert-tensor-parallel-size", "2", "--expert-model-parallel-size", "2"], 2,
     "world size 2 is not divisible by --expert-tensor-parallel-size x --expert-model-parallel-size"),
    (["--architecture", "moma", "--disable-bias-linear", "--ffn-hidden-size", "33",
      "--tensor-model-parallel-size", "2", "--sequence-parallel"], 2,
     "--ffn-hidden-size 33 is not divisible by the expert-tensor-parallel size 2"),
    (["--tensor-model-parallel-size", "3"], 3,
     "--num-attention-heads 4 is not divisible by --tensor-model-parallel-size 3"),
    (["--group-query-attention", "--num-query-groups", "1", "--tensor-model-parallel-size", "2"], 2,
     "--num-query-groups 1 is not divisible by --tensor-model-parallel-size 2"),
    (["--skip-train"], 1, "--skip-train needs --load"),
    (["--attention-backend", "fused", "--device", "cpu"], 1, "--attention-backend fused is cuDNN"),
])
def test_invalid_combinations_name_the_flags(extra, world_size, message):
    with pytest.raises(ArgumentError, match=message.replace("(", r"\(")):
        parse_args(REQUIRED + extra, world_size=world_size)


def test_moma_takes_megatron_expert_tensor_parallelism():
    moma = ["--architecture", "moma", "--disable-bias-linear", "--moma-experts-per-modality", "2", "2"]
    args = parse_args(REQUIRED + moma + ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                         "--expert-model-parallel-size", "2",
                                         "--expert-tensor-parallel-size", "2"], world_size=4)
    assert args.expert_tensor_parallel_size == 2
    args = parse_args(REQUIRED + moma + ["--expert-tensor-parallel-size", "2"], world_size=2)
    assert args.expert_tensor_parallel_size == 2 and args.data_parallel_size == 2


def test_skip_train_needs_no_learning_rate():
    args = parse_args([a for a in REQUIRED if a not in ("--lr", "1e-3")] + ["--skip-train", "--load", "ckpt"])
    assert args.skip_train and args.lr == 0.0


def test_missing_lr_and_data_path_are_errors():
    with pytest.raises(ArgumentError, match="--lr is required"):
        parse_args([a for a in REQUIRED if a not in ("--lr", "1e-3")])
    with pytest.raises(ArgumentError, match="--data-path is required"):
        parse_args(REQUIRED[:-2])


def test_one_expert_group_on_mixed_modal_data_is_the_mixed_moe_baseline():
    """`--moma-experts-per-modality 8` on text+image data: the paper's moe_8x, one group over
    every modality (the model sees one modality); with MoT it is refused."""
    from megatron_moma.modality import ModalityLayout
    from megatron_moma.training.configs import transformer_config

    data = ModalityLayout.text_and_image(100, 199)
    moma = ["--disable-bias-linear", "--moma-experts-per-modality", "8"]
    config = transformer_config(parse_args(REQUIRED + ["--architecture", "moma"] + moma), data)
    assert config.modality_layout.names == ("text",) and config.moma.experts_per_modality == (8,)
    per_modality = transformer_config(parse_args(REQUIRED + ["--architecture", "moma", "--disable-bias-linear",
                                                             "--moma-experts-per-modality", "4", "4"]), data)
    assert per_modality.modality_layout == data
    with pytest.raises(ArgumentError, match="one expert group for every modality.*needs --architecture moma"):
        transformer_config(parse_args(REQUIRED + ["--architecture", "mot+moma"] + moma), data)
