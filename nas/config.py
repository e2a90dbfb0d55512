"""One typed configuration: YAML presets plus dotted command-line overrides, validated before anything runs.

The same object is what the loops take and what later stages log, so a run is described by exactly one thing::

    cfg = load_config("digits", ["search.epochs=3", "search.xi=0"])

Presets are YAML files in ``nas/presets/`` (by name) or any YAML path. Later stages extend :class:`Config` with
their own sections and pass their class as ``model=``.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from pathlib import Path
from types import UnionType
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from nas.genotypes import GenotypeError, parse_genotype
from nas.ops import PRIMITIVES, registered_ops

PRESETS_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A configuration problem, described in one line naming the field."""


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
NAME_MAX_LENGTH = 100


def _numeric(annotation: Any) -> bool:
    """True for ``int``, ``float``, lists of them and their optional forms: where YAML's true/false is a typo."""
    if annotation in (int, float):
        return True
    if get_origin(annotation) is list:
        return all(_numeric(a) for a in get_args(annotation))
    if get_origin(annotation) in (Union, UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return bool(args) and all(_numeric(a) for a in args)
    return False


class _Section(BaseModel):
    """Strict where a typo would otherwise run: unknown fields, true/false for a number, inf and NaN are refused."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, bool) for v in values) and _numeric(cls.model_fields[info.field_name].annotation):
            raise ValueError("expected a number, not true/false")
        return value


def check_name(name: str, what: str = "name") -> str:
    """A run or pipeline name: letters, digits, ``_.-``, at most 100 characters, so it is never a path (storage
    folders, MLflow keys and model names are made from it). Raises ConfigError in one line."""
    if not (isinstance(name, str) and re.fullmatch(NAME_PATTERN, name) and len(name) <= NAME_MAX_LENGTH):
        raise ConfigError(
            f"{what} {_short(name)} must be 1-{NAME_MAX_LENGTH} characters of letters, digits, '_', '.', '-', "
            "starting with a letter or digit"
        )
    return name


class DataConfig(_Section):
    source: str = Field("digits", description="digits | cifar10 | parquet:<path or URI> | imagefolder:<path>")
    root: str = Field("data", description="where downloaded data sets are kept")
    download: bool = True
    limit: int | None = Field(None, gt=0, description="use only the first N training examples")
    test_limit: int | None = Field(None, gt=0, description="use only the first N test examples")
    image_size: int = Field(32, gt=0, description="image side for imagefolder sources")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        kind = value.split(":", 1)[0]
        if value not in ("digits", "cifar10") and kind not in ("parquet", "imagefolder"):
            raise ValueError(f"unknown data source {value!r}; use digits, cifar10, parquet:<path>, imagefolder:<path>")
        if kind in ("parquet", "imagefolder") and not value.partition(":")[2].strip():
            raise ValueError(f"{kind} source needs a path: {kind}:<path>")
        return value


class SpeedConfig(_Section):
    """Optimizations of the search step that keep its mathematics (each tested against all of them off, the plain
    path: α and w after 3 steps within 1e-4). On by default only where they pay on CPU; bench/README.md has the
    measurements."""

    skip_none: bool = Field(
        True, description="skip computing 'none' (its output is zeros; its α stays in the softmax, so gradients agree)"
    )
    shared_relu: bool = Field(
        True,
        description="one ReLU per edge input shared by the conv candidates that all begin with ReLU: one saved "
        "activation per edge instead of four (12% less peak memory on CPU, the same time; bench/README.md)",
    )
    stacked_mixture: bool = Field(
        True,
        description="eq. 1's weighted sum as one operator, not a multiply and an add per candidate that autograd "
        "differentiates one by one: on CPU in place with a hand-written gradient (each weight's a dot product), on a "
        "GPU one product over the stacked candidates (fewer launches)",
    )
    norm_in_sum: bool = Field(
        True,
        description="each candidate's closing batch norm computed inside eq. 1's sum on CPU (fp32, in training): its "
        "normalized output is added and dropped, the backward works from the norm's input, so one saved activation "
        "less per candidate (13-19% less peak memory, the same time); not with ray.sync_bn, whose cross-rank norms "
        "run as they are",
    )
    recompute_depthwise: bool = Field(
        False,
        description="a memory option, with norm_in_sum: the depthwise output of each separable and dilated convolution "
        "(sep_conv_*, dil_conv_*) recomputed in the backward instead of kept, where a weight gradient needs it "
        "(nas.ops.separable; with batched_edges one such convolution over the stacked edges), and in a sep_conv the "
        "batch norm and ReLU between its two halves recomputed too (nas.ops.norm_relu_separable), and the argmax of "
        "each max pooling found again in its backward (nas.ops.forward_layer): about half the plain path's peak "
        "memory for about 10% more time than the default on CPU (bench/README.md)",
    )
    batched_edges: bool = Field(
        True,
        description="the edges leaving one state computed together: each candidate as one grouped operator over "
        "all of them (nas/batched.py), 2.9x fewer operators (GPUs are launch-bound). On CPU: DARTS as fast first "
        "order and 8-15% faster second order, for 5-9% more peak memory; PC-DARTS, whose narrow candidates (C/K "
        "channels) it runs several edges wide, 1.5-1.8x faster (bench/README.md). Not with ray.sync_bn, whose "
        "cross-rank norms run edge by edge",
    )
    weightless_once: bool = Field(
        True,
        description="with batched_edges on CPU: a candidate without weights (max and average pooling with their "
        "affine-free batch norms, skip_connect at stride 1) computed once for all the edges leaving a state, whose "
        "outputs are the same, not once per edge; the edges still weigh it each by its own α",
    )
    node_shuffle: bool = Field(
        True,
        description="PC-DARTS: each node sums its edges' partial-channel mixtures and passed-by channels apart, then "
        "concatenates and shuffles once (both are linear), instead of once per edge",
    )
    dense_dilation: bool = Field(
        True,
        description="each dilated depthwise convolution (dil_conv_*) as a dense one over the interleaved sub-grids of "
        "its input (nas.ops.dilated_as_dense): the same products; PyTorch's CPU backward of a dilated depthwise "
        "convolution is several times slower than a dense one's",
    )
    native_depthwise_grad: bool = Field(
        True,
        description="on CPU, the weight gradient of each depthwise convolution of 5x5 or more (sep_conv_5x5, "
        "dil_conv_5x5) by a native kernel built from C with the machine's compiler on first use (nas/kernels.py): "
        "5-8x faster than PyTorch's at the search's shapes, where it was the costliest operator of the step; the "
        "same sums in another order. With dense_dilation, each dilated one at stride 1 (dil_conv_3x3 too) then keeps "
        "its input as it is for the backward, not its re-laid sub-grids. PyTorch's kernel runs where no compiler "
        "builds it (bench/README.md)",
    )
    flipped_input_grad: bool = Field(
        True,
        description="on CPU, the input gradient of each depthwise convolution at stride 1 whose backward is ours (with "
        "native_depthwise_grad: 5x5 and dilated ones) as a forward convolution of the output's gradient with the "
        "kernel flipped (nas.ops._input_gradient), and each dilated one at stride 1 then run dilated as it is, "
        "without dense_dilation's re-layout: oneDNN's forward kernel is as fast dilated as dense, its dilated input "
        "gradient 10-15x slower than that forward; the same products in another order (bench/README.md)",
    )
    native_pointwise: bool = Field(
        True,
        description="with batched_edges on CPU: each candidate's 1x1 convolution over the stacked edges (one group an "
        "edge) whose groups are 2, 4, 8 or 16 channels wide (PC-DARTS's C/K channels, DARTS's 16) by a native "
        "kernel (nas/kernels.py), forward, input and weight gradient: oneDNN's grouped kernel runs several times "
        "slower at the narrow widths and 1.2-1.5x slower at 16; the same sums in another order. Wider groups keep "
        "oneDNN's (bench/README.md)",
    )
    native_norm: bool = Field(
        True,
        description="on CPU in channels_last, each training batch norm of the candidates whose channels are not a "
        "multiple of 16 (PC-DARTS's C/K channels, a small supernet's) by a native kernel built from C with the "
        "machine's compiler on first use (nas/kernels.py), forward and backward: PyTorch's channels_last kernel is "
        "4-10x slower at those widths; the same sums in another order (in double). It reaches the norms the search "
        "computes itself: with norm_in_sum or batched_edges, and skip_connect's in a reduction cell. PyTorch's "
        "kernel runs where no compiler builds it, under autocast, and in a backward that is differentiated again "
        "(bench/README.md)",
    )
    native_pool: bool = Field(
        True,
        description="on CPU, the candidates' max and average poolings over channels_last activations (and PC-DARTS's "
        "pooling of the passed-by channels at stride 2) by a native kernel (nas/kernels.py), forward; the backward "
        "is PyTorch's, from the argmax the kernel writes as PyTorch does: PyTorch's channels_last pooling vectorizes "
        "along the channels and takes 2-10x as long at PC-DARTS's 4-16 channels. The same values; PyTorch's kernel "
        "runs where no compiler builds it (bench/README.md)",
    )
    native_sum: bool = Field(
        True,
        description="with batched_edges on CPU: the forward of eq. 1's sum over a group of edges (each candidate "
        "through its closing batch norm under norm_in_sum, weighed edge by edge and added) by a native kernel "
        "(nas/kernels.py) in one pass that reads each candidate once and writes the sum once, the norms' statistics "
        "computed beforehand by the batch norm's kernel; PyTorch's operators write each normalized output and read "
        "it again. The same sums in another order; PyTorch's operators run where no compiler builds it "
        "(bench/README.md)",
    )
    channels_last: bool = Field(
        True,
        description="supernet weights and activations in channels_last memory format (CPU: PyTorch's pooling and "
        "depthwise convolution backward are several times faster in it; 1.7-1.9x per step, bench/README.md)",
    )
    checkpoint_cells: bool = Field(
        False, description="activation checkpointing per cell: less memory, one more cell forward per backward"
    )
    keep_freed_memory: bool = Field(
        True,
        description="on CPU, the C allocator keeps freed memory for the next step (nas.loop.keep_freed_memory): "
        "no page faults for the activations every step frees and allocates again (about 200k per second-order step "
        "at batch 16, a million at batch 48, where the second-order step gets 1.37x faster), the same peak "
        "(bench/README.md); a process-wide setting of glibc's malloc, made when the search is built",
    )
    pause_gc: bool = Field(
        True,
        description="Python's cyclic garbage collector paused during each search step and back as it was after "
        "(nas.loop.collection_paused): the step's autograd graph, tens of thousands of objects, is freed by "
        "reference counting when the step ends instead of being walked by collections during it, each full one "
        "also walking the supernet's modules (about 0.2 s every few steps; bench/README.md)",
    )
    compile: bool = Field(
        False,
        description="torch.compile the supernet's forward (falls back to eager if compiling fails; for GPUs: on a "
        "2-core CPU inductor's compile did not finish in 25 minutes, bench/README.md)",
    )
    cuda_graph: bool = Field(
        False,
        description="GPU only: the whole search step (architect, α and weight updates) captured once as a CUDA graph "
        "and replayed, one launch instead of tens of thousands (the GPU step is launch-bound, bench/README.md); "
        "captured again when a learning rate, ξ or the batch shape changes (nas/graphed.py); one worker, fp32, not "
        "with compile or checkpoint_cells",
    )

    @field_validator("batched_edges", mode="before")
    @classmethod
    def _stored_unset_is_on(cls, value: Any) -> Any:
        """Configs stored before this became a plain bool hold null ("on for PC-DARTS only"): a run resumed from one
        reads it as today's default, on, whose mathematics are the same (tests/test_speed.py)."""
        return True if value is None else value


class SearchConfig(_Section):
    seed: int = 2
    epochs: int = Field(50, gt=0)
    batch_size: int = Field(64, gt=0, description="per worker; the global batch is batch_size × workers")
    steps_per_epoch: int | None = Field(None, gt=0, description="cap on steps per epoch (quick runs)")
    layers: int = Field(8, gt=0)
    channels: int = Field(16, gt=0)
    nodes: int = Field(4, gt=0)
    stem_multiplier: int = Field(3, gt=0)
    primitives: list[str] = Field(default_factory=lambda: list(PRIMITIVES))
    train_portion: float = Field(0.5, gt=0, lt=1, description="share of the training set used for weights")
    augment: bool = True
    w_lr: float = Field(0.025, gt=0)
    w_lr_min: float = Field(0.001, ge=0)
    w_momentum: float = Field(0.9, ge=0, lt=1)
    w_weight_decay: float = Field(3e-4, ge=0)
    w_grad_clip: float = Field(5.0, gt=0)
    alpha_lr: float = Field(3e-4, gt=0)
    alpha_betas: tuple[float, float] = (0.5, 0.999)
    alpha_weight_decay: float = Field(1e-3, ge=0)
    xi: float | None = Field(None, ge=0, description="virtual-step lr; null = current weight lr, 0 = first order")
    hessian_scale: float = Field(0.01, gt=0, description="ε = hessian_scale / ‖∇w' L_val‖")
    hessian: Literal["fd", "exact"] = Field(
        "fd",
        description="second-order Hessian-vector product: fd = the paper's finite difference, exact = double backward",
    )
    speed: SpeedConfig = Field(default_factory=SpeedConfig)
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="bf16: the supernet's forward passes under bfloat16 autocast (GPUs; weights, α and optimizer state "
        "stay fp32, and the finite-difference Hessian's two passes run in fp32, as their difference needs)",
    )
    partial_channels: int = Field(
        1, ge=1, description="PC-DARTS K: 1/K of each edge's channels go through the mixed op, then a channel shuffle"
    )
    edge_normalization: bool = Field(
        False, description="PC-DARTS: a β per edge, softmax over each node's inputs, also used to derive the genotype"
    )

    @field_validator("alpha_betas")
    @classmethod
    def _betas_below_one(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= beta < 1 for beta in value):
            raise ValueError("Adam betas must each be in [0, 1)")
        return value

    @field_validator("primitives")
    @classmethod
    def _known_primitives(cls, value: list[str]) -> list[str]:
        known = registered_ops()
        for name in value:
            if name not in known:
                raise ValueError(f"unknown primitive {name!r} (registered: {', '.join(known)})")
        if len(set(value)) != len(value):
            raise ValueError("primitives must not repeat")
        if not [p for p in value if p != "none"]:
            raise ValueError("primitives need at least one operation other than 'none'")
        return value

    @field_validator("layers")
    @classmethod
    def _both_cell_kinds(cls, value: int) -> int:
        # Reductions sit at layers // 3 and 2 * layers // 3: below 3 layers no normal cell is left, α_normal is
        # unused and the architect's gradient fails mid-run.
        if value < 3:
            raise ValueError("a search needs layers >= 3, so that both normal and reduction cells exist")
        return value

    @model_validator(mode="after")
    def _channels_divide_by_partial_channels(self) -> SearchConfig:
        if self.channels % self.partial_channels:
            raise ValueError(f"channels ({self.channels}) must be a multiple of partial_channels")
        return self

    @model_validator(mode="after")
    def _exact_hessian_is_not_compiled(self) -> SearchConfig:
        if self.hessian == "exact" and self.speed.compile:
            raise ValueError("search.hessian=exact needs a double backward, which torch.compile does not support")
        return self

    @model_validator(mode="after")
    def _cuda_graph_alone(self) -> SearchConfig:
        if self.speed.cuda_graph:
            clash = [f"search.speed.{name}" for name in ("compile", "checkpoint_cells") if getattr(self.speed, name)]
            if self.precision != "fp32":
                clash.append(f"search.precision={self.precision}")
            if clash:
                raise ValueError(f"search.speed.cuda_graph cannot be combined with {', '.join(clash)}")
        return self

    def is_second_order(self) -> bool:
        return self.xi is None or self.xi > 0


