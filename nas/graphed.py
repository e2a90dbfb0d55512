"""A training step captured once as a CUDA graph and replayed (``search.speed.cuda_graph``).

On a GPU the search step is bound by kernel launches, not arithmetic: each of its tens of thousands of small
operators costs the host about 23 µs to issue (bench/README.md, one H200), and the GPU waits. A CUDA graph records
every kernel of one step once; each later step copies its batch into the recorded input tensors and launches the
whole graph in one call.

What a replay cannot see, and how this module keeps the step the same:

- Python values are baked into the graph: the learning rates, ξ, the shapes of the batch. The step is captured
  again whenever :func:`step_key` changes (the cosine schedule moves the weight lr once per epoch), and never
  replayed for a key it was not captured with.
- Host synchronization (``.item()``, ``if tensor:``) cannot be captured: the step must not read a tensor's value on
  the host (tests/test_speed.py checks the architect and the weight step for it); the α optimizer must be Adam with
  ``capturable=True``.
- Python side effects of the step (counters) happen at capture time only: the caller counts replayed steps itself.
- The first ``warmup`` steps run eagerly on a side stream, as PyTorch's whole-network capture recipe does: they
  build the optimizers' state and the libraries' workspaces before anything is recorded.

    python -m components.search --config quick --set ray.use_gpu=true --set search.speed.cuda_graph=true
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Sequence

import torch
from torch import Tensor

StepFn = Callable[..., tuple[Tensor, ...]]


def step_key(optimizers: Sequence[torch.optim.Optimizer], xi: float, inputs: Sequence[Tensor]) -> tuple:
    """What a captured step depends on besides its tensors: every learning rate, ξ, and the batch's shapes and
    dtypes. A replay is valid only under the key its graph was captured with."""
    rates = tuple(float(group["lr"]) for opt in optimizers for group in opt.param_groups)
    return (rates, float(xi), tuple((tuple(t.shape), t.dtype) for t in inputs))


class GraphedStep:
    """``step(*inputs)`` (returning a tuple of tensors) run eagerly for ``warmup`` calls, then captured as a CUDA
    graph and replayed, captured again when the key changes. If capturing fails, a warning says why and every later
    call runs eagerly. ``before_capture`` runs before each capture: the step's caller drops what the last graph left
    allocated (its gradients), so that it does not hold the old graph's memory through the new capture."""

    def __init__(
        self, step: StepFn, device: torch.device, warmup: int = 2, before_capture: Callable[[], None] | None = None
    ):
        if device.type != "cuda":
            raise ValueError(f"search.speed.cuda_graph needs a CUDA device, not {device}")
        self.step = step
        self.device = device
        self.warmup = warmup
        self.before_capture = before_capture
        self.eager_calls = 0
        self.captures = 0
        self.replays = 0
        self.failed: str | None = None
        self._stream: torch.cuda.Stream | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._key: Hashable | None = None
        self._inputs: list[Tensor] = []
        self._outputs: tuple[Tensor, ...] = ()

    def __call__(self, key: Hashable, *inputs: Tensor) -> tuple[Tensor, ...]:
        if self.failed is not None:
            return self.step(*inputs)
        # The step's device made current: a capture records only the current device's work (another device's
        # kernels would run there and then, and the graph would replay nothing).
        with torch.cuda.device(self.device):
            if self.eager_calls < self.warmup:
                self.eager_calls += 1
                return self._on_side_stream(inputs)
            if key != self._key:
                try:
                    self._capture(key, inputs)
                except Exception as err:  # noqa: BLE001 - an operator that cannot be captured: eager from now on
                    self.reset()
                    self.failed = (str(err).strip().splitlines() or [type(err).__name__])[0]
                    warnings.warn(f"CUDA graph capture failed, running eagerly: {self.failed}", stacklevel=2)
                    return self.step(*inputs)
            for static, new in zip(self._inputs, inputs):
                static.copy_(new, non_blocking=True)
            assert self._graph is not None
            self._graph.replay()
            self.replays += 1
            # Copies: the next replay overwrites the recorded outputs (detached: no link to the recorded autograd).
            return tuple(t.detach().clone() for t in self._outputs)

    def _on_side_stream(self, inputs: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """An eager step on the stream the capture will use. The backward's gradient accumulators (one per weight,
        kept by autograd while anything references them) remember the stream they were made on; made on the capture
        stream, the captured backward finds them there, with no crossing to another stream to record."""
        side = self._capture_stream()
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            outputs = self.step(*inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        # Detached: the caller keeping a loss must not keep this step's autograd graph (and its accumulators) alive.
        return tuple(t.detach() for t in outputs)

    def _capture_stream(self) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    def _capture(self, key: Hashable, inputs: Sequence[Tensor]) -> None:
        """Record one step on copies of ``inputs``; nothing runs until the first replay."""
        self.reset()  # the old graph goes before the new one takes its own memory
        if self.before_capture is not None:
            self.before_capture()
        self._inputs = [t.clone() for t in inputs]
        graph = torch.cuda.CUDAGraph()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # thread_local: CUDA calls of other threads (a data loader's, Ray's) do not spoil this thread's capture.
            with torch.cuda.graph(graph, stream=self._capture_stream(), capture_error_mode="thread_local"):
                self._outputs = tuple(self.step(*self._inputs))
        empty = [str(w.message) for w in caught if "empty" in str(w.message).lower()]
        if empty:  # nothing was recorded: every replay would do nothing
            raise RuntimeError(f"the captured CUDA graph is empty ({empty[0]})")
        for w in caught:  # the others, passed on
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        self._graph, self._key = graph, key
        self.captures += 1

    def reset(self) -> None:
        """Forget the captured graph: the next call captures again."""
        self._graph, self._key, self._inputs, self._outputs = None, None, [], ()

    def restart(self) -> None:
        """:meth:`reset` and the warmup again, for when the step's tensors were replaced (loading an optimizer's
        state replaces its buffers, which a graph would go on reading): the eager calls build any state a capture
        must find in place."""
        self.reset()
        self.eager_calls = 0
