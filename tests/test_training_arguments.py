"""`pretrain_moma` flags: Megatron-LM's names and defaults, derived values, clear errors."""

import pytest

from megatron_moma.training.arguments import (
    ArgumentError,
    lr_schedule_iters,
    parse_args,
    virtual_pipeline_size,
)

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
    assert args.max_position_embeddings == 32 and lr_schedule_iters(args) == (0, 10)
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


def test_moma_expert_choice_takes_tensor_parallelism_without_sequence_parallelism():
    """The layer under TP without SP equals world size 1 (tests/test_parallel_equivalence.py,
    moma-expert-choice-tp2-*); token choice needs SP, as Megatron's MoE."""
    from megatron_moma.modality import ModalityLayout
    from megatron_moma.training import configs

    moma = ["--architecture", "moma", "--disable-bias-linear", "--moma-experts-per-modality", "2", "2"]
    args = parse_args(REQUIRED + moma + ["--tensor-model-parallel-size", "2"], world_size=2)
    config = configs.transformer_config(args, ModalityLayout.text_and_image(32, 63))
    assert config.tensor_model_parallel_size == 2 and not config.sequence_parallel
    with pytest.raises(ArgumentError, match="--moma-routing token_choice with "
                                            "--tensor-model-parallel-size > 1 needs --sequence-parallel"):
        parse_args(REQUIRED + moma + ["--tensor-model-parallel-size", "2", "--moma-routing",
                                      "token_choice"], world_size=2)


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


def test_lr_schedule_restarted_at_an_iteration_decays_over_the_iterations_left():
    """Megatron-LM's --lr-decay-iters: the schedule's length, by default up to --train-iters."""
    args = parse_args(REQUIRED + ["--train-iters", "100", "--lr-warmup-fraction", "0.1"])
    assert lr_schedule_iters(args) == (10, 100)
    assert lr_schedule_iters(args, start_iteration=60) == (4, 40)
    args = parse_args(REQUIRED + ["--lr-decay-iters", "8", "--lr-warmup-iters", "2"])
    assert lr_schedule_iters(args, start_iteration=5) == (2, 8)


def test_aux_router_stage_runs_the_frozen_model_without_dropout_or_router_noise():
    """Stage 2 learns the assignments inference makes: no dropout, no Gumbel noise."""
    from megatron_moma.modality import ModalityLayout
    from megatron_moma.training import configs

    moma = ["--architecture", "moma", "--disable-bias-linear", "--moma-experts-per-modality", "2", "2",
            "--moma-gumbel-noise", "--hidden-dropout", "0.1", "--attention-dropout", "0.1"]
    layout = ModalityLayout.text_and_image(32, 63)
    stage_one = configs.transformer_config(parse_args(REQUIRED + moma), layout)
    assert stage_one.moma.gumbel_noise and stage_one.hidden_dropout == stage_one.attention_dropout == 0.1
    stage_two = configs.transformer_config(
        parse_args(REQUIRED + moma + ["--train-aux-routers", "--load", "ckpt"]), layout)
    assert not stage_two.moma.gumbel_noise
    assert stage_two.hidden_dropout == stage_two.attention_dropout == 0.0


def test_token_choice_takes_megatron_lm_router_loss_flags():
    """Megatron-LM's --moe-aux-loss-coeff (default 0) and --moe-z-loss-coeff reach the routers
    (tests/test_moma.py checks the loss they weight); expert choice has no such loss."""
    from megatron_moma.modality import ModalityLayout
    from megatron_moma.training import configs

    token_choice = ["--architecture", "moma", "--disable-bias-linear", "--moma-experts-per-modality",
                    "2", "2", "--moma-routing", "token_choice"]
    layout = ModalityLayout.text_and_image(32, 63)
    default = configs.transformer_config(parse_args(REQUIRED + token_choice), layout)
    assert default.moe_aux_loss_coeff == 0.0 and default.moe_z_loss_coeff is None
    config = configs.transformer_config(parse_args(REQUIRED + token_choice + [
        "--moe-aux-loss-coeff", "0.01", "--moe-z-loss-coeff", "0.001"]), layout)
    assert config.moe_aux_loss_coeff == 0.01 and config.moe_z_loss_coeff == 0.001
    with pytest.raises(ArgumentError, match="need --moma-routing token_choice"):
        parse_args(REQUIRED + token_choice[:-2] + ["--moe-aux-loss-coeff", "0.01"])


def test_mod_topk_scope_defaults_to_the_batch():
    from megatron_moma.modality import ModalityLayout
    from megatron_moma.training import configs

    layout = ModalityLayout.text_and_image(32, 63)
    assert configs.transformer_config(parse_args(REQUIRED + ["--mod"]), layout).mod.topk_scope == "batch"
    sequence = parse_args(REQUIRED + ["--mod", "--mod-topk-scope", "sequence"])
    assert configs.transformer_config(sequence, layout).mod.topk_scope == "sequence"
