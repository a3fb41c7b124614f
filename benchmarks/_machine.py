"""Names the machine a benchmark ran on, for the results files."""
import os
import platform
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def describe() -> str:
    """CPU model, cores, torch threads, GPU (if any) and torch version."""
    import torch

    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return (f"{cpu_name()}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads){gpu}, "
            f"torch {torch.__version__}")
