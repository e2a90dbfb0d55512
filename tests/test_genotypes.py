"""Tests of nas.genotypes: derivation from α, the published text forms, safe parsing, validation and the zoo."""

from __future__ import annotations

import builtins
import contextlib
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nas.genotypes import (
    DARTS,
    DARTS_V1,
    DARTS_V2,
    GENOTYPES,
    PC_DARTS,
    PDARTS,
    AmoebaNet,
    Genotype,
    GenotypeError,
    NASNet,
    cell_markdown,
    count_ops,
    derive_genotype,
    node_formulas,
    parse_genotype,
    random_genotypes,
)
from nas.ops import PRIMITIVES, is_parameter_free

# Lines as printed in the published genotypes.py files (quark0/darts; V1/V2 as also copied verbatim into
# yuhuixu1993/PC-DARTS and chenxin061/pdarts; PC_DARTS_cifar from PC-DARTS; PDARTS from pdarts).
DARTS_V1_TEXT = (
    "Genotype(normal=[('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('skip_connect', 0), ('sep_conv_3x3', 1), "
    "('skip_connect', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('skip_connect', 2)], normal_concat=[2, 3, 4, 5], "
    "reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 0), ('max_pool_3x3', 0), "
    "('skip_connect', 2), ('skip_connect', 2), ('avg_pool_3x3', 0)], reduce_concat=[2, 3, 4, 5])"
)
DARTS_V2_TEXT = (
    "Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1), "
    "('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), ('dil_conv_3x3', 2)], normal_concat=[2, 3, 4, 5], "
    "reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 1), ('max_pool_3x3', 0), "
    "('skip_connect', 2), ('skip_connect', 2), ('max_pool_3x3', 1)], reduce_concat=[2, 3, 4, 5])"
)
PC_DARTS_TEXT = (
    "Genotype(normal=[('sep_conv_3x3', 1), ('skip_connect', 0), ('sep_conv_3x3', 0), ('dil_conv_3x3', 1), "
    "('sep_conv_5x5', 0), ('sep_conv_3x3', 1), ('avg_pool_3x3', 0), ('dil_conv_3x3', 1)], normal_concat=range(2, 6), "
    "reduce=[('sep_conv_5x5', 1), ('max_pool_3x3', 0), ('sep_conv_5x5', 1), ('sep_conv_5x5', 2), ('sep_conv_3x3', 0), "
    "('sep_conv_3x3', 3), ('sep_conv_3x3', 1), ('sep_conv_3x3', 2)], reduce_concat=range(2, 6))"
)
PDARTS_TEXT = (
    "Genotype(normal=[('skip_connect', 0), ('dil_conv_3x3', 1), ('skip_connect', 0),('sep_conv_3x3', 1), "
    "('sep_conv_3x3', 1), ('sep_conv_3x3', 3), ('sep_conv_3x3',0), ('dil_conv_5x5', 4)], normal_concat=range(2, 6), "
    "reduce=[('avg_pool_3x3', 0), ('sep_conv_5x5', 1), ('sep_conv_3x3', 0), ('dil_conv_5x5', 2), ('max_pool_3x3', 0), "
    "('dil_conv_3x3', 1), ('dil_conv_3x3', 1), ('dil_conv_5x5', 3)], reduce_concat=range(2, 6))"
)
# The multi-line layout of quark0/darts cnn/genotypes.py (trailing commas, indentation, spaces around '=').
AMOEBANET_TEXT = """Genotype(
  normal = [
    ('avg_pool_3x3', 0),
    ('max_pool_3x3', 1),
    ('sep_conv_3x3', 0),
    ('sep_conv_5x5', 2),
    ('sep_conv_3x3', 0),
    ('avg_pool_3x3', 3),
    ('sep_conv_3x3', 1),
    ('skip_connect', 1),
    ('skip_connect', 0),
    ('avg_pool_3x3', 1),
    ],
  normal_concat = [4, 5, 6],
  reduce = [
    ('avg_pool_3x3', 0),
    ('sep_conv_3x3', 1),
    ('max_pool_3x3', 0),
    ('sep_conv_7x7', 2),
    ('sep_conv_7x7', 0),
    ('avg_pool_3x3', 1),
    ('max_pool_3x3', 0),
    ('max_pool_3x3', 1),
    ('conv_7x1_1x7', 0),
    ('sep_conv_3x3', 5),
  ],
  reduce_concat = [3, 4, 6]
)"""
NASNET_TEXT = """Genotype(
  normal = [
    ('sep_conv_5x5', 1),
    ('sep_conv_3x3', 0),
    ('sep_conv_5x5', 0),
    ('sep_conv_3x3', 0),
    ('avg_pool_3x3', 1),
    ('skip_connect', 0),
    ('avg_pool_3x3', 0),
    ('avg_pool_3x3', 0),
    ('sep_conv_3x3', 1),
    ('skip_connect', 1),
  ],
  normal_concat = [2, 3, 4, 5, 6],
  reduce = [
    ('sep_conv_5x5', 1),
    ('sep_conv_7x7', 0),
    ('max_pool_3x3', 1),
    ('sep_conv_7x7', 0),
    ('avg_pool_3x3', 1),
    ('sep_conv_5x5', 0),
    ('skip_connect', 3),
    ('avg_pool_3x3', 2),
    ('sep_conv_3x3', 2),
    ('max_pool_3x3', 1),
  ],
  reduce_concat = [4, 5, 6],
)"""

