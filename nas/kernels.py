"""CPU kernels where PyTorch's own are slow: C source in this package, built with the machine's C compiler on first use.

- The weight gradient of a depthwise convolution larger than 3x3 (``depthwise_grad.c``). oneDNN runs it with a
  generic kernel that at the search's shapes takes 5-10 times as long as this one and about ten times its own
  forward; in a second-order DARTS step it was the costliest operator (bench/README.md). The search uses it through
  ``search.speed.native_depthwise_grad`` (nas.ops.depthwise_conv2d).
- The gradients of the batched eq. 1 sum for a candidate computed once per state (``edge_sum_grad.c``,
  ``search.speed.weightless_once``): each edge's weight and the candidate's output in one pass over the sum's
  gradient, where PyTorch's operators write and read a product of that size for each.
- A training batch norm over channels_last activations, forward and backward (``norm_cl.c``,
  ``search.speed.native_norm``): PyTorch's channels_last kernel vectorizes along the channels and, where their
  count is not a multiple of 16 (PC-DARTS's candidates on C/K = 4, 8 or 12 channels), takes 4-10 times as long
  as this one.
- The batched eq. 1 sum's forward (``edge_sum.c``, ``search.speed.native_sum``): every candidate of a group of
  edges, its closing batch norm applied on the way (statistics from ``norm_cl.c``), weighed and summed in one pass
  that reads each candidate once and writes the sum once.
- A grouped 1x1 convolution whose groups are 2, 4, 8 or 16 channels wide (``pointwise.c``,
  ``search.speed.native_pointwise``): forward, input and weight gradient, where oneDNN's grouped kernel runs at a
  fraction of the memory's speed (PC-DARTS's batched edges, C/K channels a group) or, at 16 (DARTS's), 1.2-1.5x
  slower.
- Max and average pooling over dense channels, forward (``pool.c``, ``search.speed.native_pool``): PyTorch's
  channels_last pooling vectorizes along the channels, and at PC-DARTS's 4-12 takes about 100 times as long as a
  copy of its input.

The library (all six files) is built once per machine, source and compiler, with ``-march=native``, into
``$XDG_CACHE_HOME/raydarts/kernels`` (``~/.cache`` by default) under a name that hashes all four, so a machine with
another CPU sharing the home folder builds its own. Processes that build at once (Ray workers) each write their own
file and rename it into place. Where no compiler builds it, a warning says why once and the callers keep PyTorch's
kernel; a search's Ray worker also says it on the driver's console (:func:`native_problem`). It is linked against
the OpenMP runtime by its soname, which PyTorch has already loaded: the kernel runs on PyTorch's own thread pool, with
``torch.get_num_threads()`` threads.
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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCES = tuple(
    Path(__file__).with_name(name)
    for name in ("depthwise_grad.c", "edge_sum_grad.c", "norm_cl.c", "edge_sum.c", "pointwise.c", "pool.c")
)
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
    """Compile the sources into ``target``, atomically (a temporary file in the same folder renamed into place)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=target.stem, suffix=".tmp")
    os.close(handle)
    try:
        done = subprocess.run(
            [cc, *FLAGS, *map(str, SOURCES), "-o", temporary], capture_output=True, text=True, timeout=BUILD_SECONDS
        )
        if done.returncode != 0:
            last = (done.stderr or done.stdout).strip().splitlines()[-1:]
            raise OSError(f"{cc} failed: {last[0] if last else f'exit status {done.returncode}'}")
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


@dataclass(frozen=True)
class NativeKernels:
    """The built kernel library, or why there is none (the text of the one warning given)."""

    library: ctypes.CDLL | None
    problem: str | None = None


@functools.cache
def native_kernels() -> NativeKernels:
    """The kernel library, loaded (built first where it is not in the cache), or why it cannot be, with one warning.
    Cached for the process: a loaded shared library stays loaded."""
    cc = compiler()
    if cc is None:
        return _without("no C compiler (cc, gcc, clang or $CC)")
    try:
        return NativeKernels(_load(cc))
    except (OSError, subprocess.SubprocessError) as error:
        return _without(f"not built ({error})")