class RetrainConfig(_Section):
    seed: int = 0
    genotype: str = Field("DARTS_V2", description="zoo name, genotype text or JSON")
    epochs: int = Field(600, gt=0)
    batch_size: int = Field(96, gt=0, description="per worker")
    steps_per_epoch: int | None = Field(None, gt=0)
    layers: int = Field(20, gt=0)
    channels: int = Field(36, gt=0)
    stem: Literal["cifar", "imagenet"] = "cifar"
    lr: float = Field(0.025, gt=0)
    lr_min: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(3e-4, ge=0)
    grad_clip: float = Field(5.0, gt=0)
    auxiliary: bool = True
    auxiliary_weight: float = Field(0.4, ge=0)
    drop_path: float = Field(0.2, ge=0, lt=1)
    cutout: int = Field(16, ge=0)
    augment: bool = True
    val_fraction: float = Field(0.1, ge=0, lt=1, description="held-out share of train; 0 = train on all, test once")

    @field_validator("genotype", mode="before")
    @classmethod
    def _genotype_file_read(cls, value: Any) -> Any:
        """A path to a genotype file (``.json`` / ``.txt``) stands for its text, read here (parsed, never run), so
        the config carries the cell itself to workers on other machines."""
        if isinstance(value, str) and value.endswith((".json", ".txt")) and Path(value).expanduser().is_file():
            return Path(value).expanduser().read_text()
        return value

    @field_validator("genotype")
    @classmethod
    def _parsable_genotype(cls, value: str) -> str:
        try:
            parse_genotype(value)
        except GenotypeError as err:
            raise ValueError(str(err)) from None
        return value

    @model_validator(mode="after")
    def _auxiliary_depth(self) -> RetrainConfig:
        if self.auxiliary and self.layers < 3:
            raise ValueError("the auxiliary head needs layers >= 3 (set auxiliary: false)")
        return self


