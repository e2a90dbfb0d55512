"""Discrete cell architectures (genotypes): the result of a DARTS search and the input of an evaluation network.

A genotype uses the flat layout of the DARTS authors' code: per cell, two edges per intermediate node in node order,
each ``(op name, input index)`` where inputs 0 and 1 are the cell inputs c_{k-2}, c_{k-1} and ``2 + i`` is
intermediate node ``i``; ``*_concat`` lists the node indices whose outputs are concatenated into the cell output.

Genotypes are read from text without ever running it: :func:`parse_genotype` walks the syntax tree and accepts only
literal lists, tuples, strings, integers and ``range(...)`` inside one ``Genotype(...)`` call, so logs and files
written by other DARTS implementations can be loaded safely.
"""

from __future__ import annotations

import ast
import json
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch

from nas.ops import PRIMITIVES, is_parameter_free, is_registered, registered_ops

__all__ = [
    "GENOTYPES",
    "AmoebaNet",
    "DARTS",
    "DARTS_V1",
    "DARTS_V2",
    "Genotype",
    "GenotypeError",
    "NASNet",
    "PC_DARTS",
    "PDARTS",
    "cell_markdown",
    "count_ops",
    "derive_genotype",
    "input_name",
    "node_formulas",
    "parse_genotype",
    "random_genotype",
    "random_genotypes",
]

Edge = tuple[str, int]

_FIELDS: tuple[str, ...] = ("normal", "normal_concat", "reduce", "reduce_concat")
_NONE = "none"
# Bounds that keep hostile input from costing much: text length, literal nesting, range() length.
_MAX_TEXT = 1_000_000
_MAX_DEPTH = 8
_MAX_RANGE = 10_000
_SNIPPET = 60


class GenotypeError(ValueError):
    """A genotype is malformed or cannot be parsed; the message is one line that names the problem."""


def _snippet(value: object) -> str:
    """A short one-line rendering of ``value`` for error messages."""
    text = " ".join(str(value).split())
    return text if len(text) <= _SNIPPET else text[: _SNIPPET - 3] + "..."


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_seq(value: object) -> bool:
    return isinstance(value, list | tuple)


def _normalise_cell(value: object, cell: str) -> tuple[Edge, ...]:
    """Turn a flat edge list or a per-node list of edge pairs into a flat tuple of ``(op, input)`` edges."""
    if not _is_seq(value):
        raise GenotypeError(f"{cell} cell: expected a list of (op name, input index) edges, got {_snippet(value)!r}")
    items = list(value)
    if not items:
        raise GenotypeError(f"{cell} cell: no edges")
    # A per-node entry is a list whose items are edges; a flat edge starts with its op name.
    per_node = [_is_seq(item) and (len(item) == 0 or _is_seq(item[0])) for item in items]
    if any(per_node):
        if not all(per_node):
            raise GenotypeError(f"{cell} cell: mixes per-node edge lists with flat edges")
        flat: list[object] = []
        for node, pair in enumerate(items):
            if len(pair) != 2:
                raise GenotypeError(f"{cell} cell: node {node} has {len(pair)} edges, expected 2")
            flat.extend(pair)
        items = flat
    edges: list[Edge] = []
    for k, edge in enumerate(items):
        if not (_is_seq(edge) and len(edge) == 2 and isinstance(edge[0], str) and _is_int(edge[1])):
            raise GenotypeError(f"{cell} cell edge {k}: expected (op name, input index), got {_snippet(edge)!r}")
        edges.append((edge[0], int(edge[1])))
    if len(edges) % 2:
        raise GenotypeError(f"{cell} cell: {len(edges)} edge(s), expected 2 per node (an even number)")
    return tuple(edges)


def _normalise_concat(value: object, field: str) -> tuple[int, ...]:
    if not isinstance(value, list | tuple | range):
        raise GenotypeError(f"{field}: expected a list of node indices, got {_snippet(value)!r}")
    for index in value:
        if not _is_int(index):
            raise GenotypeError(f"{field}: index {_snippet(index)!r} is not an integer")
    return tuple(int(i) for i in value)