def _without(problem: str) -> NativeKernels:
    text = (
        "native kernels (search.speed.native_depthwise_grad, weightless_once, native_norm, native_sum, "
        f"native_pointwise, native_pool): {problem}; "
        "PyTorch's operators run"
    )
    warnings.warn(text, stacklevel=3)
    return NativeKernels(None, text)


def _load(cc: str) -> ctypes.CDLL:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    texts = [source.read_text() for source in SOURCES]
    key = hashlib.sha256("\0".join([*texts, *FLAGS, version, _machine()]).encode()).hexdigest()
    target = cache_folder() / f"raydarts_kernels-{key[:16]}.so"
    if not target.exists():
        _build(cc, target)
    library = ctypes.CDLL(str(target))
    function = library.depthwise_weight_grad_f32
    function.restype = None
    function.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 16 + [ctypes.c_int]
    function = library.edge_sum_once_grad_f32
    function.restype = None
    function.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 4 + [ctypes.c_int]
    function = library.norm_cl_forward_f32
    function.restype = None
    function.argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_int64] * 2 + [ctypes.c_double] * 2 + [ctypes.c_int]
    function = library.norm_cl_backward_f32
    function.restype = None
    function.argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_int64] * 2 + [ctypes.c_int]
    function = library.edge_sum_forward_f32
    function.restype = None
    function.argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_int64] * 5 + [ctypes.c_int]
    function = library.pointwise_grouped_f32
    function.restype = None
    function.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int] * 2
    function = library.pointwise_grouped_weight_grad_f32
    function.restype = None
    function.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    function = library.pool2d_forward_f32
    function.restype = None
    function.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 12 + [ctypes.c_int] * 2
    return library


def native_library() -> ctypes.CDLL | None:
    """The built kernel library (:func:`native_kernels`); None where it cannot be built or loaded."""
    return native_kernels().library


def native_available() -> bool:
    """Whether the native kernels are built and loaded here (building them on the first call)."""
    return native_kernels().library is not None


def native_problem() -> str | None:
    """Why the native kernels are not available here, as one line (None where they are): what a Ray worker says on
    the driver's console, where its own warning would stay in its log."""
    return native_kernels().problem


def depthwise_weight_gradient(
    x: torch.Tensor, grad: torch.Tensor, kernel: int, stride: int, padding: int, dilation: int
) -> torch.Tensor:
    """The weight gradient, (C, 1, K, K), of ``conv2d(x, weight, None, stride, padding, dilation, groups=C)`` given
    the output's ``grad``: float32 CPU tensors of 4 dimensions, any strides (copied channels_last where the channels
    are not the innermost dimension). The library must be available (:func:`native_available`)."""
    library = native_library()
    if library is None:
        raise RuntimeError("the native kernels are not available here (nas.kernels.native_available)")
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


