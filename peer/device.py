"""The device a peer computes on: whether it exists, its default precision, its free memory, and its name.

Everything device-specific that is not model work lives here, so the rest of the peer treats
`cpu` and `cuda:N` alike.
"""
from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import psutil
import torch

from swarm.dtypes import DTypeName
from swarm.errors import DeviceError

# The precision a peer computes in when --dtype is not given. CPU: float32 (issue 24 measures the
# 16-bit options). CUDA: float16, which keeps 10 mantissa bits (bfloat16 keeps 7, and diverged from
# float32's tokens within a few tokens on the CPU) and runs on every GPU's tensor cores. Not yet
# measured on a GPU: benchmarks/gpu_check.py measures both 16-bit options against transformers.
DEFAULT_DTYPES: dict[str, DTypeName] = {"cpu": "float32", "cuda": "float16"}


def check_device(name: str) -> torch.device:
    """The device named by --device, or a DeviceError that says what this machine has."""
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(f"--device {name}: this machine has no CUDA device that torch can use "
                             f"(torch {torch.__version__}, CUDA {torch.version.cuda or 'not built in'})")
        index = 0 if device.index is None else device.index
        if index >= count:
            raise DeviceError(f"--device {name}: this machine has {count} CUDA devices, cuda:0 to cuda:{count - 1}")
        device = torch.device("cuda", index)
    return device


def default_dtype(device: torch.device) -> DTypeName:
    return DEFAULT_DTYPES[device.type]


def free_memory(device: torch.device) -> int:
    """Bytes a peer may plan with: free GPU memory, or the RAM available to new processes."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return int(psutil.virtual_memory().available)


def hardware(device: torch.device) -> str:
    """What a measured speed depends on besides the settings: the processor and torch's kernels.

    Part of the throughput cache's key, so a machine that moved to another CPU or GPU, a new GPU
    driver or a torch upgrade measures again instead of announcing a stale figure.
    """
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        processor = (f"{properties.name} (compute {properties.major}.{properties.minor}, driver {_driver_version()}, "
                     f"CUDA {torch.version.cuda})")
    else:
        cpuinfo = Path("/proc/cpuinfo")
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")] if cpuinfo.is_file() else []
        processor = names[0] if names else platform.processor() or platform.machine()
    return f"{processor}:torch {torch.__version__}"


def _driver_version() -> str:
    """The NVIDIA driver's version, from nvidia-smi (torch does not tell it)."""
    if shutil.which("nvidia-smi") is None:
        return "unknown"
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return result.stdout.splitlines()[0].strip() if result.returncode == 0 and result.stdout.strip() else "unknown"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work: kernel launches return before the kernels have run."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
