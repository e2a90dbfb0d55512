"""bench/ helpers: the analytic FLOP count against torch's FlopCounterMode; the speed table's rows and JSON."""

from __future__ import annotations

import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from components.config import load_pipeline_config
from nas import GENOTYPES, EvalNetwork, SearchNetwork
from nas.ops import PRIMITIVES

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.cuda_graph_check import parse_args as parse_check_args  # noqa: E402
from bench.cuda_graph_check import search_config as check_config  # noqa: E402
from bench.flops import counted_flops, eval_network_flops, supernet_flops  # noqa: E402
from bench.speed import cases  # noqa: E402
from bench.speed import main as speed_table  # noqa: E402


@pytest.mark.parametrize(
    ("layers", "channels", "nodes", "size", "primitives"),
    [(3, 4, 2, 8, PRIMITIVES), (5, 6, 4, 9, PRIMITIVES), (4, 4, 3, 12, ("none", "skip_connect", "conv_7x1_1x7"))],
)
def test_supernet_flops_match_the_flop_counter(layers: int, channels: int, nodes: int, size: int, primitives) -> None:  # noqa: ANN001
    net = SearchNetwork(2, channels, 7, layers, nodes, primitives).eval()
    want = counted_flops(net, torch.randn(1, 2, size, size))
    assert supernet_flops(2, channels, 7, layers, nodes, primitives, input_size=size) == want


@pytest.mark.parametrize("name", ["DARTS_V2", "PC_DARTS", "NASNet"])
def test_eval_network_flops_match_the_flop_counter(name: str) -> None:
    net = EvalNetwork(GENOTYPES[name], in_channels=3, channels=8, num_classes=10, layers=5).eval()
    want = counted_flops(net, torch.randn(1, 3, 16, 16))
    assert eval_network_flops(GENOTYPES[name], 3, 8, 10, 5, input_size=16) == want


def test_the_speed_table_times_bf16_rows_against_the_bf16_matmul_rate_over_rounds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each row in its own process, round after round; a row is its rounds' median, and a bf16 row's share is of the
    bf16 matmul rate (not a timing test: any speed)."""
    out = tmp_path / "speed.json"
    tiny = ["--batch", "2", "--layers", "3", "--channels", "4", "--input-size", "8", "--threads", "1"]
    only = ["--only", "default+bf16", "--rounds", "2", "--json", str(out)]
    rows = speed_table([*tiny, "--iters", "1", "--warmup", "0", *only])
    report = json.loads(out.read_text())
    assert [(r["name"], r["order"], r["precision"]) for r in report["rows"]] == [
        ("default+bf16", "first", "bf16"),
        ("default+bf16", "second", "bf16"),
    ]
    lines = [line for line in capsys.readouterr().out.splitlines() if "(round " in line]  # each process's own row
    progress = [(line.split()[1], line.rsplit("(round ", 1)[1]) for line in lines]
    assert progress == [("first", "1/2)"), ("second", "1/2)"), ("first", "2/2)"), ("second", "2/2)")]  # in turn
    assert set(report["matmul_gflops"]) == {"fp32", "bf16"}
    for row, written in zip(rows, report["rows"], strict=True):
        assert len(row.ms_rounds) == len(row.ms_all) == 2 and written["ms_rounds"] == row.ms_rounds  # a step a round
        assert row.ms_per_step == pytest.approx(statistics.median(row.ms_rounds)) and row.gflop_per_step > 0
        assert row.gflops == pytest.approx(row.gflop_per_step / row.ms_per_step * 1000)
        assert row.images_per_second == pytest.approx(2 * 2 / row.ms_per_step * 1000)  # 2 batches of 2 a step
        assert row.fraction_of_matmul == pytest.approx(row.gflops / report["matmul_gflops"]["bf16"])
    second = rows[1]
    assert second.gflop_per_step == pytest.approx(rows[0].gflop_per_step * 5 / 2)  # 5 passes against 2
    with pytest.raises(SystemExit, match="--only names no case"):
        speed_table([*tiny, "--only", "no-such-case"])
    with pytest.raises(SystemExit, match="--rounds must be at least 1"):
        speed_table([*tiny, "--only", "default", "--rounds", "0"])
    with pytest.raises(SystemExit, match="--only names no case default[+]batched "):  # a renamed row is named
        speed_table([*tiny, "--only", "default", "default+batched"])
    with pytest.raises(SystemExit, match=r"need a CUDA device \(pc-darts K=4\+cuda_graph\), on cpu"):
        speed_table([*tiny, "--device", "cpu", "--only", "default", "pc-darts K=4+cuda_graph"])


def test_the_interleaved_table_times_its_rows_in_turn_in_one_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--interleaved: every row's steps in this process (no peak memory to report), each against the first row
    asked for of its order, step by step; refused with --rounds (not a timing test: any speed)."""
    import os

    import bench.speed

    built, build = [], bench.speed.build

    def counted(case: bench.speed.Case, args):  # noqa: ANN001, ANN202 - the wrapped function's own types
        built.append((case.name, case.order, os.getpid()))
        return build(case, args)

    monkeypatch.setattr(bench.speed, "build", counted)
    out = tmp_path / "speed.json"
    tiny = ["--batch", "2", "--layers", "3", "--channels", "4", "--input-size", "8", "--threads", "1"]
    only = ["--only", "default", "plain", "--interleaved", "--iters", "2", "--warmup", "1", "--json", str(out)]
    rows = speed_table([*tiny, *only])
    asked = [("default", "first"), ("default", "second"), ("plain", "first"), ("plain", "second")]
    assert built == [(*row, os.getpid()) for row in asked]  # all built in this process
    assert [(r.name, r.order) for r in rows] == asked
    assert [r["peak_mb"] for r in json.loads(out.read_text())["rows"]] == [None] * 4
    for row in rows:
        assert len(row.ms_all) == 2 and row.ms_per_step == pytest.approx(statistics.median(row.ms_all))
        assert row.ops_per_step > 0
    text = capsys.readouterr().out
    for default, plain in (rows[0], rows[2]), (rows[1], rows[3]):
        ratio, steps = plain.ms_per_step / default.ms_per_step, [b / a for a, b in zip(default.ms_all, plain.ms_all)]
        assert (
            f"plain {plain.order}: {plain.ms_per_step:.0f} against default {default.ms_per_step:.0f} ms "
            f"({ratio:.3f}x; step by step {steps[0]:.2f}, {steps[1]:.2f})"
        ) in text
    with pytest.raises(SystemExit, match="--interleaved times every row in one process"):
        speed_table([*tiny, "--only", "default", "--interleaved", "--rounds", "2"])


