"""Tests of ``python -m nas``: one-line errors with exit code 2 and nothing written, and tiny real runs on digits."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nas.__main__ import main
from nas.genotypes import parse_genotype

SEARCH_PRIMITIVES = ["none", "skip_connect", "sep_conv_3x3", "max_pool_3x3"]
TINY_SEARCH = [
    "search.epochs=1",
    "search.steps_per_epoch=1",
    "search.layers=3",  # the fewest with both a normal and a reduction cell
    "search.channels=4",
    "search.nodes=2",
    "search.batch_size=16",
    f"search.primitives=[{','.join(SEARCH_PRIMITIVES)}]",
    "data.limit=200",
]
# Put before the bad override of the error tests: should validation ever let it pass, the run stays short.
CAPS = [
    "search.epochs=1",
    "search.steps_per_epoch=1",
    "retrain.epochs=1",
    "retrain.steps_per_epoch=1",
    "data.limit=200",
]
TINY_RETRAIN = [
    "retrain.epochs=1",
    "retrain.steps_per_epoch=2",
    "retrain.layers=3",
    "retrain.channels=4",
    "retrain.batch_size=16",
    "retrain.cutout=0",
    "data.limit=200",
]


def _sets(overrides: list[str]) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


def _run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # One intra-op thread: these networks are tiny, and spare threads only spin (many times slower on a busy CPU).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "nas", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.fixture(autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _assert_one_line_error(stderr: str, expected: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    assert expected in lines[0]
    assert "Traceback" not in stderr


# --------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("command", "override", "expected"),
    [
        ("search", "search.primitives=[none,sep_conv_3x3,no_such_op]", "search.primitives"),
        ("search", "search.xi=-1", "search.xi"),
        ("search", "data.source=parquet:/nonexistent", "/nonexistent"),
        ("retrain", "retrain.genotype=Genotype(normal=__import__('os').system('touch X'))", "retrain.genotype"),
    ],
)
def test_bad_input_is_one_line_on_stderr_exit_2_and_writes_nothing(tmp_path, command, override, expected):
    # output_dir stays the default (runs/), relative to the working directory: so is file X of the genotype.
    proc = _run_cli(tmp_path, command, "--config", "digits", *_sets([*CAPS, override]))
    assert proc.returncode == 2, proc.stderr
    _assert_one_line_error(proc.stderr, expected)
    assert not (tmp_path / "X").exists()  # the genotype text was never run
    assert list(tmp_path.iterdir()) == []  # no output folder, no checkpoint, nothing


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["retrain", "--set", "data.source=parquet:/nonexistent"], "/nonexistent"),
        (["retrain", "--set", "retrain.genotype=missing/genotype.json"], "retrain.genotype"),
        (["retrain", "--set", "retrain.genotype=Genotype(normal=[('sep_conv_3x3', 0)])"], "retrain.genotype"),
        (["search", "--set", "search.epochs"], "search.epochs"),
        (["search", "--set", "search.layers=2"], "search.layers"),
        (["search", "--set", "data.source=bogus"], "data.source"),
        (["search", "--set", "search.speed.cuda_graph=true"], "search.speed.cuda_graph needs a CUDA device, not cpu"),
        (["search", "--config", "no-such-preset"], "cifar10, cifar10-cpu, cifar10-proxy, digits, quick"),
    ],
)
def test_more_bad_input_in_process(tmp_path, monkeypatch, capsys, args, expected):
    monkeypatch.chdir(tmp_path)
    assert main([*args[:1], *_sets(CAPS), *args[1:]]) == 2
    captured = capsys.readouterr()
    _assert_one_line_error(captured.err, expected)
    assert captured.out == ""
    assert list(tmp_path.iterdir()) == []


def test_an_impossible_batch_is_reported_before_anything_is_written(tmp_path, capsys):
    # 200 examples give halves of 100: a batch of 128 cannot be drawn from either.
    overrides = [*TINY_SEARCH, "search.batch_size=128", f"output_dir={tmp_path}"]
    assert main(["search", "--config", "digits", *_sets(overrides)]) == 2
    _assert_one_line_error(capsys.readouterr().err, "global batch")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------- search


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess[str]]:
    """One tiny 1-epoch search through the real command line: (output_dir, search folder, the process)."""
    root = tmp_path_factory.mktemp("search")
    proc = _run_cli(root, "search", "--config", "digits", *_sets([*TINY_SEARCH, f"output_dir={root / 'runs'}"]))
    assert proc.returncode == 0, proc.stderr
    return root / "runs", root / "runs" / "digits" / "search", proc


def test_a_search_writes_its_genotype(searched):
    _, out, proc = searched
    genotype = parse_genotype((out / "genotype.json").read_text())
    assert parse_genotype((out / "genotype.txt").read_text()) == genotype
    assert f"genotype: {genotype}" in proc.stdout
    # Two intermediate nodes, two edges each, chosen from the searched operations other than 'none'.
    for cell in (genotype.normal, genotype.reduce):
        assert len(cell) == 4
        assert {op for op, _ in cell} <= set(SEARCH_PRIMITIVES) - {"none"}
    assert list(genotype.normal_concat) == list(genotype.reduce_concat) == [2, 3]


def test_a_search_writes_its_history_and_pictures(searched):
    _, out, _ = searched
    history = json.loads((out / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1]
    assert parse_genotype(json.dumps(history[0]["genotype"])) == parse_genotype((out / "genotype.json").read_text())
    assert len(history[0]["alpha_normal"]) == 2 + 3  # edges of a 2-node cell
    assert all(len(row) == len(SEARCH_PRIMITIVES) for row in history[0]["alpha_normal"])
    for picture in (out / "cells" / "epoch_001.png", out / "alpha" / "epoch_001.png"):
        assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "cells" / "epoch_002.png").exists()
    assert not [p.name for p in out.rglob(".*.tmp")]  # atomic writes leave no temp files


def test_a_search_checkpoint_loads_with_weights_only(searched):
    _, out, _ = searched
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 1 and state["step"] == 1
    assert {"network", "w_optimizer", "a_optimizer", "scheduler", "rng", "history"} <= set(state)
    assert len(state["history"]) == 1


def test_resume_continues_a_finished_run_from_its_last_epoch(searched, tmp_path, capsys):
    runs, _, _ = searched
    copy = tmp_path / "runs"
    shutil.copytree(runs, copy)  # the shared search folder stays as the first run left it
    out = copy / "digits" / "search"
    before = json.loads((out / "history.json").read_text())
    code = main(
        ["search", "--config", "digits", "--resume", *_sets([*TINY_SEARCH, "search.epochs=2", f"output_dir={copy}"])]
    )
    assert code == 0
    stdout = capsys.readouterr().out
    assert "resumed" in stdout and "at epoch 1" in stdout
    assert "epoch 1/2" not in stdout and "epoch 2/2" in stdout  # only the second epoch ran
    history = json.loads((out / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]
    assert history[0] == before[0]  # the first epoch came from the checkpoint, not from a rerun
    assert (out / "cells" / "epoch_002.png").is_file() and (out / "alpha" / "epoch_002.png").is_file()
    assert torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["epoch"] == 2


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_a_bad_checkpoint_is_one_line_naming_the_file(searched, tmp_path, capsys):
    """Corrupt, malicious (code in a pickle) or another run's checkpoint: one line, exit 2, the payload never runs."""
    runs, _, _ = searched
    marker = tmp_path / "payload-ran"
    other = {"network": {"no_such_weight": torch.zeros(1)}}
    for content, expected in [
        (b"PK\x03\x04 truncated", "cannot be loaded"),
        (pickle.dumps(_Payload(str(marker))), "cannot be loaded"),
        (other, "does not fit this run"),
    ]:
        copy = tmp_path / "runs"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(runs, copy)
        checkpoint = copy / "digits" / "search" / "checkpoint.pt"
        if isinstance(content, bytes):
            checkpoint.write_bytes(content)
        else:
            torch.save(content, checkpoint)
        args = ["search", "--config", "digits", "--resume", *_sets([*TINY_SEARCH, f"output_dir={copy}"])]
        assert main(args) == 2
        _assert_one_line_error(capsys.readouterr().err, f"checkpoint {checkpoint} {expected}")
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------- retrain


