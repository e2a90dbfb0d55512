"""Selection of the genotypes to retrain, on a hand-made table of trial results."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from components.select import TrialResult, select_top, write_selection
from nas.genotypes import GENOTYPES, Genotype, parse_genotype

V1, V2, PC = GENOTYPES["DARTS_V1"], GENOTYPES["DARTS_V2"], GENOTYPES["PC_DARTS"]


def swapped(g: Genotype) -> Genotype:
    """The same cell with the two edges of every node written in the other order."""

    def flip(edges):  # noqa: ANN001, ANN202
        return [e for i in range(0, len(edges), 2) for e in (edges[i + 1], edges[i])]

    return Genotype(flip(g.normal), g.normal_concat, flip(g.reduce), g.reduce_concat)


def trial(name: str, acc: float, g: Genotype, seed: int = 0, xi: float | None = 0.0) -> TrialResult:
    return TrialResult(trial=name, seed=seed, xi=xi, metrics={"val_acc": acc, "val_loss": 1 - acc}, genotype=g)


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
    csv_path, json_path = write_selection(tmp_path, RESULTS, top)
    rows = list(csv.DictReader(Path(csv_path).read_text().splitlines()))
    assert [r["trial"] for r in rows] == ["t1", "t2", "t3", "t4", "t5"]
    by_trial = {r["trial"]: r for r in rows}
    assert by_trial["t3"]["selected_rank"] == "1" and by_trial["t4"]["selected_rank"] == "2"
    assert by_trial["t2"]["same_genotype_as"] == "t3" and by_trial["t1"]["selected_rank"] == ""
    assert by_trial["t2"]["order"] == "second" and by_trial["t1"]["order"] == "first"
    assert parse_genotype(by_trial["t4"]["genotype"]) == PC
    data = json.loads(Path(json_path).read_text())
    assert [s["trial"] for s in data["selected"]] == ["t3", "t4"]
    assert Genotype.from_dict(data["selected"][0]["genotype"]) == V2.canonical()


def test_trials_stopped_early_are_listed_but_never_selected(tmp_path: Path) -> None:
    stopped = TrialResult("t0", 9, 0.0, {"val_acc": 0.99, "epoch": 1}, PC, complete=False)
    top = select_top([*RESULTS, stopped], k=5)
    assert "t0" not in {t for c in top for t in c.trials}
    assert [c.trial.trial for c in top] == ["t3", "t4", "t1"]
    csv_path, _ = write_selection(tmp_path, [*RESULTS, stopped], top)
    row = next(r for r in csv.DictReader(Path(csv_path).read_text().splitlines()) if r["trial"] == "t0")
    assert row["stopped_early"] == "True" and row["selected_rank"] == ""
    with pytest.raises(ValueError, match="stopped early"):
        select_top([stopped], k=1)


def test_extra_grid_axes_become_columns_and_uri_destinations_work(tmp_path: Path) -> None:
    results = [
        TrialResult("a", 1, 0.0, {"val_acc": 0.5}, V1, params={"alpha_lr": 0.1}),
        TrialResult("b", 1, 0.0, {"val_acc": 0.6}, V2, params={"alpha_lr": 0.2, "w_lr": 0.05}),
    ]
    top = select_top(results, k=1)
    csv_uri, json_uri = write_selection(f"file://{tmp_path}/deep/selection", results, top)
    assert csv_uri == f"file://{tmp_path}/deep/selection/selection.csv"
    rows = list(csv.DictReader((tmp_path / "deep" / "selection" / "selection.csv").read_text().splitlines()))
    assert [(r["alpha_lr"], r["w_lr"]) for r in rows] == [("0.1", ""), ("0.2", "0.05")]
    assert json.loads((tmp_path / "deep" / "selection" / "selection.json").read_text())["selected"][0]["trial"] == "b"