def _known_ops() -> str:
    return ", ".join(op for op in registered_ops() if op != _NONE)


def _check_cell(edges: tuple[Edge, ...], concat: tuple[int, ...], cell: str) -> None:
    """Structural checks of one cell: registered ops, inputs that exist, concat of existing distinct nodes."""
    for k, (op, index) in enumerate(edges):
        node = k // 2
        if op == _NONE:
            raise GenotypeError(f"{cell} cell node {node}: operation 'none' is not allowed (it means no edge)")
        if not is_registered(op):
            raise GenotypeError(f"unknown operation {op!r} in {cell} cell (known: {_known_ops()})")
        if not 0 <= index <= node + 1:
            raise GenotypeError(f"{cell} cell node {node}: input index {index} out of range (0..{node + 1})")
    nodes = len(edges) // 2
    if not concat:
        raise GenotypeError(f"{cell}_concat: empty, expected node indices in 2..{nodes + 1}")
    seen: set[int] = set()
    for index in concat:
        # Published cells (NASNet, AmoebaNet) concatenate a subset of the nodes, so any subset is accepted.
        if not 2 <= index <= nodes + 1:
            raise GenotypeError(f"{cell}_concat: index {index} out of range (2..{nodes + 1})")
        if index in seen:
            raise GenotypeError(f"{cell}_concat: index {index} listed twice")
        seen.add(index)


def _edge_text(edges: Iterable[Edge]) -> str:
    return "[" + ", ".join(f"({op!r}, {index})" for op, index in edges) + "]"


