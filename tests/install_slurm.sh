#!/bin/bash
# Installs Debian's Slurm (slurmctld, slurmd, client commands) and munge for the Slurm tests
# (tests/test_slurm_*.py). Idempotent: does nothing when the commands are already there; runs
# `apt-get update` only when the package lists do not know the packages. Needs root and apt-get;
# exits 1 with the reason otherwise (the tests then skip, naming it).
set -euo pipefail

commands=(slurmctld slurmd sbatch srun scontrol sinfo munged mungekey)
missing=()
for command in "${commands[@]}"; do
    command -v "$command" >/dev/null 2>&1 || missing+=("$command")
done
if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install_slurm.sh: ${missing[*]} missing and not root: cannot apt-get install slurm-wlm munge" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_slurm.sh: ${missing[*]} missing and no apt-get: install slurm-wlm and munge by hand" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
if ! apt-cache show slurm-wlm munge >/dev/null 2>&1; then
    apt-get update -qq
fi
# The packages' own services are not started: the tests run their daemons on a private config.
apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
