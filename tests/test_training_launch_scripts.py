"""The Slurm scripts build a flag set that `pretrain_moma` accepts at their paper scale.

Each script runs with stand-in `scontrol` and `srun` commands on PATH: `scontrol` answers
`show hostnames` and `show node` as Slurm does (each node's NodeAddr differs from its name), `srun`
records the command line instead of launching, and the flags after the module name are parsed and
validated for the job's world size (32 nodes x 8 GPUs), as the real ranks would. The scripts run
under a real Slurm in tests/test_slurm_launch.py.
"""

import os
import shlex
import subprocess

import pytest

from megatron_moma.modality import ModalityLayout
from megatron_moma.training.arguments import parse_args
from megatron_moma.training.configs import transformer_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM = os.path.join(ROOT, "examples", "slurm")
MODULE = "megatron_moma.training.pretrain_moma"

SCONTROL = """#!/bin/bash
case "$1 $2" in
    "show hostnames") echo node001; echo node002 ;;
    "show node") echo "NodeName=$3 Arch=x86_64 CoresPerSocket=32"
                 echo "   NodeAddr=10.1.0.${3: -1} NodeHostName=$3 Version=22.05.8" ;;
    *) exit 1 ;;
esac
"""


def _fake_commands(directory):
    scripts = {"scontrol": SCONTROL, "srun": '#!/bin/bash\nprintf "%q " "$@" > "$SRUN_RECORD"\n'}
    for name, body in scripts.items():
        path = os.path.join(directory, name)
        with open(path, "w") as script:
            script.write(body)
        os.chmod(path, 0o755)


def _srun_command(tmp_path, script, nodes, **variables):
    """The srun command line `script` runs as a job of `nodes` nodes, as a list of words."""
    _fake_commands(str(tmp_path))
    record = tmp_path / "srun.txt"
    inherited = {name: value for name, value in os.environ.items()
                 if not name.startswith(("SLURM_", "MASTER_"))}
    environment = dict(inherited, PATH=f"{tmp_path}:{os.environ['PATH']}", SRUN_RECORD=str(record),
                       SLURM_SUBMIT_DIR=ROOT, SLURM_JOB_NODELIST=f"node[001-{nodes:03d}]",
                       SLURM_NNODES=str(nodes), SLURM_JOB_ID="42", CKPT_ROOT=str(tmp_path / "ckpt"),
                       **variables)
    subprocess.run(["bash", os.path.join(SLURM, script)], env=environment, check=True, timeout=60)
    return shlex.split(record.read_text())


def _value(command, flag):
    return command[command.index(flag) + 1]


@pytest.mark.parametrize("script, architecture", [
    ("pretrain_moma_1.4b_4t4i.sh", "moma"),
    ("pretrain_moma_mod_1.4b.sh", "moma+mod"),
    ("pretrain_mot_7b.sh", "mot"),
    ("pretrain_dense_1.4b.sh", "dense"),
])
def test_slurm_script_flags_are_valid_at_paper_scale(tmp_path, script, architecture):
    command = _srun_command(tmp_path, script, 32, DATA_PATH="/data/chameleon_mix")
    assert command[:2] == ["--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert _value(command, "--rdzv-endpoint") == "10.1.0.1:29500"  # node001's NodeAddr
    argv = command[command.index(MODULE) + 1:]
    args = parse_args(argv, world_size=32 * 8)
    chameleon = ModalityLayout.text_and_image(first_image_id=4, last_image_id=8195)
    assert transformer_config(args, chameleon).architecture == architecture
    assert args.save == args.load == str(tmp_path / "ckpt" / args.save.split("/")[-1])
    assert args.tensorboard_dir == os.path.join(args.save, "tensorboard")
    assert (args.seq_length, args.global_batch_size, args.lr, args.lr_warmup_iters) == (4096, 2048, 1e-4, 4000)
    assert args.min_lr == pytest.approx(0.01 * args.lr)


def test_slurm_tiny_cpu_script_honours_master_addr_port_and_overrides(tmp_path):
    command = _srun_command(tmp_path, "pretrain_tiny_cpu.sh", 2, DATA_PATH="/data/digits",
                            MASTER_ADDR="head.cluster", MASTER_PORT="31234", LOG_INTERVAL="5",
                            EXIT_DURATION_IN_MINS="2.5", EXTRA_ARGS="--exit-interval 7 --seed 3")
    assert _value(command, "--rdzv-endpoint") == "head.cluster:31234"
    assert (_value(command, "--nnodes"), _value(command, "--nproc-per-node")) == ("2", "1")
    args = parse_args(command[command.index(MODULE) + 1:], world_size=2)
    assert (args.device, args.expert_model_parallel_size, args.log_interval) == ("cpu", 2, 5)
    assert (args.exit_duration_in_mins, args.exit_interval, args.seed) == (2.5, 7, 3)
    assert args.exit_signal_handler and args.save == args.load == str(tmp_path / "ckpt" / "moma_tiny_cpu")