@dataclass(frozen=True)
class Genotype:
    """A normal and a reduction cell, validated on construction so a network never sees an impossible cell.

    Lists, ranges and the per-node nested form (``[[edge, edge], ...]``) are accepted and stored as flat tuples,
    which makes genotypes hashable and comparable.
    """

    normal: tuple[tuple[str, int], ...]
    normal_concat: tuple[int, ...]
    reduce: tuple[tuple[str, int], ...]
    reduce_concat: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "normal", _normalise_cell(self.normal, "normal"))
        object.__setattr__(self, "reduce", _normalise_cell(self.reduce, "reduce"))
        object.__setattr__(self, "normal_concat", _normalise_concat(self.normal_concat, "normal_concat"))
        object.__setattr__(self, "reduce_concat", _normalise_concat(self.reduce_concat, "reduce_concat"))
        self.validate()

    @property
    def nodes(self) -> int:
        """Number of intermediate nodes per cell (both cells have the same number)."""
        return len(self.normal) // 2

    def validate(self, primitives: Sequence[str] | None = None) -> None:
        """Check the structure and, when ``primitives`` is given, that every op is one of them (a search space)."""
        _check_cell(self.normal, self.normal_concat, "normal")
        _check_cell(self.reduce, self.reduce_concat, "reduce")
        if len(self.reduce) != len(self.normal):
            raise GenotypeError(
                f"reduce cell has {len(self.reduce) // 2} nodes but normal cell has {len(self.normal) // 2}; "
                "both cells need the same number of nodes"
            )
        if primitives is not None:
            allowed = set(primitives)
            for cell, edges in (("normal", self.normal), ("reduce", self.reduce)):
                for op, _ in edges:
                    if op not in allowed:
                        raise GenotypeError(
                            f"operation {op!r} in {cell} cell is not among the primitives ({', '.join(primitives)})"
                        )

    def __str__(self) -> str:
        """The DARTS authors' printed form, so genotypes can be pasted between this and their code."""
        return (
            f"Genotype(normal={_edge_text(self.normal)}, normal_concat={list(self.normal_concat)}, "
            f"reduce={_edge_text(self.reduce)}, reduce_concat={list(self.reduce_concat)})"
        )

    def to_dict(self) -> dict[str, list[Any]]:
        """JSON-ready form: edges as ``[op, input]`` lists."""
        return {
            "normal": [[op, index] for op, index in self.normal],
            "normal_concat": list(self.normal_concat),
            "reduce": [[op, index] for op, index in self.reduce],
            "reduce_concat": list(self.reduce_concat),
        }

    def to_json(self) -> str:
        """Stable JSON text (fixed key order), suitable for files and for comparing runs."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Genotype:
        """Build from :meth:`to_dict` output (flat or per-node nested edges); keys must be exactly the four fields."""
        if not isinstance(data, Mapping):
            raise GenotypeError(f"not a genotype: expected a mapping with keys {', '.join(_FIELDS)}")
        _check_keys(list(data))
        return cls(**{field: data[field] for field in _FIELDS})

    def canonical(self) -> Genotype:
        """The same architecture with each node's two edges sorted (input, then op) and concat sorted.

        The order of a node's two edges and of the concatenated nodes does not change the architecture, so
        canonical forms of equivalent cells compare and hash equal.
        """

        def sort_cell(edges: tuple[Edge, ...]) -> tuple[Edge, ...]:
            pairs = (sorted(edges[k : k + 2], key=lambda edge: (edge[1], edge[0])) for k in range(0, len(edges), 2))
            return tuple(edge for pair in pairs for edge in pair)

        return Genotype(
            normal=sort_cell(self.normal),
            normal_concat=tuple(sorted(self.normal_concat)),
            reduce=sort_cell(self.reduce),
            reduce_concat=tuple(sorted(self.reduce_concat)),
        )


def _check_keys(keys: Sequence[str]) -> None:
    missing = [field for field in _FIELDS if field not in keys]
    extra = [str(key) for key in keys if key not in _FIELDS]
    if missing:
        raise GenotypeError(f"not a genotype: missing keyword(s) {', '.join(missing)}")
    if extra:
        raise GenotypeError(f"not a genotype: unexpected keyword(s) {', '.join(extra)}")


# ---------------------------------------------------------------------------------------------------------------
# Parsing


_REJECTED_KINDS: dict[type[ast.AST], str] = {
    ast.Attribute: "attribute access is",
    ast.Name: "names are",
    ast.Lambda: "lambdas are",
    ast.Subscript: "subscripts are",
    ast.JoinedStr: "f-strings are",
    ast.FormattedValue: "f-strings are",
    ast.ListComp: "comprehensions are",
    ast.SetComp: "comprehensions are",
    ast.DictComp: "comprehensions are",
    ast.GeneratorExp: "comprehensions are",
    ast.BinOp: "operators are",
    ast.BoolOp: "operators are",
    ast.Compare: "comparisons are",
    ast.IfExp: "conditional expressions are",
    ast.NamedExpr: "assignment expressions are",
    ast.Starred: "starred expressions are",
    ast.Await: "await is",
    ast.Yield: "yield is",
    ast.YieldFrom: "yield is",
    ast.Set: "sets are",
    ast.Dict: "nested dicts are",
}


def _reject(node: ast.AST) -> GenotypeError:
    if isinstance(node, ast.Call):
        return GenotypeError(f"not a genotype: calls are not allowed (found {_snippet(ast.unparse(node.func))!r})")
    kind = _REJECTED_KINDS.get(type(node), f"{type(node).__name__} expressions are")
    return GenotypeError(f"not a genotype: {kind} not allowed (found {_snippet(ast.unparse(node))!r})")


def _literal(node: ast.AST, depth: int = 0) -> Any:
    """Convert a whitelisted literal node to a Python value; anything else raises without being evaluated."""
    if depth > _MAX_DEPTH:
        raise GenotypeError("not a genotype: literals nested too deeply")
    if isinstance(node, ast.Constant):
        if isinstance(node.value, str) or _is_int(node.value):
            return node.value
        raise GenotypeError(
            f"not a genotype: only strings and integers are allowed (found {_snippet(repr(node.value))})"
        )
    if (
        isinstance(node, ast.UnaryOp)
        and isinstance(node.op, ast.USub)
        and isinstance(node.operand, ast.Constant)
        and _is_int(node.operand.value)
    ):
        return -node.operand.value  # a negative index; validation reports it as out of range
    if isinstance(node, ast.List | ast.Tuple):
        values = [_literal(item, depth + 1) for item in node.elts]
        return values if isinstance(node, ast.List) else tuple(values)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "range":
        if node.keywords or not 1 <= len(node.args) <= 3:
            raise GenotypeError("not a genotype: range() takes 1 to 3 integer arguments")
        bounds = []
        for arg in node.args:
            if not (isinstance(arg, ast.Constant) and _is_int(arg.value)):
                raise GenotypeError(
                    f"not a genotype: range() takes integer constants (found {_snippet(ast.unparse(arg))!r})"
                )
            bounds.append(arg.value)
        if bounds[-1] == 0 and len(bounds) == 3:
            raise GenotypeError("not a genotype: range() step must not be zero")
        span = range(*bounds)
        if len(span) > _MAX_RANGE:
            raise GenotypeError(f"not a genotype: range() too long ({len(span)} items)")
        return list(span)
    raise _reject(node)


def _from_call(call: ast.Call) -> Genotype:
    if not (isinstance(call.func, ast.Name) and call.func.id == "Genotype"):
        if isinstance(call.func, ast.Attribute) and call.func.attr == "Genotype":
            # Qualified names (``genotypes.Genotype(...)``) are rejected: only the printed form is accepted.
            raise GenotypeError(
                f"not a genotype: write Genotype(...) without a qualifier (found {_snippet(ast.unparse(call.func))!r})"
            )
        raise _reject(call)
    if call.args:
        raise GenotypeError("not a genotype: positional arguments are not allowed, use normal=..., reduce=...")
    keys: list[str] = []
    for keyword in call.keywords:
        if keyword.arg is None:
            raise GenotypeError("not a genotype: ** arguments are not allowed")
        if keyword.arg in keys:
            raise GenotypeError(f"not a genotype: keyword {keyword.arg} given twice")
        keys.append(keyword.arg)
    _check_keys(keys)
    values = {keyword.arg: _literal(keyword.value) for keyword in call.keywords}
    return Genotype(**values)


def _from_dict_node(node: ast.Dict) -> Genotype:
    data: dict[str, Any] = {}
    for key, value in zip(node.keys, node.values):
        if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
            raise GenotypeError("not a genotype: dict keys must be the field names as strings")
        data[key.value] = _literal(value)
    return Genotype.from_dict(data)


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BARE_KEYWORDS = re.compile(r"\(?\s*normal\s*=")


def _parse_text(text: str) -> Genotype:
    if not text:
        raise GenotypeError("not a genotype: empty text")
    if text in GENOTYPES:
        return GENOTYPES[text]
    if _IDENTIFIER.fullmatch(text):
        raise GenotypeError(f"unknown genotype name {text!r} (zoo: {', '.join(GENOTYPES)})")
    if text.startswith(("{", "[")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            if text.startswith("["):
                raise GenotypeError(f"not a genotype: invalid JSON ({err.msg} at char {err.pos})") from None
        else:
            return Genotype.from_dict(data)
    if _BARE_KEYWORDS.match(text):
        # The keyword list without the wrapper name: ``normal=[...], ...`` or ``(normal=[...], ...)``.
        text = "Genotype" + text if text.startswith("(") else f"Genotype({text})"
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as err:
        raise GenotypeError(f"not a genotype: syntax error ({err.msg}, line {err.lineno})") from None
    except (ValueError, RecursionError, MemoryError) as err:
        raise GenotypeError(f"not a genotype: cannot be read ({type(err).__name__})") from None
    body = tree.body
    if isinstance(body, ast.Call):
        return _from_call(body)
    if isinstance(body, ast.Dict):
        return _from_dict_node(body)
    raise GenotypeError(f"not a genotype: expected Genotype(...), JSON or a zoo name (found {_snippet(text)!r})")


def parse_genotype(text: str, primitives: Sequence[str] | None = None) -> Genotype:
    """Read a genotype from text without executing it.

    Accepted: the DARTS authors' printed form ``Genotype(normal=[('op', i), ...], normal_concat=[...], ...)``
    (concat as a list or ``range(...)``; the keyword list alone, without ``Genotype``, also works); the per-node
    nested form ``normal=[[('op', i), ('op', j)], ...]`` of the pt.darts reimplementation; JSON from
    :meth:`Genotype.to_json` (flat or nested edges); a Python dict literal of the same; a name in :data:`GENOTYPES`.
    A qualified call such as ``genotypes.Genotype(...)`` is rejected, as is anything that is not a literal.
    With ``primitives``, every op must also be one of them.
    """
    if not isinstance(text, str):
        raise GenotypeError(f"not a genotype: expected text, got {type(text).__name__}")
    if len(text) > _MAX_TEXT:
        raise GenotypeError(f"not a genotype: text too long ({len(text)} characters)")
    genotype = _parse_text(text.strip())
    if primitives is not None:
        genotype.validate(primitives)
    return genotype


# ---------------------------------------------------------------------------------------------------------------
# Deriving a genotype from architecture weights


def _as_weights(alpha: object, name: str, edges: int, primitives: Sequence[str]) -> list[list[float]]:
    """Row-wise softmax of α in float64, after checking it has one row per edge and one column per primitive."""
    if isinstance(alpha, torch.Tensor):
        tensor = alpha.detach().cpu().to(torch.float64)
    else:
        try:
            tensor = torch.as_tensor(alpha, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise GenotypeError(f"{name}: not a numeric array ({_snippet(err)})") from None
    expected = (edges, len(primitives))
    if tuple(tensor.shape) != expected:
        raise GenotypeError(
            f"{name} has shape {tuple(tensor.shape)}, expected {expected} "
            f"({edges} edges x {len(primitives)} primitives)"
        )
    if not bool(torch.isfinite(tensor).all()):
        raise GenotypeError(f"{name} contains NaN or infinite values")
    return torch.softmax(tensor, dim=-1).tolist()


def edge_normalization_weights(beta: torch.Tensor | Sequence[float], nodes: int) -> list[float]:
    """PC-DARTS edge normalization: softmax(β) over each intermediate node's incoming edges (node i has 2 + i)."""
    tensor = torch.as_tensor(beta.detach().cpu() if isinstance(beta, torch.Tensor) else beta, dtype=torch.float64)
    if tuple(tensor.shape) != (sum(node + 2 for node in range(nodes)),):
        raise GenotypeError(f"β has shape {tuple(tensor.shape)}, expected one weight per edge of {nodes} nodes")
    parts, start = [], 0
    for node in range(nodes):
        parts.append(torch.softmax(tensor[start : start + node + 2], dim=0))
        start += node + 2
    return torch.cat(parts).tolist()


