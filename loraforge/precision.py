"""Which precision a run computes and stores in, decided once from what the hardware reports.

    auto on CUDA, compute capability ≥ 8.0 (A100, H100, RTX 30xx+) -> bf16 autocast, bf16 frozen base
    auto on CUDA below 8.0 (T4, V100: what free notebooks give)   -> fp16 autocast + GradScaler, fp16 frozen base
    auto on a CPU with native bf16 (AVX-512 BF16 or AMX)          -> bf16 autocast, bf16 frozen base
    auto on a CPU without it (AVX2: AMD Zen 2/3, most laptops)    -> fp32

On a CPU without native bf16 instructions, bf16 matmuls are emulated and run many times slower than fp32 (README,
"What runs where"), so the choice is not a matter of taste. Where the facts are unsure (an ARM CPU, AVX-512 without
its BF16 extension, or oneDNN capped with ONEDNN_MAX_CPU_ISA) a matmul probe of a few tens of milliseconds decides:
bf16 only where it runs clearly faster than fp32. Trainable weights (adapters) are fp32 master weights whatever is
chosen.

Every command (train, demo, eval, serve, forgetting, bench/) resolves `auto` through `choose()`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
import warnings
from dataclasses import dataclass

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ONEDNN_CACHES = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "128", "LRU_CACHE_CAPACITY": "128"}
"""Kernels oneDNN (torch's bf16 matmuls on a CPU) and ideep each keep, one per matmul shape: 1,024 by default, at
0.3-1.5 MB each. A command meets new shapes at every prompt length, padded width and batch size; its hot shapes (a
step's products) are far fewer. choose(), which every command runs before its model loads, sets both where the
environment does not: oneDNN and ideep read them once, at the first bf16 matmul of the process. A 576-wide Llama in
bf16: a server's bursts of distinct prompt lengths 884 -> 1,514 MB at 1,024 (rising), flat at ~890 at 128; 300
training steps of padded batches (2,976 kernels) 1,646 MB peak and rising at 1,024, 784 at 128, as fast (553 tokens/s
against 514); packed rows (whose attention shapes recur across steps) rebuild ~17 more kernels a step at 128 (~7 ms),
within noise there (1,473 and 1,359 tokens/s against 1,224 and 1,449; 712 MB peak against 1,195); eval over 2,000
rows of distinct lengths: 315 kernels either way, ~110 MB more kept at 1,024."""
PROBE_MIN_SPEEDUP = 1.3
"""bf16 is chosen by the probe only where its matmuls run this much faster than fp32's (native bf16 runs about
2x; emulated bf16 0.005-0.5x): at equal speed fp32 is the more accurate choice."""


@dataclass(frozen=True)
class Hardware:
    """The facts the rule reads. `detect()` fills them in; tests build them by hand."""

    device_type: str = "cpu"
    device_name: str = ""
    cuda_capability: tuple[int, int] | None = None
    cpu_capability: str = ""
    """The ISA torch's own CPU kernels dispatch to (torch.backends.cpu.get_cpu_capability()): AVX2, AVX512, ..."""
    cpu_bf16_instructions: bool | None = None
    """AVX-512 BF16 or AMX present (x86); None where torch cannot tell (ARM, other)."""
    onednn_bf16: bool = True
    """oneDNN (mkldnn) supports bf16 here at all (torch.ops.mkldnn._is_mkldnn_bf16_supported())."""
    onednn_isa_cap: str | None = None
    """ONEDNN_MAX_CPU_ISA from the environment: a cap on the instructions oneDNN uses."""


@dataclass(frozen=True)
class Precision:
    """What a run uses: the autocast dtype of matmuls (`compute`), the frozen base's storage dtype (`storage`),
    whether a gradient scaler guards fp16 against overflow, and the reason in words."""

    compute: str
    storage: str
    reason: str

    @property
    def needs_scaler(self) -> bool:
        """Whether training scales its loss (torch.amp.GradScaler): where gradients flow back in fp16, whose small
        values underflow. Under fp16 autocast; and an fp16 base computing in fp32 (no autocast), whose activations
        and their gradients stay fp16 throughout (a tiny Llama's LoRA gradients: 0.21 off fp32's at 16k tokens a
        step and 0.92 at 130k, against 0.08 with the loss scaled). Under bf16 autocast they are not fp16."""
        return self.compute == "fp16" or (self.compute == "fp32" and self.storage == "fp16")

    @property
    def compute_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.compute]

    def autocast(self, device_type: str):
        """The autocast context of this precision (a no-op for fp32)."""
        return autocast(self.compute, device_type)

    def line(self, training: bool = True) -> str:
        """The first line of train and demo: 'precision fp32: this CPU has no native bf16 (AVX2)'. `training`
        False (eval, generate, serve): no loss is scaled, so fp16 does not say so."""
        storage = "" if self.storage == self.compute else f", base stored in {self.storage}"
        scaler = " + loss scaling" if self.needs_scaler and training else ""
        return f"precision {self.compute}{scaler}{storage}: {self.reason}"