# DARTS_V2 in the per-node nested form printed by the pt.darts reimplementation.
DARTS_V2_NESTED_TEXT = (
    "Genotype(normal=[[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], [('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], "
    "[('sep_conv_3x3', 1), ('skip_connect', 0)], [('skip_connect', 0), ('dil_conv_3x3', 2)]], "
    "normal_concat=range(2, 6), reduce=[[('max_pool_3x3', 0), ('max_pool_3x3', 1)], "
    "[('skip_connect', 2), ('max_pool_3x3', 1)], [('max_pool_3x3', 0), ('skip_connect', 2)], "
    "[('skip_connect', 2), ('max_pool_3x3', 1)]], reduce_concat=range(2, 6))"
)

EDGES_4 = 14  # α rows for 4 nodes: 2 + 3 + 4 + 5


def _alpha(rows: int = EDGES_4, cols: int = len(PRIMITIVES)) -> torch.Tensor:
    return torch.zeros(rows, cols)


def _col(op: str, primitives: tuple[str, ...] = PRIMITIVES) -> int:
    return primitives.index(op)


# ---------------------------------------------------------------------------------------------------------------
# derive_genotype


def test_derive_ranks_edges_by_softmax_not_raw_alpha() -> None:
    alpha = _alpha()
    # Node 1 owns rows 2, 3, 4 (inputs 0, 1, 2).
    alpha[2, _col("none")] = 10.0  # input 0: raw sep_conv logit 5 is the largest, but its softmax weight is ~0.007
    alpha[2, _col("sep_conv_3x3")] = 5.0
    alpha[3, _col("sep_conv_5x5")] = 2.0  # input 1: softmax weight ~0.51
    alpha[4, _col("skip_connect")] = 1.5  # input 2: softmax weight ~0.39
    g = derive_genotype(alpha, _alpha(), PRIMITIVES)
    assert g.normal[2:4] == (("sep_conv_5x5", 1), ("skip_connect", 2))
    # Ranking raw α (the defect this guards against) would have kept input 0.
    raw_best = sorted(range(3), key=lambda s: -alpha[2 + s, 1:].max().item())[:2]
    assert 0 in raw_best


def test_derive_best_op_excludes_none_and_lists_edges_by_input() -> None:
    alpha = _alpha()
    alpha[0, _col("none")] = 9.0
    alpha[0, _col("dil_conv_5x5")] = 1.0
    alpha[1, _col("avg_pool_3x3")] = 3.0
    g = derive_genotype(alpha, _alpha(), PRIMITIVES)
    # Input 1 is stronger (the authors' code writes it first); edges are listed by input, the canonical order, so
    # one cell has one text in every record.
    assert g.normal[:2] == (("dil_conv_5x5", 0), ("avg_pool_3x3", 1))
    assert g == g.canonical()
    assert all(op != "none" for op, _ in g.normal + g.reduce)


def test_derive_concat_covers_all_nodes() -> None:
    g = derive_genotype(_alpha(), _alpha(), PRIMITIVES)
    assert g.normal_concat == (2, 3, 4, 5) and g.reduce_concat == (2, 3, 4, 5)
    g3 = derive_genotype(_alpha(9), _alpha(9), PRIMITIVES, nodes=3)
    assert g3.nodes == 3 and g3.normal_concat == (2, 3, 4)