def test_retrain_takes_the_genotype_json_a_search_wrote(searched, tmp_path, capsys):
    _, search_out, _ = searched
    genotype_file = search_out / "genotype.json"
    overrides = [*TINY_RETRAIN, f"retrain.genotype={genotype_file}", f"output_dir={tmp_path}"]
    assert main(["retrain", "--config", "digits", *_sets(overrides)]) == 0
    out = tmp_path / "digits" / "retrain"
    result = json.loads((out / "result.json").read_text())
    assert parse_genotype(json.dumps(result["genotype"])) == parse_genotype(genotype_file.read_text())
    assert result["eval_split"] == "val" and 0.0 <= result["eval_acc"] <= 1.0
    weights = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    assert weights and all(isinstance(v, torch.Tensor) for v in weights.values())
    from nas.eval_model import EvalNetwork, NetworkSpec

    spec = NetworkSpec.model_validate_json((out / "spec.json").read_text())
    assert spec.genotype == parse_genotype(genotype_file.read_text())
    EvalNetwork.from_spec(spec).load_state_dict(weights)  # the spec rebuilds exactly the network of the weights
    assert f"{result['eval_acc']:.2%}" in capsys.readouterr().out
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 1 and parse_genotype(state["genotype"]) == parse_genotype(genotype_file.read_text())


def test_the_digits_preset_retrains_with_its_auxiliary_head(tmp_path):
    # 8x8 digits leave 2x2 maps at 2/3 depth, smaller than the CIFAR auxiliary head's 5x5 pooling window.
    overrides = [*TINY_RETRAIN, "retrain.steps_per_epoch=1", f"output_dir={tmp_path}"]
    assert main(["retrain", "--config", "digits", *_sets(overrides)]) == 0
    out = tmp_path / "digits" / "retrain"
    result = json.loads((out / "result.json").read_text())
    assert parse_genotype(json.dumps(result["genotype"])) == parse_genotype("DARTS_V2")
    weights = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    assert any(k.startswith("auxiliary_head.") for k in weights)