def _derive_cell(weights: list[list[float]], primitives: Sequence[str], nodes: int) -> tuple[Edge, ...]:
    candidates = [j for j, op in enumerate(primitives) if op != _NONE]
    cell: list[Edge] = []
    row = 0
    for node in range(nodes):
        scored = []  # (strength, input, op) per incoming edge
        for source in range(node + 2):
            w = weights[row + source]
            # Best non-'none' op; ties go to the earlier primitive.
            best = min(candidates, key=lambda j, w=w: (-w[j], j))
            scored.append((w[best], source, primitives[best]))
        row += node + 2
        # The strongest two edges (ties go to the lower input index), then listed in canonical order: by input.
        strongest = sorted(scored, key=lambda s: (-s[0], s[1]))[:2]
        cell += [(op, source) for _, source, op in sorted(strongest, key=lambda s: (s[1], s[2]))]
    return tuple(cell)


def random_genotype(rng: random.Random, primitives: Sequence[str] = PRIMITIVES, nodes: int = 4) -> Genotype:
    """A cell pair drawn uniformly from the search space, as the paper's random-search baseline draws them.

    Each intermediate node takes two distinct earlier inputs (the cell inputs or earlier nodes), each through an
    op drawn uniformly from ``primitives`` other than 'none'; every node is concatenated. Edges are in canonical
    order, so a random cell compares equal to the same cell found by a search.
    """
    ops = [op for op in primitives if op != _NONE]
    if not ops:
        raise GenotypeError("random cells need at least one primitive other than 'none'")

    def cell() -> list[Edge]:
        edges: list[Edge] = []
        for node in range(nodes):
            for source in rng.sample(range(node + 2), 2):
                edges.append((rng.choice(ops), source))
        return edges

    concat = tuple(range(2, nodes + 2))
    return Genotype(cell(), concat, cell(), concat).canonical()