def test_derive_ties_are_broken_by_input_then_primitive_order() -> None:
    g = derive_genotype(_alpha(), _alpha(), PRIMITIVES)
    expected = (("max_pool_3x3", 0), ("max_pool_3x3", 1)) * 4
    assert g.normal == expected and g.reduce == expected
    # Tie between two ops of one edge: the earlier primitive wins, whatever the op name order.
    alpha = _alpha()
    alpha[0, _col("dil_conv_5x5")] = 2.0
    alpha[0, _col("sep_conv_3x3")] = 2.0
    assert derive_genotype(alpha, _alpha(), PRIMITIVES).normal[0] == ("sep_conv_3x3", 0)
    # Same result on every call and for float32 / float64 / list input.
    again = [derive_genotype(a, _alpha(), PRIMITIVES) for a in (alpha, alpha.double(), alpha.tolist())]
    assert all(x == again[0] for x in again)


def test_derive_reduce_cell_uses_its_own_alpha() -> None:
    reduce = _alpha()
    reduce[EDGES_4 - 1, _col("sep_conv_5x5")] = 4.0  # node 3, input 4
    g = derive_genotype(_alpha(), reduce, PRIMITIVES)
    assert g.reduce[-2:] == (("max_pool_3x3", 0), ("sep_conv_5x5", 4))  # node 3: inputs 0 and 4, by input
    assert g.normal[-2:] == (("max_pool_3x3", 0), ("max_pool_3x3", 1))


def test_derive_without_none_primitive() -> None:
    prims = ("skip_connect", "sep_conv_3x3", "max_pool_3x3")
    alpha = torch.zeros(EDGES_4, 3)
    alpha[4, 1] = 1.0  # node 1, input 2
    alpha[2, 2] = 0.5  # node 1, input 0
    g = derive_genotype(alpha, torch.zeros(EDGES_4, 3), prims)
    assert g.normal[2:4] == (("max_pool_3x3", 0), ("sep_conv_3x3", 2))
    assert g.normal[0] == ("skip_connect", 0)


def test_derive_accepts_tensors_requiring_grad() -> None:
    alpha = torch.zeros(EDGES_4, len(PRIMITIVES), requires_grad=True)
    assert derive_genotype(alpha, alpha, PRIMITIVES).nodes == 4


@pytest.mark.parametrize(
    ("normal", "reduce", "match"),
    [
        (torch.zeros(13, 8), torch.zeros(14, 8), r"alpha_normal has shape \(13, 8\), expected \(14, 8\)"),
        (torch.zeros(14, 8), torch.zeros(14, 7), r"alpha_reduce has shape \(14, 7\), expected \(14, 8\)"),
        (torch.zeros(14 * 8), torch.zeros(14, 8), r"alpha_normal has shape \(112,\)"),
        (torch.full((14, 8), math.nan), torch.zeros(14, 8), r"alpha_normal contains NaN"),
    ],
)
def test_derive_rejects_bad_alpha(normal: torch.Tensor, reduce: torch.Tensor, match: str) -> None:
    with pytest.raises(GenotypeError, match=match):
        derive_genotype(normal, reduce, PRIMITIVES)


def test_derive_rejects_bad_primitives() -> None:
    with pytest.raises(GenotypeError, match="other than 'none'"):
        derive_genotype(torch.zeros(14, 1), torch.zeros(14, 1), ["none"])
    with pytest.raises(GenotypeError, match="unknown operation 'conv_9x9'"):
        derive_genotype(torch.zeros(14, 2), torch.zeros(14, 2), ["none", "conv_9x9"])


# ---------------------------------------------------------------------------------------------------------------
# Text forms


def test_str_of_darts_v2_is_the_authors_text() -> None:
    assert str(DARTS_V2) == DARTS_V2_TEXT
    assert str(DARTS_V1) == DARTS_V1_TEXT


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (DARTS_V1_TEXT, DARTS_V1),
        (DARTS_V2_TEXT, DARTS_V2),
        (PC_DARTS_TEXT, PC_DARTS),
        (PDARTS_TEXT, PDARTS),
        (NASNET_TEXT, NASNet),
        (AMOEBANET_TEXT, AmoebaNet),
    ],
    ids=["DARTS_V1", "DARTS_V2", "PC_DARTS", "PDARTS", "NASNet", "AmoebaNet"],
)
def test_zoo_matches_published_text(text: str, expected: Genotype) -> None:
    assert parse_genotype(text) == expected


def test_parse_nested_form_equals_flat() -> None:
    assert parse_genotype(DARTS_V2_NESTED_TEXT) == DARTS_V2


