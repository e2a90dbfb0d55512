"""Selection of the genotypes to retrain, on a hand-made table of trial results."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from components.config import PipelineConfig
from components.select import TrialResult, select_top, write_selection
from components.storage import Location
from nas.genotypes import GENOTYPES, Genotype, count_ops, parse_genotype
from nas.search import SearchEpoch

V1, V2, PC = GENOTYPES["DARTS_V1"], GENOTYPES["DARTS_V2"], GENOTYPES["PC_DARTS"]


def swapped(g: Genotype) -> Genotype:
    """The same cell with the two edges of every node written in the other order."""

    def flip(edges):  # noqa: ANN001, ANN202
        return [e for i in range(0, len(edges), 2) for e in (edges[i + 1], edges[i])]

    return Genotype(flip(g.normal), g.normal_concat, flip(g.reduce), g.reduce_concat)


def trial(
    name: str,
    acc: float,
    g: Genotype,
    seed: int = 0,
    xi: float | None = 0.0,
    epoch: int = 2,
    complete: bool = True,
    **search: float,
) -> TrialResult:
    """A finished trial of a 2-epoch search with the given grid values, reporting ``acc`` at its last epoch."""
    config = PipelineConfig().model_copy(deep=True)
    config.search.epochs, config.search.seed, config.search.xi = 2, seed, xi
    for field, value in search.items():
        setattr(config.search, field, value)
    numbers = dict.fromkeys(("train_loss", "train_acc", "alpha_entropy_normal", "alpha_entropy_reduce"), 0.5)
    numbers |= {"lr": 0.025, "xi": xi or 0.0, "epoch_seconds": 1.0, "images_per_second": 1.0}
    numbers |= {f"parameter_free_{c}": count_ops(g, c) for c in ("normal", "reduce")}
    numbers |= {"skip_weight_normal": 0.2, "skip_weight_reduce": 0.2}
    last = SearchEpoch(
        epoch=epoch,
        val_acc=acc,
        val_loss=1 - acc,
        second_order_steps=0,
        genotype=g,
        alpha_normal=[],
        alpha_reduce=[],
        **numbers,
    )
    return TrialResult(trial=name, config=config, last=last, complete=complete)


RESULTS = [
    trial("t1", 0.80, V1, seed=1),
    trial("t2", 0.91, V2, seed=2, xi=0.025),
    trial("t3", 0.93, swapped(V2), seed=3, xi=0.025),  # the same cell as t2, written differently
    trial("t4", 0.85, PC, seed=4),
    trial("t5", math.nan, V1, seed=5),
]


def test_picks_the_highest_metric_and_merges_identical_genotypes() -> None:
    assert swapped(V2) != V2 and swapped(V2).canonical() == V2.canonical()
    top = select_top(RESULTS, k=3)
    assert [c.trial.trial for c in top] == ["t3", "t4", "t1"]
    assert top[0].trials == ("t3", "t2") and top[0].metric == 0.93
    assert top[2].trials == ("t1", "t5")  # NaN ranks last but still merges with its genotype
    assert [c.rank for c in top] == [1, 2, 3]


def test_respects_k_and_mode() -> None:
    assert len(select_top(RESULTS, k=1)) == 1
    assert len(select_top(RESULTS, k=10)) == 3  # only three distinct genotypes exist
    lowest_loss = select_top(RESULTS, metric="val_loss", mode="min", k=1)[0]
    assert lowest_loss.trial.trial == "t3"
    with pytest.raises(ValueError, match="k must be"):
        select_top(RESULTS, k=0)
    with pytest.raises(ValueError, match="no trial results"):
        select_top([], k=1)


def test_ties_break_by_trial_name() -> None:
    tied = [trial("b", 0.9, V1), trial("a", 0.9, PC)]
    assert select_top(tied, k=1)[0].trial.trial == "a"


def test_selection_table_as_csv_and_json(tmp_path: Path) -> None:
    top = select_top(RESULTS, k=2)
    write_selection(Location(str(tmp_path)), RESULTS, top)
    rows = list(csv.DictReader((tmp_path / "selection.csv").read_text().splitlines()))
    assert [r["trial"] for r in rows] == ["t1", "t2", "t3", "t4", "t5"]
    by_trial = {r["trial"]: r for r in rows}
    assert by_trial["t3"]["selected_rank"] == "1" and by_trial["t4"]["selected_rank"] == "2"
    assert by_trial["t2"]["same_genotype_as"] == "t3" and by_trial["t1"]["selected_rank"] == ""
    assert by_trial["t2"]["order"] == "second" and by_trial["t1"]["order"] == "first"
    assert parse_genotype(by_trial["t4"]["genotype"]) == PC
    assert (tmp_path / "selection.csv").stat().st_mode & 0o777 == _normal_mode(tmp_path)
    data = json.loads((tmp_path / "selection.json").read_text())
    assert [s["trial"] for s in data["selected"]] == ["t3", "t4"]
    assert Genotype.from_dict(data["selected"][0]["genotype"]) == V2.canonical()


def test_trials_stopped_early_are_listed_but_never_selected(tmp_path: Path) -> None:
    stopped = trial("t0", 0.99, PC, seed=9, epoch=1, complete=False)
    top = select_top([*RESULTS, stopped], k=5)
    assert "t0" not in {t for c in top for t in c.trials}
    assert [c.trial.trial for c in top] == ["t3", "t4", "t1"]
    write_selection(Location(str(tmp_path)), [*RESULTS, stopped], top)
    row = next(r for r in csv.DictReader((tmp_path / "selection.csv").read_text().splitlines()) if r["trial"] == "t0")
    assert row["stopped_early"] == "True" and row["selected_rank"] == ""
    with pytest.raises(ValueError, match="stopped early"):
        select_top([stopped], k=1)


def test_extra_grid_axes_become_columns_and_uri_destinations_work(tmp_path: Path) -> None:
    results = [trial("a", 0.5, V1, seed=1, alpha_lr=0.1, w_lr=0.05), trial("b", 0.6, V2, seed=1, alpha_lr=0.2)]
    top = select_top(results, k=1)
    where = Location(f"file://{tmp_path}/deep/selection")
    write_selection(where, results, top, axes=["search.alpha_lr", "search.w_lr"])
    assert where.exists("selection.csv") and where.exists("selection.json")
    rows = list(csv.DictReader((tmp_path / "deep" / "selection" / "selection.csv").read_text().splitlines()))
    assert [(r["seed"], r["alpha_lr"], r["w_lr"]) for r in rows] == [("1", "0.1", "0.05"), ("1", "0.2", "0.025")]
    assert json.loads((tmp_path / "deep" / "selection" / "selection.json").read_text())["selected"][0]["trial"] == "b"


def _normal_mode(folder: Path) -> int:
    """The mode a plain open() gives a new file here (0o666 less the umask)."""
    probe = folder / "probe"
    probe.write_text("")
    return probe.stat().st_mode & 0o777


def collapsed_cell(skips: int) -> Genotype:
    """DARTS_V2's wiring with ``skips`` skip connections in the normal cell, sep_conv_3x3 elsewhere."""
    normal = [("skip_connect" if k < skips else "sep_conv_3x3", i) for k, (_, i) in enumerate(V2.normal)]
    return Genotype(normal, V2.normal_concat, V2.reduce, V2.reduce_concat)