def random_genotypes(count: int, seed: int, primitives: Sequence[str] = PRIMITIVES, nodes: int = 4) -> list[Genotype]:
    """``count`` random cell pairs from one seeded stream: the same seed gives the same cells, and a longer list
    starts with the shorter one."""
    rng = random.Random(seed)
    return [random_genotype(rng, primitives, nodes) for _ in range(count)]


def count_ops(genotype: Genotype, cell: str, which: str = "parameter_free") -> int:
    """How many of a cell's edges are parameter-free (``which='parameter_free'``) or one named op: the collapse
    signal of DARTS, whose long searches fill the normal cell with skip_connect."""
    edges = genotype.normal if cell == "normal" else genotype.reduce if cell == "reduce" else None
    if edges is None:
        raise ValueError(f"cell must be 'normal' or 'reduce', not {cell!r}")
    if which == "parameter_free":
        return sum(is_parameter_free(op) for op, _ in edges)
    return sum(op == which for op, _ in edges)


def input_name(index: int) -> str:
    """A cell input as the paper names it: ``c_{k-2}``, ``c_{k-1}``, then intermediate nodes ``n0``, ``n1``..."""
    return ("c_{k-2}", "c_{k-1}")[index] if index < 2 else f"n{index - 2}"


def node_formulas(genotype: Genotype, cell: str) -> list[str]:
    """Each intermediate node of a cell as one line, edges in canonical order: ``sep_conv_3x3(c_{k-2}) +
    dil_conv_3x3(n0)``. One cell reads the same wherever it is shown (MLflow params, run notes, summaries)."""
    canonical = genotype.canonical()
    edges = canonical.normal if cell == "normal" else canonical.reduce if cell == "reduce" else None
    if edges is None:
        raise ValueError(f"cell must be 'normal' or 'reduce', not {cell!r}")
    return [" + ".join(f"{op}({input_name(index)})" for op, index in edges[k : k + 2]) for k in range(0, len(edges), 2)]