def test_parse_forms_without_wrapper_and_with_range() -> None:
    inner = DARTS_V2_TEXT.removeprefix("Genotype(").removesuffix(")")
    assert parse_genotype(inner) == DARTS_V2
    assert parse_genotype("(" + inner + ")") == DARTS_V2
    assert parse_genotype(DARTS_V2_TEXT.replace("[2, 3, 4, 5]", "range(2, 6)")) == DARTS_V2
    assert parse_genotype("  " + DARTS_V2_TEXT + "  # trailing comment\n") == DARTS_V2
    assert parse_genotype(repr(DARTS_V2)) == DARTS_V2  # the dataclass repr uses tuples
    assert parse_genotype(str(DARTS_V2.to_dict())) == DARTS_V2  # a printed dict


def test_parse_zoo_name() -> None:
    assert parse_genotype("DARTS") is DARTS_V2
    assert parse_genotype(" PC_DARTS\n") is PC_DARTS
    with pytest.raises(GenotypeError, match=r"unknown genotype name 'DARTS_V3' \(zoo: DARTS_V1, "):
        parse_genotype("DARTS_V3")


@pytest.mark.parametrize("name", list(GENOTYPES))
def test_zoo_round_trips(name: str) -> None:
    g = GENOTYPES[name]
    g.validate()
    assert parse_genotype(str(g)) == g
    assert parse_genotype(g.to_json()) == g
    assert Genotype.from_dict(json.loads(g.to_json())) == g
    assert hash(parse_genotype(str(g))) == hash(g)


def test_json_form() -> None:
    data = json.loads(DARTS_V2.to_json())
    assert list(data) == ["normal", "normal_concat", "reduce", "reduce_concat"]
    assert data["normal"][0] == ["sep_conv_3x3", 0]
    assert data["normal_concat"] == [2, 3, 4, 5]
    assert DARTS_V2.to_json() == DARTS_V2.to_json()
    nested = {**data, "normal": [data["normal"][k : k + 2] for k in range(0, 8, 2)]}
    assert parse_genotype(json.dumps(nested)) == DARTS_V2


def test_constructor_normalises_to_tuples() -> None:
    g = Genotype(
        normal=[["sep_conv_3x3", 0], ["skip_connect", 1]],
        normal_concat=range(2, 3),
        reduce=[[("max_pool_3x3", 0), ("max_pool_3x3", 1)]],
        reduce_concat=[2],
    )
    assert g.normal == (("sep_conv_3x3", 0), ("skip_connect", 1))
    assert g.reduce == (("max_pool_3x3", 0), ("max_pool_3x3", 1))
    assert g.normal_concat == (2,) and g.reduce_concat == (2,)
    assert g.nodes == 1
    assert {g: 1}[g] == 1
    with pytest.raises(AttributeError):
        g.normal = ()  # type: ignore[misc]


def test_parse_checks_primitives() -> None:
    assert parse_genotype(DARTS_V2_TEXT, primitives=PRIMITIVES) == DARTS_V2
    with pytest.raises(GenotypeError, match="operation 'sep_conv_7x7' in reduce cell is not among the primitives"):
        parse_genotype("NASNet", primitives=PRIMITIVES)
    with pytest.raises(GenotypeError, match="not among the primitives"):
        AmoebaNet.validate(PRIMITIVES)


# ---------------------------------------------------------------------------------------------------------------
# Code in the text is rejected and never run

_VALID_REST = "normal_concat=[2, 3, 4, 5], reduce=[], reduce_concat=[2, 3, 4, 5]"
_TOUCH = "__import__('pathlib').Path(PATH).touch()"
_OPEN = "open(PATH, 'w')"

