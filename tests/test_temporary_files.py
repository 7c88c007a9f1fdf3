"""No temporary folder outlives a run: `pretrain-moma` (trained and saved, stopped by a bad flag,
stopped by a NaN), `moma-upcycle` and `moma-convert` (exported, refused, imported) run one after
another in one process whose TMPDIR is an empty folder; it is empty again at the end."""

import json
import os
import subprocess
import sys

from megatron_moma.testing.trainer_runs import trainer_flags

WORKTREE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import json, sys
from megatron_moma.conversion import cli
from megatron_moma.training import pretrain_moma, upcycling
trained, bad_flag, nan, root = json.loads(sys.argv[1])
codes = [pretrain_moma.main(trained), pretrain_moma.main(bad_flag), pretrain_moma.main(nan),
         upcycling.main(["--load", root + "/ckpt", "--save", root + "/up",
                         "--moma-experts-per-modality", "2", "2"]),
         cli.main(["export-hf", "--load", root + "/ckpt", "--out", root + "/hf"]),
         cli.main(["export-hf", "--load", root + "/ckpt", "--out", root + "/hf2",
                   "--max-shard-size", "abc"]),
         cli.main(["import-hf", "--hf", root + "/hf", "--out", root + "/imported"])]
print("codes", json.dumps(codes))
"""


def test_no_temporary_folder_outlives_a_run(data_path, tmp_path):
    root, temporary = str(tmp_path), tmp_path / "tmpdir"
    temporary.mkdir()
    common = ["--global-batch-size", "2", "--architecture", "moma",
              "--moma-experts-per-modality", "1", "1"]
    trained = trainer_flags(data_path, root, "run", 2, *common, "--lr", "1e-3",
                            "--save", os.path.join(root, "ckpt"))
    bad_flag = trainer_flags(data_path, root, "bad", 2, *common, "--lr", "-1")
    nan = trainer_flags(data_path, root, "nan", 3, *common, "--optimizer", "sgd", "--lr", "1e20",
                        "--clip-grad", "0", "--save", os.path.join(root, "nan-ckpt"))
    completed = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps([trained, bad_flag, nan, root])],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, TMPDIR=str(temporary), PYTHONPATH=WORKTREE, OMP_NUM_THREADS="1"))
    assert completed.returncode == 0, completed.stdout + completed.stderr
    codes = json.loads(completed.stdout.split("codes ")[-1])
    assert codes == [0, 2, 3, 0, 0, 2, 0], completed.stdout + completed.stderr
    assert os.listdir(temporary) == []