def test_collapsed_cells_are_refused_when_asked(tmp_path: Path) -> None:
    """P-DARTS's guard: a normal cell with more than M skip connections is never a candidate, but is listed."""
    results = [
        trial("best", 0.95, collapsed_cell(5)),
        trial("fine", 0.90, collapsed_cell(2)),
        trial("plain", 0.8, collapsed_cell(0)),
    ]
    assert count_ops(collapsed_cell(5), "normal", "skip_connect") == 5
    assert [c.trial.trial for c in select_top(results, k=3)] == ["best", "fine", "plain"]  # off by default
    assert [c.trial.trial for c in select_top(results, k=3, max_skip_connects=2)] == ["fine", "plain"]
    assert [c.trial.trial for c in select_top(results, k=3, max_skip_connects=0)] == ["plain"]
    with pytest.raises(ValueError, match="more than 1 skip_connect .*collapsed"):
        select_top(results[:2], max_skip_connects=1)
    candidates = select_top(results, k=1, max_skip_connects=2)
    write_selection(Location(str(tmp_path)), results, candidates, max_skip_connects=2)
    rows = {row["trial"]: row for row in json.loads((tmp_path / "selection.json").read_text())["trials"]}
    assert rows["best"]["collapsed"] and rows["best"]["skip_connects_normal"] == 5 and not rows["best"]["selected_rank"]
    assert not rows["fine"]["collapsed"] and rows["fine"]["selected_rank"] == 1
    assert rows["fine"]["parameter_free_normal"] == 2 and rows["plain"]["parameter_free_reduce"] == 8
