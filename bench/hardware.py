"""The machine a benchmark ran on, for the header of its table and its JSON: which CPU (model, the ISA torch's
kernels dispatch to, cores) or GPU, and the precision the rule (loraforge.precision.choose) picks there and why.
A number without the hardware it was measured on cannot be compared with anything."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from loraforge.precision import Precision, choose


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("AMD EPYC 7B13"); "" where there is none (macOS, Windows)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")), "")


def auto_precision(device: str = "cpu") -> Precision:
    """What `auto` means on `device`: the benches resolve it once, here."""
    return choose("auto", "auto", device=device, warn=False)


def describe(device: str = "cpu") -> dict:
    """The facts for a JSON record: device, CPU model, torch CPU capability, cores, GPU, the auto precision."""
    auto = auto_precision(device)
    info = {"device": device, "cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "auto_precision": auto.compute, "precision_line": auto.line()}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return info


def header(info: dict) -> str:
    """Two lines for a table's header: the hardware, then `auto: precision fp32: this CPU has no native bf16 (AVX2)`."""
    cpu = f"CPU {info['cpu'] or 'unknown model'} ({info['cpu_capability']}, {info['cores']} cores, " \
          f"{info['torch_threads']} torch threads)"
    gpu = f"GPU {info['gpu']} (compute capability {info['cuda_capability']}), " if "gpu" in info else ""
    return f"{gpu}{cpu}\nauto: {info['precision_line']}"