def once_per_state_gradients(
    grad: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor | None,
    invstd: torch.Tensor | None,
    weights: torch.Tensor,
    want_weights: bool,
    want_output: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """For a candidate computed once per state in the batched eq. 1 sum (``search.speed.weightless_once``): each
    edge's weight gradient Σ grad_e · x̂ and Σ_e weights[e] · grad_e (what reaches the candidate's normalized output),
    from the sum's ``grad`` (N, states·r·C, H, W), the candidate's input ``x`` (N, states·C, H, W), its batch norm's
    ``mean`` and ``invstd`` (None: x̂ = x) and ``weights`` (states, r). Float32 CPU tensors, copied channels_last
    where they are not. The library must be available (:func:`native_available`)."""
    library = native_library()
    if library is None:
        raise RuntimeError("the native kernels are not available here (nas.kernels.native_available)")
    tensors = [t for t in (grad, x, mean, invstd, weights) if t is not None]
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        raise TypeError("the native kernels take float32 CPU tensors")
    grad, x = (t.contiguous(memory_format=torch.channels_last) for t in (grad, x))
    states, r = weights.shape
    n, uc, h, w = x.shape
    if grad.shape[1] != uc * r or uc % states:
        raise ValueError(f"a gradient of {grad.shape[1]} channels does not fit {states}x{r} edges of {uc} channels")
    weights, mean, invstd = (None if t is None else t.contiguous() for t in (weights, mean, invstd))
    d_weights = torch.empty(states * r) if want_weights else None
    d_output = torch.empty((n, uc, h, w), memory_format=torch.channels_last) if want_output else None
    library.edge_sum_once_grad_f32(
        grad.data_ptr(),
        x.data_ptr(),
        None if mean is None else mean.data_ptr(),
        None if invstd is None else invstd.data_ptr(),
        weights.data_ptr(),
        None if d_weights is None else d_weights.data_ptr(),
        None if d_output is None else d_output.data_ptr(),
        n * h * w,
        states,
        r,
        uc // states,
        torch.get_num_threads(),
    )
    return d_weights, d_output


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _float32_vectors(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Per-channel tensors as the C kernels read them: float32, on the CPU, dense."""
    if any(t is not None and (t.dtype != torch.float32 or t.device.type != "cpu") for t in tensors):
        raise TypeError("the native kernels take float32 CPU tensors")
    return [None if t is None else t.contiguous() for t in tensors]


def norm_forward(
    x: torch.Tensor,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float,
    eps: float,
    output: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """``torch.native_batch_norm(x, scale, shift, running_mean, running_var, True, momentum, eps)`` for a float32
    CPU tensor ``x`` of 4 dimensions, copied channels_last where it is not: the output (channels_last; None without
    ``output``: the statistics alone), the batch's per-channel mean and 1/σ; the running statistics, where given
    (dense float32), are moved in place as PyTorch moves them. The library must be available
    (:func:`native_available`)."""
    library = native_library()
    if library is None:
        raise RuntimeError("the native kernels are not available here (nas.kernels.native_available)")
    scale, shift = _float32_vectors(scale, shift)
    for running in (running_mean, running_var):
        if running is not None and not (running.dtype == torch.float32 and running.is_contiguous()):
            raise TypeError("the running statistics must be dense float32 tensors (they are updated in place)")
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 4:
        raise TypeError(f"the native batch norm takes a 4-d float32 CPU tensor, not {tuple(x.shape)} {x.dtype}")
    x = x.contiguous(memory_format=torch.channels_last)
    n, c, h, w = x.shape
    y = torch.empty_like(x, memory_format=torch.channels_last) if output else None
    mean, invstd = torch.empty(c), torch.empty(c)
    library.norm_cl_forward_f32(
        x.data_ptr(),
        _pointer(scale),
        _pointer(shift),
        _pointer(y),
        mean.data_ptr(),
        invstd.data_ptr(),
        _pointer(running_mean),
        _pointer(running_var),
        n * h * w,
        c,
        eps,
        momentum,
        torch.get_num_threads(),
    )
    return y, mean, invstd


def norm_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor | None,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    wanted: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``native_batch_norm_backward`` of a training batch norm (batch statistics ``mean``, ``invstd``; ``scale``
    None: affine-free) for float32 CPU tensors of 4 dimensions, copied channels_last where they are not: the
    gradients of the input (channels_last), the scale and the shift, each None where ``wanted`` says so. The library
    must be available (:func:`native_available`)."""
    library = native_library()
    if library is None:
        raise RuntimeError("the native kernels are not available here (nas.kernels.native_available)")
    if any(t.dtype != torch.float32 or t.device.type != "cpu" or t.dim() != 4 for t in (grad, x)):
        raise TypeError("the native batch norm takes 4-d float32 CPU tensors")
    scale, mean, invstd = _float32_vectors(scale, mean, invstd)
    grad, x = (t.contiguous(memory_format=torch.channels_last) for t in (grad, x))
    n, c, h, w = x.shape
    d_x = torch.empty_like(x, memory_format=torch.channels_last) if wanted[0] else None
    d_scale = torch.empty(c) if wanted[1] else None
    d_shift = torch.empty(c) if wanted[2] else None
    library.norm_cl_backward_f32(
        grad.data_ptr(),
        x.data_ptr(),
        _pointer(scale),
        mean.data_ptr(),
        invstd.data_ptr(),
        _pointer(d_x),
        _pointer(d_scale),
        _pointer(d_shift),
        n * h * w,
        c,
        torch.get_num_threads(),
    )
    return d_x, d_scale, d_shift


def edge_sum_forward(
    inputs: Sequence[torch.Tensor],
    means: Sequence[torch.Tensor | None],
    invstds: Sequence[torch.Tensor | None],
    once: Sequence[bool],
    weights: torch.Tensor,
    sources: int,
) -> torch.Tensor:
    """The batched eq. 1 sum (nas.search_model._EdgeWeightedSum) in one pass: Σ_k weights[k, e] · x̂_k over each
    edge e's block of channels, x̂_k = (inputs[k] − means[k]) · invstds[k] (means[k] None: inputs[k] as it is), an
    input marked in ``once`` holding one block per state (``sources`` states, the edges edge-major by state), the
    others one per edge. Float32 CPU tensors of 4 dimensions, copied channels_last where they are not; ``weights``
    (candidates, edges). The sum: (N, edges·C, H, W), channels_last. The library must be available
    (:func:`native_available`)."""
    library = native_library()
    if library is None:
        raise RuntimeError("the native kernels are not available here (nas.kernels.native_available)")
    k, m = weights.shape
    if not (len(inputs) == len(means) == len(invstds) == len(once) == k) or m % sources:
        raise ValueError(f"{len(inputs)} inputs do not fit {k} candidates of {m} edges leaving {sources} states")
    if any(x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 4 for x in inputs):
        raise TypeError("the native sum takes 4-d float32 CPU tensors")
    xs = [x.contiguous(memory_format=torch.channels_last) for x in inputs]
    n, _, h, w = xs[0].shape
    c = next(x.shape[1] // (sources if shared else m) for x, shared in zip(xs, once))
    for x, shared in zip(xs, once):
        if tuple(x.shape) != (n, (sources if shared else m) * c, h, w):
            raise ValueError(f"an input of shape {tuple(x.shape)} does not fit {m} edges of {c} channels")
    means = [None if t is None else _float32_vectors(t)[0] for t in means]
    invstds = [None if t is None else _float32_vectors(t)[0] for t in invstds]
    weights = _float32_vectors(weights)[0]
    total = torch.empty((n, m * c, h, w), memory_format=torch.channels_last)
    scratch = torch.empty(2, k * m * c)
    pointers = ctypes.c_void_p * k
    flags = torch.tensor([bool(shared) for shared in once], dtype=torch.uint8)
    library.edge_sum_forward_f32(
        pointers(*[x.data_ptr() for x in xs]),
        pointers(*[_pointer(t) for t in means]),
        pointers(*[_pointer(t) for t in invstds]),
        flags.data_ptr(),
        weights.data_ptr(),
        total.data_ptr(),
        scratch[0].data_ptr(),
        scratch[1].data_ptr(),
        k,
        n * h * w,
        m,
        sources,
        c,
        torch.get_num_threads(),
    )
    return total


POINTWISE_WIDTHS = (2, 4, 8, 16)  # the group widths the grouped 1x1 kernel takes


def grouped_pointwise(x: torch.Tensor, weight: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """``F.conv2d(x, weight, groups=C // w)`` for a 1x1 ``weight`` (C, w, 1, 1) of w = 2, 4, 8 or 16 channels a group in
    and out; ``transposed``: each group's weight transposed, which is the input's gradient given the output's in
    ``x``. A float32 CPU tensor of 4 dimensions, copied channels_last where it is not; the result channels_last. The
    library must be available (:func:`native_available`)."""
    library = native_library()
    if library is None:
        raise RuntimeError("the native kernels are not available here (nas.kernels.native_available)")
    c, w = weight.shape[0], weight.shape[1]
    if w not in POINTWISE_WIDTHS or tuple(weight.shape[2:]) != (1, 1) or x.dim() != 4 or x.shape[1] != c or c % w:
        raise ValueError(f"no grouped 1x1 kernel for a weight {tuple(weight.shape)} on an input {tuple(x.shape)}")
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise TypeError("the native kernels take float32 CPU tensors")
    x = x.contiguous(memory_format=torch.channels_last)
    weight = _float32_vectors(weight)[0]
    n, _, h, width = x.shape
    y = torch.empty_like(x, memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    library.pointwise_grouped_f32(
        x.data_ptr(), weight.data_ptr(), y.data_ptr(), n * h * width, c, w, transposed, threads
    )
    return y


def grouped_pointwise_weight_gradient(x: torch.Tensor, grad: torch.Tensor, width: int) -> torch.Tensor:
    """The weight gradient (C, width, 1, 1) of :func:`grouped_pointwise` of ``x``, given its output's ``grad``. Float32
    CPU tensors, copied channels_last where they are not. The library must be available (:func:`native_available`)."""
    library = native_library()
    if library is None:
        raise RuntimeError("the native kernels are not available here (nas.kernels.native_available)")
    if width not in POINTWISE_WIDTHS or x.shape != grad.shape or x.dim() != 4 or x.shape[1] % width:
        raise ValueError(f"no grouped 1x1 weight gradient of width {width} for {tuple(x.shape)}, {tuple(grad.shape)}")
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in (x, grad)):
        raise TypeError("the native kernels take float32 CPU tensors")
    x, grad = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad))
    n, c, h, w = x.shape
    d_weight = torch.empty(c, width, 1, 1)
    library.pointwise_grouped_weight_grad_f32(
        x.data_ptr(), grad.data_ptr(), d_weight.data_ptr(), n * h * w, c, width, torch.get_num_threads()
    )
    return d_weight


def pooled_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """The output length of a pooling along one dimension, by PyTorch's rule (with ``ceil_mode`` a last window
    that starts inside the input or its left padding is kept)."""
    out = (size + 2 * padding - kernel + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def dense_channels(x: torch.Tensor) -> bool:
    """Whether the channels of a 4-d tensor lie next to each other (stride 1; one channel always does)."""
    return x.stride(1) == 1 or x.shape[1] == 1


def pool2d(
    x: torch.Tensor, kernel: int, stride: int, padding: int, ceil_mode: bool, is_max: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``F.max_pool2d(x, kernel, stride, padding, ceil_mode=ceil_mode, return_indices=True)`` (``is_max``) or
    ``F.avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad=False)`` and None, square windows, for a
    4-d float32 CPU tensor whose channels are dense (stride 1: channels_last, or channels cut from such a tensor);
    the results channels_last, the indices as PyTorch's backward takes them. The library must be available
    (:func:`native_available`)."""
    library = native_library()
    if library is None:
        raise RuntimeError("the native kernels are not available here (nas.kernels.native_available)")
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 4 or not dense_channels(x):
        raise TypeError(f"the native pooling takes a 4-d float32 CPU tensor with dense channels, not {tuple(x.shape)}")
    if not 0 <= padding <= kernel // 2 or stride < 1:
        raise ValueError(f"no pooling of window {kernel}, stride {stride}, padding {padding}")
    n, c, h, w = x.shape
    oh, ow = (pooled_size(size, kernel, stride, padding, ceil_mode) for size in (h, w))
    y = torch.empty(n, c, oh, ow, memory_format=torch.channels_last)
    indices = torch.empty(n, c, oh, ow, dtype=torch.int64, memory_format=torch.channels_last) if is_max else None
    library.pool2d_forward_f32(
        x.data_ptr(),
        y.data_ptr(),
        _pointer(indices),
        n,
        c,
        h,
        w,
        x.stride(0),
        x.stride(2),
        x.stride(3),
        oh,
        ow,
        kernel,
        stride,
        padding,
        is_max,
        torch.get_num_threads(),
    )
    return y, indices
