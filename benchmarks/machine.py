"""What machine a benchmark ran on, for its JSON and for docs/results.md."""

import os
import platform
from typing import Dict, List

import torch


def cpu_model() -> str:
    """The CPU's model name as lscpu shows it (from /proc/cpuinfo), else platform's guess."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> List[float]:
    """The machine's 1, 5 and 15 minute load averages: how busy it was around a measurement."""
    return [round(load, 2) for load in os.getloadavg()]


def describe(device: str = "cpu") -> Dict[str, object]:
    """CPU model, cores, torch threads, library versions and, on CUDA, the GPU's name."""
    from importlib.metadata import version

    machine = {
        "cpu": cpu_model(),
        "load_average_at_start": load_average(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "megatron_core": version("megatron-core"),
    }
    if device == "cuda":
        machine["gpu"] = torch.cuda.get_device_name()
    return machine
