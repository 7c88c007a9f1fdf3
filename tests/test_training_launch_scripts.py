"""The Slurm scripts build a flag set that `pretrain_moma` accepts at their paper scale.

Each script runs with stand-in `scontrol` and `srun` commands on PATH: `srun` records the
command line instead of launching, and the flags after the module name are parsed and validated
for the job's world size (32 nodes x 8 GPUs), as the real ranks would.
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


def _fake_commands(directory):
    scripts = {"scontrol": "#!/bin/bash\necho node001\necho node002\n",
               "srun": '#!/bin/bash\nprintf "%q " "$@" > "$SRUN_RECORD"\n'}
    for name, body in scripts.items():
        path = os.path.join(directory, name)
        with open(path, "w") as script:
            script.write(body)
        os.chmod(path, 0o755)


@pytest.mark.parametrize("script, architecture", [
    ("pretrain_moma_1.4b_4t4i.sh", "moma"),
    ("pretrain_moma_mod_1.4b.sh", "moma+mod"),
    ("pretrain_mot_7b.sh", "mot"),
    ("pretrain_dense_1.4b.sh", "dense"),
])
def test_slurm_script_flags_are_valid_at_paper_scale(tmp_path, script, architecture):
    _fake_commands(str(tmp_path))
    record = tmp_path / "srun.txt"
    environment = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", SRUN_RECORD=str(record),
                       SLURM_SUBMIT_DIR=ROOT, SLURM_JOB_NODELIST="node[001-032]",
                       SLURM_NNODES="32", SLURM_JOB_ID="42", DATA_PATH="/data/chameleon_mix",
                       CKPT_ROOT=str(tmp_path / "ckpt"))
    subprocess.run(["bash", os.path.join(SLURM, script)], env=environment, check=True, timeout=60)
    command = shlex.split(record.read_text())
    assert command[:2] == ["--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert "--rdzv-endpoint" in command and command[command.index("--rdzv-endpoint") + 1] == "node001:29500"
    argv = command[command.index(MODULE) + 1:]
    args = parse_args(argv, world_size=32 * 8)
    chameleon = ModalityLayout.text_and_image(first_image_id=4, last_image_id=8195)
    assert transformer_config(args, chameleon).architecture == architecture
    assert args.save == args.load == str(tmp_path / "ckpt" / args.save.split("/")[-1])
    assert args.tensorboard_dir == os.path.join(args.save, "tensorboard")
    assert (args.seq_length, args.global_batch_size, args.lr, args.lr_warmup_iters) == (4096, 2048, 1e-4, 4000)
    assert args.min_lr == pytest.approx(0.01 * args.lr)
