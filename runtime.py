"""
Where a model runs: the device, the precision, the memory there is, and torch.compile.

None of this is the method (yonos.py) or a network (model.py, vae.py); the scripts ask it how to run them:
  resolve_device   --device auto|cpu|cuda|cuda:1|mps, checked, as one-line errors
  pick_dtype       --dtype auto: bf16 where the hardware computes it natively (CUDA, or a CPU with AVX512-BF16 /
                   AMX), fp32 elsewhere
  autocast         the matching torch.autocast context
  available_memory what this process may still allocate (RAM, or the GPU's free memory)
  compile_model    torch.compile with CUDA graphs for the static tile shapes of upscale.py
"""
import contextlib
import os
import resource

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """auto: CUDA when there is a GPU, else the CPU. A device this torch cannot use is a one-line ValueError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name!r} is not a device (cpu, cuda, cuda:1, mps, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this torch has no usable CUDA GPU (a CPU-only build, or no driver)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available here")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: only cpu, cuda and mps are supported")
    return device


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), where bf16 is faster than fp32; on
    others torch emulates it and it is slower."""
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """--dtype: fp32, bf16, fp16, or auto = bf16 on a CUDA GPU that has it and on a CPU with native bf16, else
    fp32. For sampling the model itself is cast (measured on the shipped x4, 2 cores: 1.3x faster than fp32 and
    the same PSNR to 0.01 dB; autocast was slower than fp32 there, its casts cost more than small convolutions)."""
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"--dtype must be auto, {', '.join(DTYPES)}; not {name!r}")
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16() else torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    """torch.autocast to `dtype` (a no-op context for fp32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def available_memory(device: torch.device | None = None) -> int:
    """Bytes this process may still allocate: the GPU's free memory on CUDA; else the smaller of the system's
    available memory (MemAvailable) and what the container's cgroup limit leaves."""
    if device is not None and device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    avail = None
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    for limit, usage in [("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")]:
        try:
            room = int(open(limit).read().strip()) - int(open(usage).read().strip())
            avail = room if avail is None else min(avail, room)
        except (OSError, ValueError):  # no such cgroup file, or "max"
            pass
    if avail is None:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 2 ** 40
    return avail


def current_rss() -> int:
    """The resident memory of this process now, in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss() -> int:
    """The most resident memory this process has used so far, in bytes: Linux's VmHWM, which starts afresh with
    the program (getrusage's ru_maxrss keeps the parent's peak across fork and exec); ru_maxrss elsewhere."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if os.uname().sysname == "Darwin" else peak * 1024


def compile_model(model, backend: str = "inductor", mode: str | None = "reduce-overhead") -> str | None:
    """Compiles a YonosSR's U-Net and its VAE's encode and decode with torch.compile for static shapes; on CUDA the
    default mode captures CUDA graphs, which removes the per-kernel launch cost that dominates one step.
    upscale.py then keeps every tile batch the same shape (model.compiled), so the graphs are reused across tiles
    and images. Returns a one-line note instead where it would not help (inductor on a CPU) or cannot run."""
    if backend == "inductor" and model.context.device.type != "cuda":
        return f"note: --compile speeds up CUDA GPUs (CUDA graphs); running eager on {model.context.device.type}"
    if not hasattr(torch, "compile"):
        return "note: this torch has no torch.compile; running eager"
    options = {"backend": backend, "dynamic": False} | ({"mode": mode} if backend == "inductor" else {})
    model.unet.forward = torch.compile(model.unet.forward, **options)
    model.vae.encode = torch.compile(model.vae.encode, **options)
    model.vae.decode = torch.compile(model.vae.decode, **options)
    model.compiled = True
    return None
