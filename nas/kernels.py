"""CPU kernels where PyTorch's own are slow: C source in this package, built with the machine's C compiler on first use.

The one kernel here is the weight gradient of a depthwise convolution larger than 3x3 (``depthwise_grad.c``). oneDNN
runs it with a generic kernel that at the search's shapes takes 5-10 times as long as this one and about ten times
its own forward; in a second-order DARTS step it was the costliest operator (bench/README.md). The search uses it
through ``search.speed.native_depthwise_grad`` (nas.ops.depthwise_conv2d).

The library is built once per machine, source and compiler, with ``-march=native``, into
``$XDG_CACHE_HOME/raydarts/kernels`` (``~/.cache`` by default) under a name that hashes all four, so a machine with
another CPU sharing the home folder builds its own. Processes that build at once (Ray workers) each write their own
file and rename it into place. Where no compiler builds it, a warning says why once and the callers keep PyTorch's
kernel. It is linked against the OpenMP runtime by its soname, which PyTorch has already loaded: the kernel runs on
PyTorch's own thread pool, with ``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("depthwise_grad.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
BUILD_SECONDS = 120


def cache_folder() -> Path:
    """Where built kernels are kept: ``$XDG_CACHE_HOME/raydarts/kernels``, else ``~/.cache/raydarts/kernels``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "raydarts" / "kernels"


def compiler() -> str | None:
    """The C compiler: ``$CC`` if set, else ``cc``, ``gcc`` or ``clang`` on the PATH; None where there is none."""
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"])
    return next((found for name in ("cc", "gcc", "clang") if (found := shutil.which(name))), None)


def _machine() -> str:
    """What ``-march=native`` compiles for: the CPU's model and feature flags (Linux), else the architecture."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    wanted = [line for line in lines if line.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(dict.fromkeys(wanted)) or platform.machine()


def _build(cc: str, target: Path) -> None:
    """Compile the source into ``target``, atomically (a temporary file in the same folder renamed into place)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=target.stem, suffix=".tmp")
    os.close(handle)
    try:
        done = subprocess.run(
            [cc, *FLAGS, str(SOURCE), "-o", temporary], capture_output=True, text=True, timeout=BUILD_SECONDS
        )
        if done.returncode != 0:
            last = (done.stderr or done.stdout).strip().splitlines()[-1:]
            raise OSError(f"{cc} failed: {last[0] if last else f'exit status {done.returncode}'}")
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


@functools.cache
def depthwise_library() -> ctypes.CDLL | None:
    """The built kernel library, loaded (built first where it is not in the cache); None, with one warning, where it
    cannot be built or loaded. Cached for the process: a loaded shared library stays loaded."""
    cc = compiler()
    if cc is None:
        warnings.warn(
            "search.speed.native_depthwise_grad: no C compiler (cc, gcc, clang or $CC); PyTorch's kernel runs",
            stacklevel=2,
        )
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, version, _machine()]).encode()).hexdigest()
        target = cache_folder() / f"depthwise_grad-{key[:16]}.so"
        if not target.exists():
            _build(cc, target)
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        warnings.warn(
            f"search.speed.native_depthwise_grad: the kernel was not built ({error}); PyTorch's kernel runs",
            stacklevel=2,
        )
        return None
    function = library.depthwise_weight_grad_f32
    function.restype = None
    function.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 16 + [ctypes.c_int]
    return library


def native_available() -> bool:
    """Whether the native kernel is built and loaded here (building it on the first call)."""
    return depthwise_library() is not None


def depthwise_weight_gradient(
    x: torch.Tensor, grad: torch.Tensor, kernel: int, stride: int, padding: int, dilation: int
) -> torch.Tensor:
    """The weight gradient, (C, 1, K, K), of ``conv2d(x, weight, None, stride, padding, dilation, groups=C)`` given
    the output's ``grad``: float32 CPU tensors of 4 dimensions, any strides (copied channels_last where the channels
    are not the innermost dimension). The library must be available (:func:`native_available`)."""
    library = depthwise_library()
    if library is None:
        raise RuntimeError("the native depthwise kernel is not available here (nas.kernels.native_available)")
    if x.dtype != torch.float32 or grad.dtype != torch.float32 or x.device.type != "cpu":
        raise TypeError(f"the native depthwise kernel takes float32 CPU tensors, not {x.dtype} on {x.device}")
    x, grad = (t if t.stride(1) == 1 else t.contiguous(memory_format=torch.channels_last) for t in (x, grad))
    n, c, h, w = x.shape
    out = torch.full((c, 1, kernel, kernel), float("nan"))  # a failed allocation in C leaves NaN, never a gradient
    library.depthwise_weight_grad_f32(
        x.data_ptr(),
        grad.data_ptr(),
        out.data_ptr(),
        n,
        c,
        h,
        w,
        grad.shape[2],
        grad.shape[3],
        x.stride(0),
        x.stride(2),
        x.stride(3),
        grad.stride(0),
        grad.stride(2),
        grad.stride(3),
        kernel,
        stride,
        padding,
        dilation,
        torch.get_num_threads(),
    )
    return out