# (id, template, how to evaluate it to prove the payload is live: "eval", "wrap" (inside Genotype(...)), None)
MALICIOUS = [
    ("keyword-value", f"Genotype(normal={_TOUCH}, {_VALID_REST})", "eval"),
    ("inside-edge", f"Genotype(normal=[('sep_conv_3x3', {_TOUCH})], {_VALID_REST})", "eval"),
    (
        "inside-range",
        f"Genotype(normal=[], normal_concat=range(len({_OPEN}.name)), reduce=[], reduce_concat=[2])",
        "eval",
    ),
    ("f-string", 'Genotype(normal=[(f"{' + _OPEN + '}", 0)], ' + _VALID_REST + ")", "eval"),
    ("lambda", f"Genotype(normal=(lambda: {_TOUCH})(), {_VALID_REST})", "eval"),
    ("comprehension", f"Genotype(normal=[{_TOUCH} for _ in [0]], {_VALID_REST})", "eval"),
    ("subscript", f"Genotype(normal=[{_TOUCH}][0], {_VALID_REST})", "eval"),
    ("walrus", f"Genotype(normal=(x := {_TOUCH}), {_VALID_REST})", "eval"),
    ("conditional", f"Genotype(normal=[] if {_TOUCH} else [], {_VALID_REST})", "eval"),
    ("operator", f"Genotype(normal=[] + [{_TOUCH}], {_VALID_REST})", "eval"),
    ("double-star", f"Genotype(normal=[], **{{'x': {_TOUCH}}})", "eval"),
    ("positional", f"Genotype({_TOUCH})", "eval"),
    ("top-level-call", _TOUCH, "eval"),
    ("qualified-genotype", f"genotypes.Genotype(normal={_TOUCH}, {_VALID_REST})", "eval"),
    ("other-callee", f"dict(normal={_TOUCH})", "eval"),
    ("attribute-callee", f"Genotype.__class__(normal={_TOUCH}, {_VALID_REST})", "eval"),
    ("dict-literal", f"{{'normal': {_TOUCH}}}", "eval"),
    ("no-wrapper", f"normal={_TOUCH}, {_VALID_REST}", "wrap"),
    ("statement", f"DARTS; {_TOUCH}", None),
    (
        "range-with-call",
        f"Genotype(normal=[], normal_concat=range({_TOUCH} or 1), reduce=[], reduce_concat=[2])",
        "eval",
    ),
]


def _render(template: str, path: object) -> str:
    return template.replace("PATH", repr(str(path)))


@pytest.mark.parametrize(("template", "live"), [m[1:] for m in MALICIOUS], ids=[m[0] for m in MALICIOUS])
def test_code_in_text_is_rejected_and_not_run(tmp_path: Path, template: str, live: str | None) -> None:
    target = tmp_path / "pwned"
    with pytest.raises(GenotypeError) as excinfo:
        parse_genotype(_render(template, target))
    assert not target.exists()
    message = str(excinfo.value)
    assert "\n" not in message and message


@pytest.mark.parametrize(
    ("template", "live"), [m[1:] for m in MALICIOUS if m[2]], ids=[m[0] for m in MALICIOUS if m[2]]
)
def test_malicious_payloads_are_live(tmp_path: Path, template: str, live: str) -> None:
    """Guard for the test above: each payload really creates the file when Python evaluates it."""
    target = tmp_path / "live"
    text = _render(template, target)
    if live == "wrap":
        text = f"Genotype({text})"

    def fake_genotype(*args: object, **kwargs: object) -> None:
        return None

    namespace = {
        "Genotype": fake_genotype,
        "genotypes": SimpleNamespace(Genotype=fake_genotype),
        "__builtins__": builtins,
    }
    # Deliberately runs our own fixed payload; its side effect happens before any later error.
    with contextlib.suppress(Exception):
        eval(text, namespace)
    assert target.exists()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (f"Genotype(normal={_TOUCH}, {_VALID_REST})", r"calls are not allowed \(found \"__import__\('pathlib'\)"),
        (f"Genotype(normal=[os.sep], {_VALID_REST})", r"attribute access is not allowed \(found 'os.sep'\)"),
        (f"Genotype(normal=[x], {_VALID_REST})", r"names are not allowed \(found 'x'\)"),
        (f"Genotype(normal=lambda: 0, {_VALID_REST})", "lambdas are not allowed"),
        (f"Genotype(normal=[0][0], {_VALID_REST})", "subscripts are not allowed"),
        (f"Genotype(normal=[(f'{{1}}', 0)], {_VALID_REST})", "f-strings are not allowed"),
        (f"Genotype(normal=[i for i in []], {_VALID_REST})", "comprehensions are not allowed"),
        (f"Genotype(normal=[('sep_conv_3x3', 0.5)], {_VALID_REST})", "only strings and integers are allowed"),
        ("__import__('os')", r"calls are not allowed \(found '__import__'\)"),
        ("genotypes.Genotype()", "without a qualifier"),
        ("Genotype(", "syntax error"),
        ("[1, 2", "invalid JSON"),
        ("42", r"expected Genotype\(...\), JSON or a zoo name"),
        ("  \n", r"^not a genotype: empty text$"),
    ],
)
def test_rejection_messages(text: str, match: str) -> None:
    with pytest.raises(GenotypeError, match=match):
        parse_genotype(text)