def cell_markdown(genotype: Genotype) -> str:
    """Both cells as a small Markdown table, one row per node, plus what each cell concatenates."""
    normal, reduce = node_formulas(genotype, "normal"), node_formulas(genotype, "reduce")
    rows = ["| node | normal cell | reduction cell |", "| --- | --- | --- |"]
    rows += [f"| n{i} | {a} | {b} |" for i, (a, b) in enumerate(zip(normal, reduce))]
    concat = [", ".join(input_name(i) for i in sorted(c)) for c in (genotype.normal_concat, genotype.reduce_concat)]
    rows.append(f"| output | concat({concat[0]}) | concat({concat[1]}) |")
    return "\n".join(rows)


def derive_genotype(
    alpha_normal: torch.Tensor | Sequence[Sequence[float]],
    alpha_reduce: torch.Tensor | Sequence[Sequence[float]],
    primitives: Sequence[str],
    nodes: int = 4,
    beta_normal: torch.Tensor | Sequence[float] | None = None,
    beta_reduce: torch.Tensor | Sequence[float] | None = None,
) -> Genotype:
    """Discretise architecture weights as DARTS does: per node, keep the two strongest edges and their best op.

    α rows are edges in node order (node 0: inputs 0, 1; node 1: inputs 0, 1, 2; ...), columns are ``primitives``.
    Each row is softmaxed before ranking, because raw α of different edges are not comparable (a row with a huge
    'none' logit can have a large raw op logit yet a negligible weight). An edge's strength is the softmax weight
    of its best non-'none' op. All intermediate nodes are concatenated. Each node's two edges are listed in
    canonical order (by input, as :meth:`Genotype.canonical`), so one cell has one text wherever it is shown.

    With PC-DARTS edge normalization (``beta_normal``/``beta_reduce``, one β per edge), each edge's softmax(α) row
    is scaled by its softmax(β) weight among the node's inputs before ranking, as in the PC-DARTS authors' code.
    """
    if not _is_int(nodes) or nodes < 1:
        raise GenotypeError(f"nodes must be a positive integer, got {nodes!r}")
    primitives = list(primitives)
    if len(set(primitives)) != len(primitives):
        raise GenotypeError(f"primitives contain duplicates: {', '.join(primitives)}")
    if not any(op != _NONE for op in primitives):
        raise GenotypeError("primitives need at least one operation other than 'none'")
    edges = sum(node + 2 for node in range(nodes))
    normal = _as_weights(alpha_normal, "alpha_normal", edges, primitives)
    reduce = _as_weights(alpha_reduce, "alpha_reduce", edges, primitives)
    for rows, beta in ((normal, beta_normal), (reduce, beta_reduce)):
        if beta is not None:
            for row, scale in zip(rows, edge_normalization_weights(beta, nodes)):
                row[:] = [w * scale for w in row]
    concat = tuple(range(2, nodes + 2))
    return Genotype(
        normal=_derive_cell(normal, primitives, nodes),
        normal_concat=concat,
        reduce=_derive_cell(reduce, primitives, nodes),
        reduce_concat=concat,
    )


