"""Train a tiny GPT of any of our architectures on CPU under a Megatron parallel layout, with
torchrun and gloo.

The run that shows megatron-core's own TP/SP/PP/VPP/EP and distributed-optimizer code, and our
MoMa / MoT / MoD layers under it, working on CPU through `megatron_moma.platform`. Tokens are
random ids from a 128-id vocabulary whose upper half is image codes. Every layout starts from
the same weights (set by global parameter name) and data, so its loss curve equals the
single-process one:

    torchrun --standalone --nproc-per-node 1 examples/cpu_parallel_smoke.py
    torchrun --standalone --nproc-per-node 2 examples/cpu_parallel_smoke.py \
        --tensor-model-parallel-size 2 --sequence-parallel
    torchrun --standalone --nproc-per-node 4 examples/cpu_parallel_smoke.py --num-experts 4 \
        --pipeline-model-parallel-size 2 --expert-model-parallel-size 2
    torchrun --standalone --nproc-per-node 2 examples/cpu_parallel_smoke.py --architecture moma \
        --moma-experts-per-modality 2 2 --tensor-model-parallel-size 2 --sequence-parallel
"""

import argparse
import json

import torch.distributed as dist

from megatron_moma.config import MoDOptions, MoMaOptions, MoTOptions
from megatron_moma.parallel.layout import ParallelLayout
from megatron_moma.platform import activate_platform
from megatron_moma.testing import gpt_runs


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_argument_group("parallelism (Megatron-LM flag names)")
    group.add_argument("--tensor-model-parallel-size", type=int, default=1)
    group.add_argument("--sequence-parallel", action="store_true")
    group.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    group.add_argument("--num-virtual-stages-per-pipeline-rank", type=int, default=None)
    group.add_argument("--expert-model-parallel-size", type=int, default=1)
    group.add_argument("--expert-tensor-parallel-size", type=int, default=None)
    group = parser.add_argument_group("model and training")
    group.add_argument("--architecture", choices=["dense", "moma", "mot", "mot+moma"], default="dense")
    group.add_argument("--moma-experts-per-modality", type=int, nargs=2, default=[2, 2],
                       metavar=("TEXT", "IMAGE"))
    group.add_argument("--mod", action="store_true", help="Mixture-of-Depths on alternating layers")
    group.add_argument("--num-experts", type=int, default=None,
                       help="Megatron's own MoE MLP (dense architecture only)")
    group.add_argument("--train-iters", type=int, default=5)
    group.add_argument("--micro-batch-size", type=int, default=1)
    group.add_argument("--global-batch-size", type=int, default=4)
    group.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                       help="adam runs megatron-core's distributed optimizer; sgd plain DDP")
    group.add_argument("--lr", type=float, default=1e-2)
    group.add_argument("--seed", type=int, default=1234)
    group.add_argument("--json", default=None, help="write losses and grad norms to this file")
    return parser.parse_args()


def main():
    args = parse_args()
    dist.init_process_group(activate_platform())
    moma = None
    if "moma" in args.architecture:
        moma = MoMaOptions(experts_per_modality=tuple(args.moma_experts_per_modality))
    layout = ParallelLayout(
        tensor_parallel_size=args.tensor_model_parallel_size,
        sequence_parallel=args.sequence_parallel,
        pipeline_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_parallel_size=args.num_virtual_stages_per_pipeline_rank,
        expert_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
    )
    model = gpt_runs.TinyGPT(
        num_experts=args.num_experts,
        moma=moma,
        mot=MoTOptions() if "mot" in args.architecture else None,
        mod=MoDOptions() if args.mod else None,
    )
    spec = gpt_runs.TrainSpec(
        micro_batch_size=args.micro_batch_size,
        global_batch_size=args.global_batch_size,
        steps=args.train_iters,
        optimizer=args.optimizer,
        lr=args.lr,
        seed=args.seed,
    )
    result = gpt_runs.train(model, layout, spec)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (result.losses, result.grad_norms))
    if dist.get_rank() == 0:
        losses = next(losses for losses, _ in everyone if losses)
        grad_norms = everyone[0][1]
        architecture = args.architecture + ("+mod" if args.mod else "")
        print(f"{architecture} model, layout {layout.name} on {dist.get_world_size()} ranks "
              f"(data-parallel size {layout.data_parallel_size(dist.get_world_size())})")
        for step, (loss, grad_norm) in enumerate(zip(losses, grad_norms), start=1):
            print(f" iteration {step:4d}/{spec.steps} | lm loss {loss:.6f} | grad norm {grad_norm:.6f}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"layout": layout.name, "lm_loss": losses, "grad_norm": grad_norms}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