def test_string_constants_are_only_names() -> None:
    text = _text("[(\"__import__('os').system('true')\", 0), ('skip_connect', 1)]", "[2]")
    with pytest.raises(GenotypeError, match=r"unknown operation \"__import__"):
        parse_genotype(text)


def test_huge_range_is_refused() -> None:
    with pytest.raises(GenotypeError, match=r"range\(\) takes integer constants"):
        parse_genotype("Genotype(normal=[], normal_concat=range(10**12), reduce=[], reduce_concat=[2])")
    with pytest.raises(GenotypeError, match=r"range\(\) too long"):
        parse_genotype("Genotype(normal=[], normal_concat=range(1000000000000), reduce=[], reduce_concat=[2])")


# ---------------------------------------------------------------------------------------------------------------
# Validation


def _text(normal: str, normal_concat: str = "[2, 3, 4, 5]") -> str:
    """The authors' text form with the given normal cell and DARTS_V2's reduce cell."""
    reduce = str(list(DARTS_V2.reduce))
    return f"Genotype(normal={normal}, normal_concat={normal_concat}, reduce={reduce}, reduce_concat=[2, 3, 4, 5])"


_GOOD = [list(e) for e in DARTS_V2.normal]


def _flat(edges: list[list[object]]) -> str:
    return "[" + ", ".join(f"({op!r}, {i!r})" for op, i in edges) + "]"


def _with(k: int, op: object, index: object) -> str:
    edges = [list(e) for e in _GOOD]
    edges[k] = [op, index]
    return _flat(edges)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (_text(_with(0, "foo", 0)), r"^unknown operation 'foo' in normal cell \(known: max_pool_3x3, avg_pool_3x3, "),
        (_text(_with(0, "none", 0)), r"^normal cell node 0: operation 'none' is not allowed"),
        (_text(_with(4, "sep_conv_3x3", 5)), r"^normal cell node 2: input index 5 out of range \(0\.\.3\)$"),
        (_text(_with(1, "sep_conv_3x3", -1)), r"^normal cell node 0: input index -1 out of range \(0\.\.1\)$"),
        (_text(_flat(_GOOD[:7])), r"^normal cell: 7 edge\(s\), expected 2 per node"),
        (_text("[]"), r"^normal cell: no edges$"),
        (_text(_flat(_GOOD), "[1, 2]"), r"^normal_concat: index 1 out of range \(2\.\.5\)$"),
        (_text(_flat(_GOOD), "[2, 6]"), r"^normal_concat: index 6 out of range \(2\.\.5\)$"),
        (_text(_flat(_GOOD), "[2, 3, 3]"), r"^normal_concat: index 3 listed twice$"),
        (_text(_flat(_GOOD), "[]"), r"^normal_concat: empty"),
        (_text(_flat(_GOOD[:6]), "[2, 3, 4]"), r"^reduce cell has 4 nodes but normal cell has 3"),
        (_text("[('sep_conv_3x3', 0, 1), ('sep_conv_3x3', 1)]"), r"^normal cell edge 0: expected \(op name, input"),
        (
            _text("[('sep_conv_3x3', True), ('sep_conv_3x3', 1)]"),
            r"only strings and integers are allowed \(found True\)",
        ),
    ],
)
def test_validation_errors(text: str, match: str) -> None:
    with pytest.raises(GenotypeError, match=match) as excinfo:
        parse_genotype(text)
    assert "\n" not in str(excinfo.value)