def autocast(compute: str, device_type: str):
    """Autocast matmuls to `compute` (fp32, bf16, fp16) on `device_type`; fp32 is a no-op."""
    if compute == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=TORCH_DTYPES[compute])


def detect(device: torch.device | str = "cpu") -> Hardware:
    """The hardware facts of `device` as torch reports them."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return Hardware("cuda", torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index)))
    if device.type != "cpu":
        return Hardware(device.type, device.type)
    bf16_instructions = None
    if torch.cpu._is_avx2_supported() or torch.cpu._is_avx512_supported():  # x86: cpuinfo knows the extensions
        bf16_instructions = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return Hardware("cpu", "CPU", None, torch.backends.cpu.get_cpu_capability(), bf16_instructions,
                    bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()), os.environ.get("ONEDNN_MAX_CPU_ISA"))


@functools.lru_cache(maxsize=None)
def probe_bf16_speedup(n: int = 256, seconds: float = 0.05) -> float:
    """bf16 matmul rate / fp32 matmul rate on this CPU, from an n×n matmul timed for about `seconds` each
    (emulated bf16 keeps the bf16 side to tens of milliseconds). Cached for the process. Its operands come from a
    generator of its own: torch's global one is the user's (soak: choosing a precision moved the user's draws)."""
    rates, g = {}, torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(n, n, generator=g).to(dtype), torch.randn(n, n, generator=g).to(dtype)
        a @ b  # warm-up: oneDNN picks and JITs its kernel
        count, start = 0, time.perf_counter()
        while True:
            a @ b
            count += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
        rates[dtype] = count / elapsed
    return rates[torch.bfloat16] / rates[torch.float32]


def native_cpu_bf16(hw: Hardware, probe=probe_bf16_speedup) -> tuple[bool, str]:
    """(has native bf16, why) for a CPU: from the reported facts, the probe where they are unsure."""
    isa = hw.cpu_capability or "unknown ISA"
    cap = f", ONEDNN_MAX_CPU_ISA={hw.onednn_isa_cap}" if hw.onednn_isa_cap else ""
    # oneDNN without bf16, x86 without AVX-512 BF16/AMX, or torch dispatching below AVX-512 (ATEN_CPU_CAPABILITY)
    if not hw.onednn_bf16 or hw.cpu_bf16_instructions is False or (
            hw.cpu_bf16_instructions and not isa.startswith("AVX512")):
        # capped, the CPU may well have it: the cap is the reason (soak: "this CPU has no native bf16 (AVX512)" on
        # a CPU with AVX-512 BF16 under ONEDNN_MAX_CPU_ISA=AVX2)
        return False, f"{'bf16 is not native here' if cap else 'this CPU has no native bf16'} ({isa}{cap})"
    if hw.cpu_bf16_instructions and not hw.onednn_isa_cap:
        return True, f"this CPU has native bf16 ({isa} with AVX-512 BF16/AMX)"
    speedup = probe()  # ARM, or a cap on oneDNN's instructions: measure
    if speedup >= PROBE_MIN_SPEEDUP:
        return True, f"bf16 matmuls ran {speedup:.1f}x fp32's on this CPU ({isa}{cap})"
    return False, f"bf16 matmuls ran {speedup:.2f}x fp32's on this CPU ({isa}{cap}): no native bf16"


def auto_precision(hw: Hardware, probe=probe_bf16_speedup) -> tuple[str, str]:
    """(compute precision, reason) that `auto` means on `hw`."""
    if hw.device_type == "cuda":
        major, minor = hw.cuda_capability
        if major >= 8:
            return "bf16", f"{hw.device_name} (compute capability {major}.{minor}) has bf16"
        return "fp16", f"{hw.device_name} (compute capability {major}.{minor}) has no bf16: fp16"
    if hw.device_type != "cpu":
        return "fp32", f"{hw.device_type}: fp32"
    native, why = native_cpu_bf16(hw, probe)
    return ("bf16" if native else "fp32"), why


def bound_kernel_caches() -> None:
    """ONEDNN_CACHES set in this process's environment, where it does not give them already."""
    for name, value in ONEDNN_CACHES.items():
        os.environ.setdefault(name, value)


def choose(precision: str = "auto", dtype: str = "auto", hw: Hardware | None = None,
           device: torch.device | str = "cpu", probe=probe_bf16_speedup, warn: bool = True,
           names: tuple[str, str] = ("training.precision", "model.dtype"), training: bool = True) -> Precision:
    """The rule: `precision` (training.precision: auto, fp32, bf16, fp16) and `dtype` (model.dtype, the frozen
    base's storage: auto, fp32, bf16, fp16) resolved on `hw` (detected from `device` when not given).

    auto storage follows the compute precision. An explicit choice is kept; where it is slow on this hardware
    (bf16 or fp16 on a CPU without native bf16, bf16 on a GPU without it) a warning names the cost and the fix.
    `names`: the two settings as the user gave them, config fields (the default) or a command's flags
    (("--precision", "--dtype")); errors, warnings and the reason use them. `training` False (eval, generate,
    serve): the warnings leave out loss scaling, which only a training run needs."""
    bound_kernel_caches()  # before any bf16 matmul: the probe's, the command's
    for name, value in zip(names, (precision, dtype)):
        if value not in ("auto", *PRECISIONS):
            raise ValueError(f"{name}: {value!r} is not one of ['auto', 'fp32', 'bf16', 'fp16']")
    hw = hw or detect(device)
    best, why = auto_precision(hw, probe)
    compute = best if precision == "auto" else precision
    if precision != "auto":
        why = f"{_setting(names[0], precision)} as asked"
        if warn and precision != best and precision != "fp32":
            _warn_slow(precision, best, hw, probe, names[0], training)
    storage = compute if dtype == "auto" else dtype
    if dtype != "auto" and warn and dtype != best and dtype != "fp32" and hw.device_type == "cpu":
        _warn_slow(dtype, best, hw, probe, names[1], training, resolved=compute,
                   via="" if precision == "auto" else _setting(names[0], precision))
    return Precision(compute, storage, why)


FP16_MAX = float(torch.finfo(torch.float16).max)
"""65504: fp16's largest value; a weight or activation past it becomes inf."""


def overflow_fix(chosen: Precision, names: tuple[str, str] = ("--precision", "--dtype")) -> str:
    """What to change where a forward in `chosen` gave inf or NaN: computed or stored in fp16, the usual cause is
    fp16's range (a forward fine in fp32 or bf16 overflows it); in bf16 or fp32 the model or adapter itself
    overflows. `names`: the two settings as the user gives them (flags, or config fields)."""
    compute, dtype = names
    if "fp16" not in (chosen.compute, chosen.storage):
        return (f"in {chosen.compute} too, so the model or the adapter itself overflows (an adapter's huge "
                f"lora_alpha or weights?)")
    fix = (f"{_setting(compute, 'fp32')} (or bf16 where the hardware has it)" if chosen.compute == "fp16"
           else f"{_setting(dtype, 'fp32')} (or bf16)")
    also = f", with {_setting(dtype, 'auto')} or fp32" if chosen.compute == chosen.storage == "fp16" else ""
    return f"fp16 holds values only up to ±{FP16_MAX:g}, which this forward passed; use {fix}{also}"


def _setting(name: str, value: str) -> str:
    """A setting as the user writes it: `--precision bf16` for a flag, `training.precision=bf16` for a field."""
    return f"{name} {value}" if name.startswith("--") else f"{name}={value}"


def _warn_slow(asked: str, best: str, hw: Hardware, probe, name: str, training: bool = True,
               resolved: str | None = None, via: str = "") -> None:
    """`training` False (eval, generate, serve): no loss is scaled, so the warnings do not speak of it.

    `resolved`: what `auto` means for this setting (None: `best`, the hardware's choice); `via`: the other setting
    that decides it, as the user gave it (the dtype's auto follows an explicit --precision). The fix names what auto
    would give with that setting: "Use --dtype auto (bf16 on this machine)" under --precision fp32, where auto is
    fp32, sent users to the wrong dtype; where auto would be slow too, it names the hardware's choice instead."""
    given, auto = _setting(name, asked), _setting(name, "auto")
    resolved = resolved or best
    if hw.device_type == "cuda":
        if asked == "bf16":
            warnings.warn(f"{given}: {hw.device_name} has no bf16 (compute capability "
                          f"{'.'.join(map(str, hw.cuda_capability))}); it runs emulated and slowly. "
                          f"Use {auto} (fp16{' with loss scaling' if training else ''} here)", stacklevel=3)
        return
    if asked == "fp16":
        scaling = " and need loss scaling" if training else ""
        fix = f"{auto} ({resolved} {f'with {via}' if via else 'on this machine'})"
        warnings.warn(f"{given} on a CPU: fp16 matmuls are emulated on most CPUs (slower than fp32){scaling}. "
                      f"Use {fix if resolved in (best, 'fp32') else _best_instead(name, auto, best, resolved, via)}",
                      stacklevel=3)
        return
    _, why = native_cpu_bf16(hw, probe)
    if not via:
        fix = f"{auto} (or fp32) on this machine"
    elif resolved in (best, "fp32"):
        fix = f"{auto} ({resolved} with {via})"
    else:
        fix = _best_instead(name, auto, best, resolved, via)
    warnings.warn(f"{given} on a CPU without native {asked} ({why}): its matmuls are emulated, typically "
                  f"50-200x slower than fp32. Use {fix}", stacklevel=3)


def _best_instead(name: str, auto: str, best: str, resolved: str, via: str) -> str:
    """The fix where this setting's auto follows another one (`via`) to a precision as slow as the one asked: the
    hardware's own choice, `best`."""
    return f"{_setting(name, best)} on this machine ({auto} follows {via}: {resolved}, emulated here too)"
