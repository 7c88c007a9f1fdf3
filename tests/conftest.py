"""Shared test setup.

megatron-core is imported here, once, in the pytest process: the multi-rank tests fork their
ranks from it (megatron_moma.testing.multiprocess), so no rank pays the ~8 s import again.
"""

import pytest
import torch

import megatron.core  # noqa: F401  (imported before forking, see above)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def data_path(tmp_path_factory):
    """The digits corpus (400 images), preprocessed once per session: the dataset prefix."""
    from megatron_moma.testing.trainer_runs import digits_dataset

    return digits_dataset(str(tmp_path_factory.mktemp("digits")))


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A two-node Slurm cluster on this machine (tests/slurm_cluster.py), shared by the Slurm
    tests; skipped, with the reason, where slurm-wlm and munge are missing and cannot be
    installed. Every daemon it started is stopped, by PID, when the session ends."""
    from slurm_cluster import SlurmCluster, install_or_reason

    reason = install_or_reason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster.start()
    finally:
        cluster.stop()
