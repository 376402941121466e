"""Process-wide runtime settings applied by the command line (never on import).

glibc's allocator returns large blocks (network activations) to the kernel after every forward pass and maps
them again on the next, and the page faults cost 18-30% of CPU inference time on the project's machines.
:func:`tune_allocator` keeps freed memory in the process instead — the runtime equivalent of
``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...``. It is a no-op where the C
library is not glibc. Library users can call it themselves.

It also holds the one resolver of device and mixed precision used by training, validation and inference
(:func:`resolve_device`, :func:`resolve_precision`), with one vocabulary (:data:`PRECISIONS`).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import functools

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


@functools.lru_cache(maxsize=1)
def tune_allocator() -> bool:
    """Keep freed memory for reuse instead of unmapping it (glibc only). Returns whether it was applied."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok_mmap = mallopt(_M_MMAP_MAX, 0) == 1
    ok_trim = mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    return ok_mmap and ok_trim


# ---------------------------------------------------------------------------------------------- device, precision
PRECISIONS = ("auto", "off", "bf16", "fp16")  # the one vocabulary of training.amp, inference amp and --amp


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 matrix units (AMX-BF16 or AVX512-BF16); read from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return bool({"amx_bf16", "avx512_bf16"} & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return False


def resolve_device(name: str, local_rank: int = 0) -> "torch.device":
    """``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda`` (this process's GPU under torchrun) or ``cuda:N``."""
    import torch

    from medseg.errors import MedsegError

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise MedsegError(f"device '{name}' is not valid; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MedsegError(f"device '{name}': CUDA is not available on this machine; use auto or cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        count = torch.cuda.device_count()
        if device.index >= count:
            whose = f"this process (torchrun local rank {local_rank}) would use {device}" if name == "cuda" else f"'{name}'"
            raise MedsegError(f"device: {whose}, but this machine has {count} CUDA device(s), numbered from 0; start at "
                              f"most {count} process(es) per machine (torchrun --nproc_per_node {count}), or give "
                              "training.device cpu")
    elif device.type != "cpu":
        raise MedsegError(f"device '{name}' is not supported; use auto, cpu, cuda or cuda:N")
    return device


@dataclasses.dataclass(frozen=True)
class Precision:
    """Resolved mixed precision on one device: ``dtype`` None means float32; ``scaler``: fp16 needs a GradScaler."""

    device: "torch.device"
    dtype: "torch.dtype | None"

    @property
    def scaler(self) -> bool:
        import torch

        return self.dtype == torch.float16

    @property
    def name(self) -> str:
        return {None: "fp32"}.get(self.dtype, str(self.dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float16", "fp16"))

    def autocast(self):
        """The autocast context of this precision (a null context for fp32)."""
        import torch

        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None else contextlib.nullcontext()


def resolve_precision(amp: str, device: "torch.device") -> Precision:
    """``amp`` (one of :data:`PRECISIONS`) on ``device``; the same rule for training, validation and inference.

    ``auto`` takes the fast precision the hardware runs natively: bf16 on CUDA (fp16 where the GPU has no bf16),
    bf16 on CPUs with AMX or AVX512-BF16, float32 elsewhere. ``bf16`` / ``fp16`` are taken as asked; fp16 needs CUDA.
    """
    import torch

    from medseg.errors import MedsegError, check_choice

    check_choice(amp, PRECISIONS, "amp")
    if amp == "off":
        return Precision(device, None)
    if amp == "fp16":
        if device.type != "cuda":
            raise MedsegError("amp: fp16 needs a CUDA device; use bf16 (CPUs with AMX/AVX512-BF16), auto or off")
        return Precision(device, torch.float16)
    if amp == "bf16":
        return Precision(device, torch.bfloat16)
    if device.type == "cuda":
        return Precision(device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return Precision(device, torch.bfloat16 if device.type == "cpu" and cpu_has_bf16() else None)
