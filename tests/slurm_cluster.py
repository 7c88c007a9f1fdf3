"""A two-node Slurm cluster on this machine, for the Slurm tests (tests/test_slurm_*.py).

`SlurmCluster(root).start()` writes a munge key and a `slurm.conf` under `root` (every path in it
absolute and inside `root`, every port free when chosen), starts `munged`, one `slurmctld` and one
`slurmd -N <node>` per node (Debian builds Slurm with several slurmd per host: the nodes share
127.0.0.1 and differ by port), and waits until `sinfo` shows every node idle. `stop()` cancels
the cluster's jobs, stops the daemons it started, by PID, and kills any process left that carries
the cluster's `SLURM_CONF` in its environment (job steps, slurmstepd). Client commands run through
`command()`, which points them at the cluster's config.
"""

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional

INSTALL_SCRIPT = Path(__file__).resolve().parent / "install_slurm.sh"
COMMANDS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo",
            "squeue", "scancel")
KILL_WAIT = 30
"""Seconds Slurm gives a job between SIGTERM and SIGKILL (slurm.conf KillWait; its default)."""


def missing_commands() -> List[str]:
    return [name for name in COMMANDS if shutil.which(name) is None]


def install_or_reason(timeout: float = 600) -> Optional[str]:
    """Install slurm-wlm and munge when missing (tests/install_slurm.sh); None when the commands
    are there, else why they cannot be (the Slurm tests' skip reason)."""
    if not missing_commands():
        return None
    try:
        completed = subprocess.run(["/bin/bash", str(INSTALL_SCRIPT)], capture_output=True,
                                   text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"{INSTALL_SCRIPT.name} did not finish in {timeout:.0f} s"
    missing = missing_commands()
    if completed.returncode != 0:
        return f"Slurm is not installed: {(completed.stderr or completed.stdout).strip()[-500:]}"
    if missing:
        return f"{INSTALL_SCRIPT.name} ran, but {', '.join(missing)} are not on PATH"
    return None


def _die_with_parent() -> None:
    """In the daemon before exec: SIGKILL it if the test process dies without stopping it."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def free_ports(count: int) -> List[int]:
    """`count` distinct TCP ports that were free on 127.0.0.1 when asked."""
    sockets = []
    try:
        for _ in range(count):
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
            sockets.append(listener)
        return [listener.getsockname()[1] for listener in sockets]
    finally:
        for listener in sockets:
            listener.close()


class SlurmCluster:
    """munged + slurmctld + one slurmd per node, all under `root`; see the module docstring."""

    def __init__(self, root: Path, nodes: Iterable[str] = ("n1", "n2"), cpus_per_node: int = 1):
        self.root = Path(root).resolve()
        self.nodes = list(nodes)
        self.cpus_per_node = cpus_per_node
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket.2"
        self.logs = self.root / "log"
        self.daemons: Dict[str, subprocess.Popen] = {}

    # -- configuration ----------------------------------------------------------------------

    def _write_config(self) -> None:
        for folder in ("munge", "log", "state", "spool"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        controller_port, *node_ports = free_ports(1 + len(self.nodes))
        host = socket.gethostname().split(".")[0]
        root = self.root
        lines = [
            "ClusterName=momatest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={controller_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire also delays the restart of a requeued job (default 120 s).
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            f"StateSaveLocation={root}/state",
            f"SlurmdSpoolDir={root}/spool/%n",
            f"SlurmctldPidFile={root}/slurmctld.pid",
            f"SlurmdPidFile={root}/slurmd-%n.pid",
            f"SlurmctldLogFile={self.logs}/slurmctld.log",
            f"SlurmdLogFile={self.logs}/slurmd-%n.log",
            f"PlugStackConfig={root}/plugstack.conf",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SchedulerType=sched/builtin",
            # Test pending jobs every second, not every 60 s: a requeued job becomes eligible
            # when its BeginTime passes, an event that does not wake the scheduler by itself.
            "SchedulerParameters=sched_interval=1",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SlurmdParameters=config_overrides",
            "MpiDefault=none",
            "ReturnToService=2",
            f"KillWait={KILL_WAIT}",
            "MinJobAge=300",
            "JobRequeue=1",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
        ]
        for node, port in zip(self.nodes, node_ports):
            lines.append(f"NodeName={node} NodeAddr=127.0.0.1 NodeHostname={host} Port={port} "
                         f"CPUs={self.cpus_per_node} State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES "
                     "MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")
        (root / "plugstack.conf").write_text("")

    def environment(self, **extra: str) -> Dict[str, str]:
        """os.environ pointed at this cluster (client commands and submitted jobs inherit it),
        without the SLURM_/SBATCH_/SRUN_ variables of a Slurm job the tests may run inside."""
        inherited = {name: value for name, value in os.environ.items()
                     if not name.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        return {**inherited, "SLURM_CONF": str(self.conf), **extra}

    # -- daemons ----------------------------------------------------------------------------

    def _start(self, name: str, command: List[str]) -> None:
        log = open(self.logs / f"{name}.out", "w")
        self.daemons[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, env=self.environment(),
                                              cwd=self.root, start_new_session=True,
                                              preexec_fn=_die_with_parent)
        log.close()

    def _check_alive(self) -> None:
        for name, process in self.daemons.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with code {process.returncode}:\n"
                                   + self.logs_tail())

    def start(self, timeout: float = 120) -> "SlurmCluster":
        """Write the config, start the daemons, return once every node is idle (RuntimeError,
        with the daemons' logs, if that takes more than `timeout` seconds)."""
        self._write_config()
        key = self.root / "munge" / "munge.key"
        subprocess.run(["mungekey", "--create", "--keyfile", str(key)], check=True, timeout=60,
                       capture_output=True)
        os.chmod(key, 0o600)
        self._start("munged", ["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--pid-file={self.root}/munge/munged.pid",
                               f"--seed-file={self.root}/munge/munged.seed",
                               f"--log-file={self.logs}/munged.log"])
        self._wait(lambda: self.munge_socket.exists(), timeout, "munged's socket")
        self._start("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        for node in self.nodes:
            self._start(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
        self._wait(self._all_idle, timeout, f"sinfo to show {', '.join(self.nodes)} idle")
        return self

    def _all_idle(self) -> bool:
        completed = self.command(["sinfo", "--noheader", "--Node", "--format=%N %t"], check=False,
                                 timeout=30)
        states = dict(line.split() for line in completed.stdout.splitlines() if line.strip())
        return all(states.get(node) == "idle" for node in self.nodes)

    def _wait(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}:\n"
                                   f"{self.logs_tail()}")
            time.sleep(0.5)

    def stop(self, timeout: float = 60) -> None:
        """Cancel every job, stop the daemons by PID, kill what is left of the jobs; raises if
        any process of the cluster survives."""
        if "slurmctld" in self.daemons and self.daemons["slurmctld"].poll() is None:
            jobs = [str(job) for job in self.jobs()]
            if jobs:
                self.command(["scancel", "--full", *jobs], check=False, timeout=30)
                self._wait_quiet(lambda: not self.jobs(), timeout)
        for name in reversed(list(self.daemons)):
            process = self.daemons[name]
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for name, process in self.daemons.items():
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=timeout)
        for pid in self.leftover_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._wait_quiet(lambda: not self.leftover_pids(), timeout)
        survivors = self.leftover_pids()
        if survivors:
            raise RuntimeError(f"processes of the Slurm cluster in {self.root} survived: {survivors}")

    def _wait_quiet(self, condition, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.5)

    def leftover_pids(self) -> List[int]:
        """PIDs of the live processes whose environment holds this cluster's SLURM_CONF (its
        daemons, their slurmstepd, and the jobs' processes, which inherit it from sbatch)."""
        marker = f"SLURM_CONF={self.conf}".encode()
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes()
                status = Path(f"/proc/{entry}/stat").read_text()
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            if status.split(")")[-1].split()[0] == "Z":
                continue
            if marker in environ.split(b"\0"):
                found.append(int(entry))
        return found

    # -- clients ----------------------------------------------------------------------------

    def command(self, argv: List[str], check: bool = True, timeout: float = 60,
                env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None
                ) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster; its CompletedProcess (text)."""
        completed = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                   env=env or self.environment(), cwd=cwd)
        if check and completed.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited with {completed.returncode}: "
                               f"{completed.stdout}{completed.stderr}")
        return completed

    def jobs(self) -> Dict[int, str]:
        """{job id: state} of the jobs squeue lists (pending, running, completing...)."""
        completed = self.command(["squeue", "--noheader", "--format=%i %T"], check=False, timeout=30)
        return {int(job): state for job, state in
                (line.split() for line in completed.stdout.splitlines() if line.strip())}

    def submit(self, argv: List[str], env: Dict[str, str], cwd: str) -> int:
        """`sbatch --parsable argv`; the job id."""
        completed = self.command(["sbatch", "--parsable", *argv], env=env, cwd=cwd)
        return int(completed.stdout.strip().split(";")[0])

    def job_fields(self, job: int) -> Dict[str, str]:
        """`scontrol show job` as {field: value} (JobState, Restarts, ExitCode, ...)."""
        completed = self.command(["scontrol", "show", "job", "--oneliner", str(job)], timeout=30)
        return dict(re.findall(r"(\w+)=(\S*)", completed.stdout))

    def step_fields(self, job: int, step: int = 0) -> Dict[str, str]:
        """`scontrol show step` of a running step as {field: value} (NodeList, Tasks, Name...);
        empty while the step does not exist."""
        completed = self.command(["scontrol", "show", "step", "--oneliner", f"{job}.{step}"],
                                 check=False, timeout=30)
        return dict(re.findall(r"(\w+)=(\S*)", completed.stdout)) if completed.returncode == 0 else {}

    def wait_for_job(self, job: int, states: Iterable[str], timeout: float) -> Dict[str, str]:
        """Poll until the job's state is one of `states`; its fields (RuntimeError on timeout,
        with the daemons' logs)."""
        states = set(states)
        deadline = time.monotonic() + timeout
        while True:
            fields = self.job_fields(job)
            if fields.get("JobState") in states:
                return fields
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"job {job} is {fields.get('JobState')} after {timeout:.0f} s, "
                                   f"not one of {sorted(states)}:\n{self.logs_tail()}")
            time.sleep(1)

    def logs_tail(self, lines: int = 15) -> str:
        """The last lines of every daemon log, for error messages."""
        parts = []
        for log in sorted(self.logs.glob("*")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name}\n" + "\n".join(tail))
        return "\n".join(parts)