def test_nested_form_needs_two_edges_per_node() -> None:
    text = DARTS_V2_NESTED_TEXT.replace(
        "reduce=[[('max_pool_3x3', 0), ('max_pool_3x3', 1)], [('skip_connect', 2), ('max_pool_3x3', 1)]",
        "reduce=[[('max_pool_3x3', 0), ('max_pool_3x3', 1)], [('skip_connect', 2), ('max_pool_3x3', 1), "
        "('avg_pool_3x3', 0)]",
    )
    assert text != DARTS_V2_NESTED_TEXT
    with pytest.raises(GenotypeError, match=r"^reduce cell: node 1 has 3 edges, expected 2$"):
        parse_genotype(text)
    mixed = "Genotype(normal=[[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], ('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], "
    with pytest.raises(GenotypeError, match="mixes per-node edge lists with flat edges"):
        parse_genotype(mixed + "normal_concat=[2, 3], reduce=[], reduce_concat=[2])")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (DARTS_V2_TEXT.replace(", reduce_concat=[2, 3, 4, 5]", ""), r"missing keyword\(s\) reduce_concat$"),
        (DARTS_V2_TEXT.replace("normal_concat=[2, 3, 4, 5], ", ""), r"missing keyword\(s\) normal_concat$"),
        (DARTS_V2_TEXT.replace(")]", ")], extra=[2]", 1), r"unexpected keyword\(s\) extra$"),
        (
            DARTS_V2_TEXT.replace("Genotype(", "Genotype(normal_concat=[2], ", 1),
            "keyword argument repeated|given twice",
        ),
        (json.dumps({"normal": [["sep_conv_3x3", 0]]}), r"missing keyword\(s\) normal_concat, reduce, reduce_concat$"),
        (json.dumps({**DARTS_V2.to_dict(), "aux": 1}), r"unexpected keyword\(s\) aux$"),
    ],
)
def test_keyword_errors(text: str, match: str) -> None:
    with pytest.raises(GenotypeError, match=match):
        parse_genotype(text)


def test_constructor_validates() -> None:
    with pytest.raises(GenotypeError, match="input index 2 out of range"):
        Genotype(
            normal=[("sep_conv_3x3", 0), ("sep_conv_3x3", 2)],
            normal_concat=[2],
            reduce=DARTS.reduce[:2],
            reduce_concat=[2],
        )
    with pytest.raises(GenotypeError, match="normal_concat: expected a list of node indices"):
        Genotype(normal=DARTS.normal, normal_concat="2345", reduce=DARTS.reduce, reduce_concat=[2])  # type: ignore[arg-type]
    with pytest.raises(GenotypeError, match=r"normal cell edge 1: expected \(op name, input index\)"):
        Genotype(
            normal=[("sep_conv_3x3", 0), ("sep_conv_3x3", True)],
            normal_concat=[2],
            reduce=DARTS.reduce[:2],
            reduce_concat=[2],
        )
    assert issubclass(GenotypeError, ValueError)


# ---------------------------------------------------------------------------------------------------------------
# Zoo and canonical form


def test_zoo_contents() -> None:
    assert set(GENOTYPES) == {"DARTS_V1", "DARTS_V2", "DARTS", "PC_DARTS", "PDARTS", "NASNet", "AmoebaNet"}
    assert GENOTYPES["DARTS"] is DARTS_V2 and DARTS is DARTS_V2
    assert DARTS_V1 != DARTS_V2
    assert NASNet.nodes == 5 and AmoebaNet.nodes == 5
    assert NASNet.reduce_concat == (4, 5, 6) and AmoebaNet.reduce_concat == (3, 4, 6)
    with pytest.raises(TypeError):
        GENOTYPES["X"] = DARTS  # type: ignore[index]
    for name in ("DARTS_V1", "DARTS_V2", "PC_DARTS", "PDARTS"):
        GENOTYPES[name].validate(PRIMITIVES)


@pytest.mark.parametrize("name", list(GENOTYPES))
def test_canonical_equality_and_hash(name: str) -> None:
    g = GENOTYPES[name]
    swapped = Genotype(
        normal=[e for k in range(0, len(g.normal), 2) for e in (g.normal[k + 1], g.normal[k])],
        normal_concat=list(reversed(g.normal_concat)),
        reduce=[e for k in range(0, len(g.reduce), 2) for e in (g.reduce[k + 1], g.reduce[k])],
        reduce_concat=list(reversed(g.reduce_concat)),
    )
    assert swapped.canonical() == g.canonical()
    assert hash(swapped.canonical()) == hash(g.canonical())
    assert g.canonical().canonical() == g.canonical()
    for k in range(0, len(g.normal), 2):
        a, b = g.canonical().normal[k : k + 2]
        assert (a[1], a[0]) <= (b[1], b[0])


def test_canonical_distinguishes_different_cells() -> None:
    assert DARTS_V1.canonical() != DARTS_V2.canonical()
    assert len({g.canonical() for g in (DARTS_V1, DARTS_V2, PC_DARTS, PDARTS, NASNet, AmoebaNet)}) == 6
    # DARTS_V1 writes node 0 as (input 1, input 0); the canonical form sorts it, the original does not equal it.
    assert DARTS_V1.canonical().normal[:2] == (("sep_conv_3x3", 0), ("sep_conv_3x3", 1))
    assert DARTS_V1.canonical() != DARTS_V1


