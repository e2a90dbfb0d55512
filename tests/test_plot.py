"""Tests of nas.plot and nas.artifacts: cell DAG pictures, softmax(α) heatmaps, their atomic PNG files, and the
search's other files (genotype, history, checkpoints)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch

from nas.artifacts import save_epoch_pictures, save_search_outputs, save_torch_atomic, write_json, write_text_atomic
from nas.genotypes import GENOTYPES, Genotype, parse_genotype
from nas.ops import PRIMITIVES
from nas.plot import (
    alpha_figure,
    alpha_row_labels,
    cell_figure,
    cells_figure,
    save_alpha_heatmap,
    save_cell,
    save_cells,
)
from nas.search import SearchEpoch

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Five intermediate nodes with a chain, repeated inputs and a concat subset (nodes 0 and 1 feed only other nodes).
FIVE_NODES = Genotype(
    normal=(
        ("sep_conv_3x3", 0),
        ("sep_conv_5x5", 1),
        ("dil_conv_3x3", 2),
        ("skip_connect", 1),
        ("avg_pool_3x3", 3),
        ("sep_conv_3x3", 0),
        ("max_pool_3x3", 4),
        ("dil_conv_5x5", 2),
        ("sep_conv_3x3", 5),
        ("skip_connect", 0),
    ),
    normal_concat=(2, 3, 4, 5, 6),
    reduce=(
        ("max_pool_3x3", 0),
        ("max_pool_3x3", 1),
        ("skip_connect", 2),
        ("max_pool_3x3", 0),
        ("dil_conv_5x5", 3),
        ("sep_conv_5x5", 0),
        ("skip_connect", 4),
        ("avg_pool_3x3", 1),
        ("sep_conv_3x3", 5),
        ("dil_conv_3x3", 1),
    ),
    reduce_concat=(4, 5, 6),
)

CASES = [
    pytest.param(GENOTYPES["DARTS_V2"], id="DARTS_V2"),
    pytest.param(FIVE_NODES, id="five_nodes"),
    pytest.param(GENOTYPES["NASNet"], id="NASNet"),
]


def _op_texts(fig: Figure) -> Counter[str]:
    ops = set(PRIMITIVES) | {op for op, _ in GENOTYPES["NASNet"].normal + GENOTYPES["NASNet"].reduce}
    return Counter(t.get_text() for ax in fig.axes for t in ax.texts if t.get_text() in ops)


def _read_png(path: Path) -> np.ndarray:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert image.shape[0] >= 200 and image.shape[1] >= 200
    assert float(image[..., :3].var()) > 0, "image is blank"
    return image


@pytest.mark.parametrize("genotype", CASES)
@pytest.mark.parametrize("cell", ["normal", "reduce"])
def test_cell_figure_labels_every_edge_and_node(genotype: Genotype, cell: str) -> None:
    edges = getattr(genotype, cell)
    concat = getattr(genotype, f"{cell}_concat")
    n = len(edges) // 2
    fig = cell_figure(genotype, cell)  # type: ignore[arg-type]
    assert len(fig.axes) == 1
    ax = fig.axes[0]

    # One label per edge, each with its own op name (duplicates counted).
    assert _op_texts(fig) == Counter(op for op, _ in edges)
    assert sum(t.get_gid() == "edge-label" for t in ax.texts) == len(edges)
    texts = {t.get_text() for t in ax.texts}
    assert {"$c_{k-2}$", "$c_{k-1}$", "$c_{k}$"} <= texts
    assert {str(i) for i in range(n)} <= texts
    # An arrow per edge plus one from each concatenated node into c_{k}.
    assert sum(isinstance(p, FancyArrowPatch) for p in ax.patches) == len(edges) + len(concat)
    assert ax.get_title() == {"normal": "normal cell", "reduce": "reduction cell"}[cell]


def test_cell_figure_title_and_bad_cell() -> None:
    fig = cell_figure(GENOTYPES["DARTS_V2"], "reduce", title="best cell")
    assert fig.axes[0].get_title() == "best cell"
    with pytest.raises(ValueError, match="normal' or 'reduce"):
        cell_figure(GENOTYPES["DARTS_V2"], "both")  # type: ignore[arg-type]


def test_edge_labels_do_not_overlap() -> None:
    for genotype in (GENOTYPES["DARTS_V2"], FIVE_NODES, GENOTYPES["NASNet"], GENOTYPES["AmoebaNet"]):
        fig = cells_figure(genotype)
        fig.canvas.draw()  # lays out the label boxes
        for ax in fig.axes[:2]:
            boxes = [t.get_bbox_patch().get_window_extent() for t in ax.texts if t.get_gid() == "edge-label"]
            assert len(boxes) == len(genotype.normal) and all(b.width > 20 for b in boxes)
            for i, a in enumerate(boxes):
                for b in boxes[i + 1 :]:
                    assert not a.overlaps(b), f"edge labels overlap in {ax.get_title()}"


@pytest.mark.parametrize("genotype", CASES)
def test_save_cells_writes_png(genotype: Genotype, tmp_path: Path) -> None:
    fig = cells_figure(genotype, title="epoch 3")
    assert [ax.get_title() for ax in fig.axes] == ["normal cell", "reduction cell"]
    assert _op_texts(fig) == Counter(op for op, _ in genotype.normal + genotype.reduce)

    path = save_cells(genotype, tmp_path / "deep" / "cells" / "epoch_003.png", title="epoch 3")
    assert path == tmp_path / "deep" / "cells" / "epoch_003.png"
    image = _read_png(path)
    assert image.shape[1] > image.shape[0], "cells should sit side by side"
    assert [p.name for p in path.parent.iterdir()] == ["epoch_003.png"], "temp files left behind"
    # Same permissions as any file this process creates (a private temp-file mode must not leak through).
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_save_cell_writes_png(tmp_path: Path) -> None:
    path = save_cell(GENOTYPES["DARTS_V2"], "normal", str(tmp_path / "normal.png"))
    assert isinstance(path, Path)
    _read_png(path)


def test_failed_save_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_cells(GENOTYPES["DARTS_V2"], tmp_path / "cells.png")
    before = path.read_bytes()

    def broken_savefig(self: Figure, fname: object, **kwargs: object) -> None:
        fname.write(b"\x89PNG half")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        save_cells(GENOTYPES["DARTS_V2"], path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["cells.png"]


def _images(fig: Figure) -> list[np.ndarray]:
    """The softmax weights each heatmap draws (its colours are the weights relative to uniform, 1/|ops|)."""
    return [np.asarray(ax.images[0].get_array()) / len(PRIMITIVES) for ax in fig.axes if ax.images]


@pytest.mark.parametrize("rows", [14, 20])
def test_alpha_figure_shows_rowwise_softmax(rows: int) -> None:
    torch.manual_seed(rows)
    alpha_normal = (3 * torch.randn(rows, len(PRIMITIVES))).requires_grad_()
    alpha_reduce = 3 * torch.randn(rows, len(PRIMITIVES))
    fig = alpha_figure(alpha_normal, alpha_reduce, PRIMITIVES, title="epoch 1")

    images = _images(fig)
    assert len(images) == 2
    for image, alpha in zip(images, (alpha_normal, alpha_reduce)):
        expected = torch.softmax(alpha.detach().double(), dim=-1).numpy()
        assert image.shape == expected.shape
        np.testing.assert_allclose(image, expected, atol=1e-6, rtol=0)
    n = {14: 4, 20: 5}[rows]
    heat = [ax for ax in fig.axes if ax.images]
    for ax, image in zip(heat, images):
        assert [t.get_text() for t in ax.get_yticklabels()] == alpha_row_labels(n)
        assert [t.get_text() for t in ax.get_xticklabels()] == list(PRIMITIVES)
        assert sorted(t.get_text() for t in ax.texts) == sorted(f"{v:.2f}" for v in image.ravel())
    assert len(fig.axes) == 3, "two heatmaps and a colorbar"
    # one colour scale for both cells, centred on uniform: above-uniform weights red, below blue
    norms = {id(ax.images[0].norm) for ax in heat}
    assert len(norms) == 1
    norm = heat[0].images[0].norm
    assert norm.vmin < 1 < norm.vmax and norm.vmin * norm.vmax == pytest.approx(1.0)


def test_alpha_colours_resolve_weights_close_to_uniform() -> None:
    """Early in a search every weight is close to 1/|ops|: the scale spans what is there, not 0 to 1."""
    alpha = 0.05 * torch.randn(14, len(PRIMITIVES), generator=torch.Generator().manual_seed(0))
    fig = alpha_figure(alpha, alpha, PRIMITIVES)
    ax = next(ax for ax in fig.axes if ax.images)
    colours = ax.images[0].to_rgba(ax.images[0].get_array())
    weights = torch.softmax(alpha.double(), -1).numpy()
    low, high = np.unravel_index(weights.argmin(), weights.shape), np.unravel_index(weights.argmax(), weights.shape)
    assert weights.max() - weights.min() < 0.05
    assert np.abs(colours[low][:3] - colours[high][:3]).max() > 0.5, "the weakest and strongest op look alike"


def test_alpha_row_labels() -> None:
    labels = alpha_row_labels(4)
    assert len(labels) == 14
    assert labels[:5] == ["n0←c_{k-2}", "n0←c_{k-1}", "n1←c_{k-2}", "n1←c_{k-1}", "n1←n0"]
    assert labels[-1] == "n3←n2"


def test_alpha_figure_accepts_numpy(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    alpha = rng.normal(size=(14, 8)).astype(np.float32)
    fig = alpha_figure(alpha, alpha * 2, PRIMITIVES)
    np.testing.assert_allclose(
        _images(fig)[1], torch.softmax(torch.from_numpy(alpha * 2).double(), -1).numpy(), atol=1e-6, rtol=0
    )
    path = save_alpha_heatmap(alpha, alpha, PRIMITIVES, tmp_path / "alpha" / "epoch_001.png", title="epoch 1")
    _read_png(path)


@pytest.mark.parametrize(
    ("normal_shape", "reduce_shape"),
    [((13, 8), (14, 8)), ((14, 7), (14, 8)), ((14, 8), (15, 8)), ((14,), (14, 8)), ((2, 14, 8), (14, 8))],
)
def test_alpha_bad_shape_raises(normal_shape: tuple[int, ...], reduce_shape: tuple[int, ...], tmp_path: Path) -> None:
    # The message must come from the shape check (naming the argument), not from matplotlib failing later on.
    with pytest.raises(ValueError, match=r"^alpha_(normal|reduce) ") as info:
        alpha_figure(torch.zeros(normal_shape), torch.zeros(reduce_shape), PRIMITIVES)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError):
        save_alpha_heatmap(torch.zeros(normal_shape), torch.zeros(reduce_shape), PRIMITIVES, tmp_path / "a.png")
    assert not any(tmp_path.iterdir())


def test_alpha_with_nan_still_draws() -> None:
    alpha = torch.randn(14, 8)
    alpha[3, 2] = float("nan")
    assert len(_images(alpha_figure(alpha, torch.randn(14, 8), PRIMITIVES))) == 2


def test_no_pyplot_import(tmp_path: Path) -> None:
    """Worker processes must not get pyplot's global state (or a GUI backend) from this module."""
    code = (
        "import sys, torch\n"
        "from nas.genotypes import GENOTYPES\n"
        "from nas.plot import save_cells, save_alpha_heatmap\n"
        "save_cells(GENOTYPES['DARTS_V2'], sys.argv[1] + '/c.png')\n"
        "save_alpha_heatmap(torch.zeros(14, 8), torch.zeros(14, 8), list('abcdefgh'), sys.argv[1] + '/a.png')\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "c.png"]


# --------------------------------------------------------------------------------------------------- nas.artifacts


def _report(epoch: int) -> SearchEpoch:
    alpha = torch.randn(14, 8, generator=torch.Generator().manual_seed(epoch)).tolist()
    numbers = dict(train_loss=2.0, train_acc=0.3, val_loss=2.1, val_acc=0.25, alpha_entropy_normal=2.07)
    numbers |= dict(alpha_entropy_reduce=2.06, lr=0.025, xi=0.0, epoch_seconds=1.5, images_per_second=float("nan"))
    return SearchEpoch(
        epoch=epoch,
        **numbers,
        second_order_steps=0,
        parameter_free_normal=2,
        parameter_free_reduce=4,
        skip_weight_normal=0.2,
        skip_weight_reduce=float("nan"),
        genotype=GENOTYPES["DARTS_V2"],
        alpha_normal=alpha,
        alpha_reduce=alpha,
    )


def test_search_outputs_hold_the_records_as_dumped(tmp_path: Path) -> None:
    history = [_report(1), _report(2)]
    paths = save_search_outputs(tmp_path, GENOTYPES["DARTS_V2"], history)
    assert [p.name for p in paths] == ["genotype.json", "genotype.txt", "history.json"]
    assert parse_genotype((tmp_path / "genotype.txt").read_text()) == GENOTYPES["DARTS_V2"]
    rows = json.loads((tmp_path / "history.json").read_text())
    assert [row["epoch"] for row in rows] == [1, 2] and rows[0]["genotype"] == GENOTYPES["DARTS_V2"].to_dict()
    back = [SearchEpoch.model_validate(row) for row in rows]
    nan = {"images_per_second", "skip_weight_reduce"}
    assert [r.model_dump(exclude=nan) for r in back] == [r.model_dump(exclude=nan) for r in history]
    assert all(math.isnan(r.images_per_second) for r in back)  # NaN survives the file


def test_epoch_pictures_are_named_after_the_1_based_epoch(tmp_path: Path) -> None:
    report = _report(1)
    paths = save_epoch_pictures(
        tmp_path, report.epoch, report.genotype, report.alpha_normal, report.alpha_reduce, PRIMITIVES
    )
    assert paths == [tmp_path / "cells" / "epoch_001.png", tmp_path / "alpha" / "epoch_001.png"]
    with pytest.raises(ValueError, match="count from 1"):
        save_epoch_pictures(tmp_path, 0, report.genotype, report.alpha_normal, report.alpha_reduce, PRIMITIVES)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_artifacts_get_the_mode_open_gives_not_mkstemps(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        plain = tmp_path / "plain.txt"
        with open(plain, "w") as f:
            f.write("x")
        written = [
            *save_search_outputs(tmp_path, GENOTYPES["DARTS_V2"], [_report(1)]),
            write_text_atomic(tmp_path / "deep" / "note.txt", "text"),
            write_json(tmp_path / "data.json", {"a": 1}),
            save_torch_atomic({"w": torch.ones(2)}, tmp_path / "checkpoint.pt"),
            save_torch_atomic({"w": torch.zeros(2)}, tmp_path / "checkpoint.pt"),  # replacing keeps the mode too
        ]
    finally:
        os.umask(old)
    assert plain.stat().st_mode & 0o777 == 0o666 & ~umask
    assert {p.name: p.stat().st_mode & 0o777 for p in written} == {p.name: 0o666 & ~umask for p in written}
    assert torch.equal(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["w"], torch.zeros(2))
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == [], "temp files left behind"