class Config(_Section):
    name: str = Field("raydarts", pattern=NAME_PATTERN, max_length=NAME_MAX_LENGTH)
    output_dir: str = "runs"
    data: DataConfig = Field(default_factory=DataConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    retrain: RetrainConfig = Field(default_factory=RetrainConfig)


C = TypeVar("C", bound=BaseModel)


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def _preset_path(preset: str | Path, relative_to: Path | None = None) -> Path:
    """A preset name (``nas/presets/<name>.yaml``) or a YAML path (relative to ``relative_to`` when given)."""
    if not Path(preset).suffix and (PRESETS_DIR / f"{preset}.yaml").is_file():
        return PRESETS_DIR / f"{preset}.yaml"
    path = Path(preset).expanduser()
    if relative_to is not None and not path.is_absolute():
        path = relative_to / path
    if not path.is_file():
        raise ConfigError(f"config {str(preset)!r} is neither a preset ({', '.join(list_presets())}) nor a YAML file")
    return path


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: sections merge field by field, any other value (lists too) replaces."""
    merged = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merged(merged[key], value) if both else value
    return merged


def _read_yaml(preset: str | Path, relative_to: Path | None = None, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A preset's sections, with its ``base:`` preset (a name, or a path relative to the file) underneath."""
    path = _preset_path(preset, relative_to)
    if path.resolve() in chain:
        raise ConfigError(f"{path}: 'base' presets form a cycle ({' -> '.join(p.stem for p in (*chain, path))})")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base must name a preset or a YAML file, got {base!r}")
    return _merged(_read_yaml(base, path.parent, (*chain, path.resolve())), data)


def _field_annotation(model: type[BaseModel], dotted: str) -> Any:
    """The annotation of the field at ``section.field`` in ``model``, or None when there is no such field."""
    node: Any = model
    annotation = None
    for part in dotted.split("."):
        fields = getattr(node, "model_fields", None)
        if not fields or part not in fields:
            return None
        annotation = fields[part].annotation
        node = annotation
    return annotation


def _is_text(annotation: Any) -> bool:
    """A text field (``str``, a ``Literal`` of strings, either or None): values are taken as written, never read as
    YAML or JSON."""
    if get_origin(annotation) in (Union, UnionType):
        options = [a for a in get_args(annotation) if a is not type(None)]
        return bool(options) and all(_is_text(a) for a in options)
    if get_origin(annotation) is Literal:
        return all(isinstance(a, str) for a in get_args(annotation))
    return annotation is str


def _set(data: dict[str, Any], key: str, value: Any, override: str) -> None:
    """Put ``value`` at dotted ``key`` of nested dicts, creating sections on the way."""
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def apply_override(data: dict[str, Any], override: str, text: bool = False) -> None:
    """Apply ``a.b.c=value`` to nested dicts in place; the value is read as YAML (3, 0.5, true, null, [a, b]), or
    kept as written when ``text`` (a genotype or a name that happens to look like YAML), null aside."""
    key, sep, raw = override.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {override!r} must look like section.field=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if text and value is not None and not isinstance(value, str):
        value = raw
    _set(data, key, value, override)


def format_validation_error(err: ValidationError) -> str:
    """One line: every failing field by its dotted name, the problem, and the value given."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        given = e.get("input")
        shown = "" if isinstance(given, dict) or e["type"] in ("missing",) else f" (got {_short(given)})"
        parts.append(f"{loc}: {msg}{shown}" if loc else f"{msg}{shown}")
    return "invalid config: " + "; ".join(parts)


def _short(value: Any, limit: int = 80) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_config(
    preset: str | Path | None = None,
    overrides: Sequence[str] = (),
    model: type[C] = Config,  # type: ignore[assignment]
    known_sections_only: bool = False,
) -> C:
    """Build and validate the configuration from a preset (or defaults) and ``section.field=value`` overrides.

    ``known_sections_only`` drops top-level sections ``model`` does not have, so the library's own command line
    reads the presets of the Ray stages too (their ``ray:``, ``sweep:`` ... sections are the stages' business).
    """
    data = _read_yaml(preset) if preset is not None else {}
    for override in overrides:
        key = override.partition("=")[0].strip()
        apply_override(data, override, text=_is_text(_field_annotation(model, key)))
    if known_sections_only:
        data = {k: v for k, v in data.items() if k in model.model_fields or not isinstance(v, dict)}
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def to_flat_dict(config: BaseModel) -> dict[str, Any]:
    """``{"search.epochs": 50, ...}``: the config as flat params (for logging and comparison)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            flat[prefix] = value

    walk("", config.model_dump(mode="json"))
    return flat


def to_params(config: BaseModel) -> dict[str, str]:
    """The config as flat string params (MLflow's kind): text as written, everything else as JSON."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in to_flat_dict(config).items()}


def from_params(params: dict[str, str], model: type[C]) -> C:
    """The config that :func:`to_params` flattened, validated again (keys the model lacks are an error)."""
    data: dict[str, Any] = {}
    for key, value in params.items():
        text = _is_text(_field_annotation(model, key))
        _set(data, key, (None if value == "null" else value) if text else json.loads(value), f"{key}={value}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def config_parser(prog: str, description: str, default_preset: str) -> argparse.ArgumentParser:
    """The command line every entry point shares: a preset or YAML file and ``--set`` overrides (each adds its own
    options: ``--name``, ``--resume``, ``--dry-run``)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", default=default_preset, help=f"preset ({', '.join(list_presets())}) or YAML path")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one field; repeat as needed (values read as YAML)",
    )
    return parser