# --------------------------------------------------------------------------------------------------- random cells


def test_random_cells_are_valid_reproducible_and_never_none() -> None:
    cells = random_genotypes(200, seed=7)
    assert cells == random_genotypes(200, seed=7) and cells[:50] == random_genotypes(50, seed=7)
    assert cells != random_genotypes(200, seed=8)
    for genotype in cells:
        genotype.validate(PRIMITIVES)  # registered ops, inputs that exist, every node concatenated
        assert genotype == genotype.canonical() and genotype.normal_concat == (2, 3, 4, 5)
        for edges in (genotype.normal, genotype.reduce):
            assert all(op != "none" for op, _ in edges)
            for node in range(4):  # two distinct earlier inputs per node
                (_, a), (_, b) = edges[2 * node : 2 * node + 2]
                assert a != b and max(a, b) <= node + 1
    three_nodes = random_genotypes(5, seed=1, primitives=("none", "skip_connect", "sep_conv_3x3"), nodes=3)
    assert {op for g in three_nodes for op, _ in g.normal + g.reduce} <= {"skip_connect", "sep_conv_3x3"}
    assert all(g.nodes == 3 for g in three_nodes)
    with pytest.raises(GenotypeError, match="other than 'none'"):
        random_genotypes(1, seed=0, primitives=("none",))


def test_random_cells_are_uniform_over_ops_and_inputs() -> None:
    """Chi-square against the uniform law: ops over the 7 non-'none' primitives, node 3's input pairs over the 10
    pairs of its 5 possible inputs; a bias of a few percent fails at this sample size."""
    from scipy.stats import chisquare

    cells = random_genotypes(3000, seed=0)
    ops = [op for g in cells for op, _ in g.normal + g.reduce]
    counts = [ops.count(op) for op in PRIMITIVES if op != "none"]
    assert chisquare(counts).pvalue > 1e-3
    pairs = [tuple(sorted(i for _, i in g.normal[6:8])) for g in cells]
    pair_counts = [pairs.count((a, b)) for a in range(5) for b in range(a + 1, 5)]
    assert len(pair_counts) == 10 and chisquare(pair_counts).pvalue > 1e-3
    first_node = [tuple(sorted(i for _, i in g.reduce[0:2])) for g in cells]
    assert set(first_node) == {(0, 1)}  # node 0 has only the two cell inputs


def test_count_ops_counts_parameter_free_edges_and_named_ops() -> None:
    assert {op for op in PRIMITIVES if is_parameter_free(op)} == {
        "none",
        "max_pool_3x3",
        "avg_pool_3x3",
        "skip_connect",
    }
    assert count_ops(DARTS_V2, "normal") == 2 and count_ops(DARTS_V2, "normal", "skip_connect") == 2
    assert count_ops(DARTS_V2, "reduce") == 8 and count_ops(DARTS_V2, "reduce", "max_pool_3x3") == 5
    with pytest.raises(ValueError, match="'normal' or 'reduce'"):
        count_ops(DARTS_V2, "both")


def test_node_formulas_and_the_cell_table_read_one_node_per_line_in_canonical_order() -> None:
    flipped = Genotype(
        normal=[(op, i) for k in range(0, 8, 2) for op, i in reversed(DARTS_V2.normal[k : k + 2])],
        normal_concat=DARTS_V2.normal_concat,
        reduce=DARTS_V2.reduce,
        reduce_concat=DARTS_V2.reduce_concat,
    )
    assert flipped != DARTS_V2
    assert node_formulas(flipped, "normal") == node_formulas(DARTS_V2, "normal")
    assert node_formulas(DARTS_V2, "normal")[3] == "skip_connect(c_{k-2}) + dil_conv_3x3(n0)"
    assert node_formulas(DARTS_V2, "reduce")[1] == "max_pool_3x3(c_{k-1}) + skip_connect(n0)"
    table = cell_markdown(DARTS_V2).splitlines()
    assert len(table) == 2 + DARTS_V2.nodes + 1
    assert table[2].startswith("| n0 | sep_conv_3x3(c_{k-2}) + sep_conv_3x3(c_{k-1}) | max_pool_3x3(c_{k-2})")
    assert table[-1] == "| output | concat(n0, n1, n2, n3) | concat(n0, n1, n2, n3) |"
    with pytest.raises(ValueError, match="normal' or 'reduce"):
        node_formulas(DARTS_V2, "both")