# ---------------------------------------------------------------------------------------------------------------
# Published cells, exactly as printed in their sources.

# quark0/darts cnn/genotypes.py: NASNet-A (Zoph et al. 2018) as the DARTS authors transcribed it, 5 nodes. Its
# reduction cell concatenates only nodes 4..6 (nodes 2 and 3 feed later nodes), so concat subsets are allowed.
NASNet = Genotype(
    normal=[
        ("sep_conv_5x5", 1),
        ("sep_conv_3x3", 0),
        ("sep_conv_5x5", 0),
        ("sep_conv_3x3", 0),
        ("avg_pool_3x3", 1),
        ("skip_connect", 0),
        ("avg_pool_3x3", 0),
        ("avg_pool_3x3", 0),
        ("sep_conv_3x3", 1),
        ("skip_connect", 1),
    ],
    normal_concat=[2, 3, 4, 5, 6],
    reduce=[
        ("sep_conv_5x5", 1),
        ("sep_conv_7x7", 0),
        ("max_pool_3x3", 1),
        ("sep_conv_7x7", 0),
        ("avg_pool_3x3", 1),
        ("sep_conv_5x5", 0),
        ("skip_connect", 3),
        ("avg_pool_3x3", 2),
        ("sep_conv_3x3", 2),
        ("max_pool_3x3", 1),
    ],
    reduce_concat=[4, 5, 6],
)

# quark0/darts cnn/genotypes.py. AmoebaNet-A (Real et al. 2019), 5 nodes, concatenating subsets of the nodes.
AmoebaNet = Genotype(
    normal=[
        ("avg_pool_3x3", 0),
        ("max_pool_3x3", 1),
        ("sep_conv_3x3", 0),
        ("sep_conv_5x5", 2),
        ("sep_conv_3x3", 0),
        ("avg_pool_3x3", 3),
        ("sep_conv_3x3", 1),
        ("skip_connect", 1),
        ("skip_connect", 0),
        ("avg_pool_3x3", 1),
    ],
    normal_concat=[4, 5, 6],
    reduce=[
        ("avg_pool_3x3", 0),
        ("sep_conv_3x3", 1),
        ("max_pool_3x3", 0),
        ("sep_conv_7x7", 2),
        ("sep_conv_7x7", 0),
        ("avg_pool_3x3", 1),
        ("max_pool_3x3", 0),
        ("max_pool_3x3", 1),
        ("conv_7x1_1x7", 0),
        ("sep_conv_3x3", 5),
    ],
    reduce_concat=[3, 4, 6],
)