def test_a_row_over_rounds_is_their_median_not_their_mean() -> None:
    """One slow round (the host busy for a minute) must not move the row: the median of three is the middle one."""
    from bench.speed import Row, over_rounds

    def row(ms: float, peak: float, faults: float, collecting: float) -> Row:
        images, gflops = 32 / ms * 1000, 1.5 / ms * 1000  # 32 images and 1.5 GFLOP a step
        return Row(
            "default", "first", "fd", "fp32", ms, [ms], [ms], images, 1.5, gflops, 0.0, peak, 9.0, 7, faults, collecting
        )

    rounds = [row(1000, 100, 5e4, 30.0), row(3000, 300, 9e4, 90.0), row(1200, 110, 6e4, 2.0)]
    combined = over_rounds(rounds, {"fp32": 10.0})
    assert combined.ms_per_step == 1200 and combined.ms_rounds == [1000, 3000, 1200] and combined.peak_mb == 110
    assert combined.page_faults_per_step == 6e4 and combined.gc_ms_per_step == 30.0
    assert combined.ms_all == [1000, 3000, 1200] and combined.ops_per_step == 7
    assert combined.images_per_second == pytest.approx(32 / 1.2) and combined.gflops == pytest.approx(1.25)
    assert combined.fraction_of_matmul == pytest.approx(0.125)


def test_the_speed_table_counts_fewer_operators_on_the_default_path_than_on_the_plain_one(tmp_path: Path) -> None:
    """The operator count (what a launch-bound GPU step's time follows) is a property of the code, not of the
    machine: the default switches (batched edges) must dispatch under half the operators per step."""
    tiny = ["--batch", "2", "--layers", "3", "--channels", "4", "--input-size", "8", "--threads", "1"]
    only = ["--only", "plain", "default"]
    rows = speed_table([*tiny, "--iters", "1", "--warmup", "0", *only, "--json", str(tmp_path / "s.json")])
    ops = {(r.name, r.order): r.ops_per_step for r in rows}
    assert set(json.loads((tmp_path / "s.json").read_text())["matmul_gflops"]) == {"fp32"}  # no bf16 row, no bf16 rate
    for order in ("first", "second"):
        assert 0 < ops[("default", order)] < 0.5 * ops[("plain", order)], ops
    assert ops[("plain", "second")] > 2 * ops[("plain", "first")]  # 5 passes against 2


def test_the_gpu_script_parses_and_names_only_existing_cases() -> None:
    """bench/gpu.sh runs only where a GPU is lent: what can be checked without one is checked here."""
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    selections = [shlex.split(part.split("||", 1)[0].replace("\\\n", " ")) for part in text.split("--only")[1:]]
    assert [len(names) for names in selections] == [8]
    assert {name for names in selections for name in names} <= {c.name for c in cases()}
    assert selections[0][0] == "default+cuda_graph"  # the row the GPU target is about runs first
    assert "speed_gpu.json" in text and "python bench/cuda_graph_check.py" in text
    assert "python bench/cuda_graph_check.py --partial-channels 4" in text
    for order in ("first", "second"):  # the PC-DARTS check's searchers: a config the library accepts
        cfg = check_config(order, parse_check_args(["--partial-channels", "4"]))
        assert (cfg.partial_channels, cfg.edge_normalization, cfg.speed.cuda_graph) == (4, True, True)
    command = text.split("python -m components.search --config", 1)[1].split("||", 1)[0]
    stage = shlex.split(command.replace("\\\n", " "))
    overrides = [value.replace("$store", "/tmp/store") for flag, value in zip(stage, stage[1:]) if flag == "--set"]
    config = load_pipeline_config(stage[0], overrides)  # a stage the config accepts
    assert config.search.speed.cuda_graph and config.ray.use_gpu and config.ray.num_workers == 1