# quark0/darts cnn/genotypes.py: DARTS first order (V1) and second order (V2, the paper's CIFAR-10 cell).
DARTS_V1 = Genotype(
    normal=[
        ("sep_conv_3x3", 1),
        ("sep_conv_3x3", 0),
        ("skip_connect", 0),
        ("sep_conv_3x3", 1),
        ("skip_connect", 0),
        ("sep_conv_3x3", 1),
        ("sep_conv_3x3", 0),
        ("skip_connect", 2),
    ],
    normal_concat=[2, 3, 4, 5],
    reduce=[
        ("max_pool_3x3", 0),
        ("max_pool_3x3", 1),
        ("skip_connect", 2),
        ("max_pool_3x3", 0),
        ("max_pool_3x3", 0),
        ("skip_connect", 2),
        ("skip_connect", 2),
        ("avg_pool_3x3", 0),
    ],
    reduce_concat=[2, 3, 4, 5],
)

DARTS_V2 = Genotype(
    normal=[
        ("sep_conv_3x3", 0),
        ("sep_conv_3x3", 1),
        ("sep_conv_3x3", 0),
        ("sep_conv_3x3", 1),
        ("sep_conv_3x3", 1),
        ("skip_connect", 0),
        ("skip_connect", 0),
        ("dil_conv_3x3", 2),
    ],
    normal_concat=[2, 3, 4, 5],
    reduce=[
        ("max_pool_3x3", 0),
        ("max_pool_3x3", 1),
        ("skip_connect", 2),
        ("max_pool_3x3", 1),
        ("max_pool_3x3", 0),
        ("skip_connect", 2),
        ("skip_connect", 2),
        ("max_pool_3x3", 1),
    ],
    reduce_concat=[2, 3, 4, 5],
)

DARTS = DARTS_V2

# yuhuixu1993/PC-DARTS genotypes.py, ``PC_DARTS_cifar`` (the CIFAR-10 cell of the PC-DARTS paper).
PC_DARTS = Genotype(
    normal=[
        ("sep_conv_3x3", 1),
        ("skip_connect", 0),
        ("sep_conv_3x3", 0),
        ("dil_conv_3x3", 1),
        ("sep_conv_5x5", 0),
        ("sep_conv_3x3", 1),
        ("avg_pool_3x3", 0),
        ("dil_conv_3x3", 1),
    ],
    normal_concat=range(2, 6),
    reduce=[
        ("sep_conv_5x5", 1),
        ("max_pool_3x3", 0),
        ("sep_conv_5x5", 1),
        ("sep_conv_5x5", 2),
        ("sep_conv_3x3", 0),
        ("sep_conv_3x3", 3),
        ("sep_conv_3x3", 1),
        ("sep_conv_3x3", 2),
    ],
    reduce_concat=range(2, 6),
)

# chenxin061/pdarts genotypes.py, ``PDARTS`` (the CIFAR-10 cell of the P-DARTS paper).
PDARTS = Genotype(
    normal=[
        ("skip_connect", 0),
        ("dil_conv_3x3", 1),
        ("skip_connect", 0),
        ("sep_conv_3x3", 1),
        ("sep_conv_3x3", 1),
        ("sep_conv_3x3", 3),
        ("sep_conv_3x3", 0),
        ("dil_conv_5x5", 4),
    ],
    normal_concat=range(2, 6),
    reduce=[
        ("avg_pool_3x3", 0),
        ("sep_conv_5x5", 1),
        ("sep_conv_3x3", 0),
        ("dil_conv_5x5", 2),
        ("max_pool_3x3", 0),
        ("dil_conv_3x3", 1),
        ("dil_conv_3x3", 1),
        ("dil_conv_5x5", 3),
    ],
    reduce_concat=range(2, 6),
)

GENOTYPES: Mapping[str, Genotype] = MappingProxyType(
    {
        "DARTS_V1": DARTS_V1,
        "DARTS_V2": DARTS_V2,
        "DARTS": DARTS,
        "PC_DARTS": PC_DARTS,
        "PDARTS": PDARTS,
        "NASNet": NASNet,
        "AmoebaNet": AmoebaNet,
    }
)
