"""The single-process search and retrain loops: a real search on digits, determinism, resume."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from nas import (
    GENOTYPES,
    Config,
    EvalNetwork,
    Genotype,
    LoopContext,
    NetworkSpec,
    RetrainEpoch,
    RetrainRun,
    SearchEpoch,
    Searcher,
    SearchRun,
    count_parameters,
    load_config,
    parse_genotype,
)
from nas.genotypes import count_ops
from nas.loop import Meter
from nas.ops import PRIMITIVES
from nas.search import largest_op_weight

TINY_SEARCH = [
    "search.epochs=2",
    "search.steps_per_epoch=3",
    "search.batch_size=16",
    "search.layers=3",
    "search.channels=4",
    "search.nodes=4",
    "search.primitives=[none, max_pool_3x3, skip_connect, sep_conv_3x3, dil_conv_3x3]",
    "data.limit=400",
]


def tiny(*extra: str) -> Config:
    return load_config("digits", [*TINY_SEARCH, *extra])


def quiet() -> LoopContext:
    return LoopContext(log=lambda message: None)


def roundtrip(state: dict) -> dict:
    """Through bytes and back, loading as untrusted input would be."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("xi", ["null", "0"])
def test_two_epoch_search_on_digits_gives_a_valid_genotype_and_moves_alpha(xi: str) -> None:
    lines: list[str] = []
    run = SearchRun(tiny(f"search.xi={xi}"), LoopContext(log=lines.append))
    alpha_start = run.network.alpha_normal.detach().clone()
    result = run.run()
    assert isinstance(result.genotype, Genotype)
    assert parse_genotype(str(result.genotype)) == result.genotype
    assert len(result.genotype.normal) == 8 and result.genotype.normal_concat == (2, 3, 4, 5)
    assert not torch.equal(alpha_start, result.alpha_normal)
    assert [e.epoch for e in result.history] == [1, 2]  # epochs count from 1
    assert result.history[0].xi == (0.0 if xi == "0" else pytest.approx(0.025 * 2))  # digits preset: w_lr 0.05
    assert all(0 <= e.val_acc <= 1 and e.train_loss > 0 for e in result.history)
    assert len(lines) == 2 and lines[0].startswith("search epoch 1/2 |") and "search epoch 2/2" in lines[1]
    assert "ETA" in lines[1]
    assert result.history[-1].genotype == result.genotype
    assert result.history[-1].alpha_normal == result.alpha_normal.tolist()


def test_search_epoch_dumps_to_plain_values_and_reads_back_from_checkpoint_and_json() -> None:
    run = SearchRun(tiny("search.epochs=1"), quiet())
    report = run.run_epoch()
    assert report.epoch == 1
    numbers = "train_loss train_acc val_loss val_acc alpha_entropy_normal alpha_entropy_reduce lr xi epoch_seconds"
    collapse = ["parameter_free_normal", "parameter_free_reduce", "skip_weight_normal", "skip_weight_reduce"]
    assert list(report.metrics()) == [*numbers.split(), "images_per_second", "second_order_steps", *collapse]
    # the collapse signals match the derived cells and the α they came from
    assert report.parameter_free_normal == count_ops(report.genotype, "normal")
    skip = run.config.search.primitives.index("skip_connect")
    softmax = torch.tensor(report.alpha_reduce, dtype=torch.float64).softmax(-1)
    assert report.skip_weight_reduce == pytest.approx(max(softmax[:, skip].tolist()), rel=1e-6)
    assert report.metrics()["epoch_seconds"] == report.epoch_seconds > 0
    dumped = report.model_dump(mode="json")
    assert list(dumped) == ["epoch", *report.metrics(), "genotype", "alpha_normal", "alpha_reduce"]
    assert dumped["genotype"] == report.genotype.to_dict()
    assert SearchEpoch.model_validate(roundtrip({"h": dumped})["h"]) == report
    assert SearchEpoch.model_validate(json.loads(json.dumps(dumped))) == report
    assert SearchEpoch.model_validate({**dumped, "genotype": str(report.genotype)}) == report  # text form too
    with pytest.raises(ValueError, match="epoch"):
        SearchEpoch.model_validate({**dumped, "epoch": 0})


def test_largest_op_weight_reads_the_softmax_not_raw_alpha() -> None:
    alpha = torch.zeros(3, 8)
    alpha[1, 3] = 5.0  # skip_connect strongest on edge 1
    alpha[2, :] = 10.0  # a large raw logit on every op of edge 2 is still 1/8 after the softmax
    expected = math.exp(5) / (math.exp(5) + 7)
    assert largest_op_weight(alpha, PRIMITIVES) == pytest.approx(expected)
    assert largest_op_weight(alpha, PRIMITIVES, "none") == pytest.approx(1 / 8)
    assert math.isnan(largest_op_weight(alpha[:, :3], PRIMITIVES[:3]))  # no skip_connect in this space


def test_same_seed_same_alpha_bit_for_bit_and_other_seed_differs() -> None:
    a = SearchRun(tiny(), quiet()).run()
    b = SearchRun(tiny(), quiet()).run()
    c = SearchRun(tiny("search.seed=7"), quiet()).run()
    assert torch.equal(a.alpha_normal, b.alpha_normal) and torch.equal(a.alpha_reduce, b.alpha_reduce)
    assert a.genotype == b.genotype
    assert not torch.equal(a.alpha_normal, c.alpha_normal)


def test_resume_gives_the_same_result_as_no_interruption() -> None:
    cfg = tiny("search.epochs=3")
    straight = SearchRun(cfg, quiet()).run()
    first = SearchRun(cfg, quiet())
    first_report = first.run_epoch()
    state = roundtrip(first.state_dict())
    del first
    resumed = SearchRun(cfg, quiet())  # a fresh process would start from scratch here...
    resumed.load_state_dict(state)  # ...and continue from the checkpoint instead
    assert resumed.epoch == 1 and resumed.history == [first_report]  # every field, the genotype included
    result = resumed.run()
    assert [e.epoch for e in result.history] == [1, 2, 3]
    assert torch.equal(straight.alpha_normal, result.alpha_normal)
    assert torch.equal(straight.alpha_reduce, result.alpha_reduce)
    assert [e.val_loss for e in straight.history] == [e.val_loss for e in result.history]


def test_weight_halves_are_disjoint_and_weight_optimizer_holds_no_alpha() -> None:
    run = SearchRun(tiny("search.epochs=1"), quiet())
    assert not set(run.w_indices) & set(run.a_indices)
    assert len(run.w_indices) + len(run.a_indices) == len(run.train_set)
    held = {id(p) for g in run.w_optimizer.param_groups for p in g["params"]}
    assert not held & {id(a) for a in run.network.alphas()}
    assert {id(p) for g in run.a_optimizer.param_groups for p in g["params"]} == {id(a) for a in run.network.alphas()}


def test_weight_step_leaves_alpha_untouched() -> None:
    """α changes only through its own optimizer: the weight step computes no α gradient."""
    run = SearchRun(tiny("search.epochs=1"), quiet())
    x, y = next(iter(torch.utils.data.DataLoader(run.train_set, batch_size=8)))
    loss, logits = run.searcher.weight_step(x, y)
    assert logits.shape == (8, 10) and loss.ndim == 0
    assert all(a.grad is None for a in run.network.alphas())
    assert all(a.requires_grad for a in run.network.alphas())


@pytest.mark.parametrize("clip", [1e-3, 1e6])
def test_the_weight_step_clips_the_norm_of_all_weight_gradients_together(clip: float) -> None:
    """search.w_grad_clip bounds the norm of every weight's gradient taken as one vector (not each tensor's); a
    gradient under the bound is left as it is."""
    cfg = tiny("search.epochs=1", f"search.w_grad_clip={clip}").search
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    norms = []
    for bound in (clip, math.inf):
        torch.manual_seed(0)
        searcher = Searcher(cfg.model_copy(update={"w_grad_clip": bound}), 1, 10, quiet())
        searcher.weight_step(x, y)
        grads = [p.grad for p in searcher.network.weights()]
        assert all(g is not None for g in grads)
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
    clipped, unclipped = norms
    assert unclipped > 1e-2
    assert clipped == pytest.approx(min(clip, unclipped), rel=1e-4)


def test_searcher_is_the_runs_setup_and_steps_on_plain_tensors() -> None:
    """Built after the same seed, a searcher alone is the run's supernet, optimizers and architect; one step moves α
    (once, second order) and the weights, and returns what the meter takes."""
    cfg = tiny("search.epochs=1")
    run = SearchRun(cfg, quiet())
    assert run.network is run.searcher.network and run.architect is run.searcher.architect
    assert run.w_optimizer is run.searcher.w_optimizer and run.a_optimizer is run.searcher.a_optimizer
    assert run.scheduler is run.searcher.scheduler and run.train_model is run.searcher.train_model
    torch.manual_seed(cfg.search.seed)
    searcher = Searcher(cfg.search, in_channels=1, num_classes=10, context=quiet())
    before = {k: v.clone() for k, v in searcher.network.state_dict().items()}
    assert before.keys() == run.network.state_dict().keys()
    assert all(torch.equal(v, run.network.state_dict()[k]) for k, v in before.items())
    gen = torch.Generator().manual_seed(0)
    x_w, x_a = (torch.randn(16, 1, 8, 8, generator=gen) for _ in range(2))
    y_w, y_a = (torch.randint(0, 10, (16,), generator=gen) for _ in range(2))
    loss, logits = searcher.step(x_w, y_w, x_a, y_a)
    meter = Meter()
    meter.update(loss, logits, y_w)
    mean_loss, accuracy, count = meter.result(quiet())
    assert count == 16 and math.isfinite(mean_loss) and mean_loss == pytest.approx(float(loss.detach()))
    assert accuracy == float((logits.argmax(dim=1) == y_w).float().mean())
    assert (searcher.architect.first_order_steps, searcher.architect.second_order_steps) == (0, 1)
    after = searcher.network.state_dict()
    assert not torch.equal(after["alpha.normal"], before["alpha.normal"])
    assert not torch.equal(after["classifier.weight"], before["classifier.weight"])


def test_global_batch_larger_than_a_half_is_refused() -> None:
    with pytest.raises(ValueError, match="smaller than the global batch"):
        SearchRun(tiny("search.batch_size=300"), quiet())


RETRAIN = [
    "retrain.epochs=2",
    "retrain.steps_per_epoch=3",
    "retrain.batch_size=16",
    "retrain.layers=3",
    "retrain.channels=4",
    "retrain.cutout=2",
    "data.limit=300",
]


def test_retrain_holds_out_validation_and_grows_drop_path() -> None:
    cfg = load_config("digits", [*RETRAIN, "retrain.drop_path=0.2"])
    run = RetrainRun(cfg, GENOTYPES["DARTS_V2"], quiet())
    assert run.network.spec is run.spec and run.spec == NetworkSpec.for_retrain(cfg.retrain, run.genotype, run.info)
    assert (run.spec.dataset, run.spec.in_channels, run.spec.num_classes, run.spec.layers) == ("digits", 1, 10, 3)
    direct = EvalNetwork(GENOTYPES["DARTS_V2"], in_channels=1, channels=4, num_classes=10, layers=3)
    assert count_parameters(run.network) == count_parameters(direct)
    assert run.eval_split == "val"
    assert not set(run.train_indices) & set(run.eval_indices)
    assert len(run.eval_indices) == 30
    result = run.run()
    assert [e.epoch for e in result.history] == [1, 2]
    assert [e.drop_path for e in result.history] == [0.0, pytest.approx(0.1)]
    assert 0 <= result.eval_acc <= 1


def test_retrain_on_all_data_measures_on_test_and_resumes_exactly() -> None:
    cfg = load_config("digits", [*RETRAIN, "retrain.val_fraction=0", "data.test_limit=50"])
    straight = RetrainRun(cfg, None, quiet()).run()
    assert straight.eval_split == "test" and straight.genotype == GENOTYPES["DARTS_V2"]
    first = RetrainRun(cfg, None, quiet())
    first.run_epoch()
    state = roundtrip(first.state_dict())  # the checkpoint is taken at the epoch's end, as the stages do
    resumed = RetrainRun(cfg, None, quiet())
    resumed.load_state_dict(state)
    result = resumed.run()
    assert [e.train_loss for e in result.history] == [e.train_loss for e in straight.history]
    # the test split is looked at once, after the last epoch; earlier epochs carry NaN
    assert [math.isnan(e.eval_loss) for e in straight.history] == [True] * (len(straight.history) - 1) + [False]
    assert result.history[-1].eval_loss == straight.history[-1].eval_loss
    assert [e.epoch for e in result.history] == [1, 2]


def test_retrain_epoch_keeps_nan_through_checkpoint_and_json() -> None:
    report = RetrainEpoch(
        epoch=1,
        train_loss=2.0,
        train_acc=0.25,
        eval_loss=math.nan,
        eval_acc=math.nan,
        eval_split="test",
        lr=0.025,
        drop_path=0.0,
        epoch_seconds=1.5,
        images_per_second=100.0,
    )
    numbers = "train_loss train_acc eval_loss eval_acc lr drop_path epoch_seconds images_per_second"
    assert list(report.metrics()) == numbers.split()  # eval_split is no number
    dumped = report.model_dump(mode="json")
    assert math.isnan(dumped["eval_acc"]) and dumped["eval_split"] == "test" and dumped["epoch"] == 1
    for back in (roundtrip({"h": [dumped]})["h"][0], json.loads(json.dumps(dumped)), report.model_dump_json()):
        again = RetrainEpoch.model_validate_json(back) if isinstance(back, str) else RetrainEpoch.model_validate(back)
        assert math.isnan(again.eval_acc) and math.isnan(again.eval_loss)
        nan = {"eval_loss", "eval_acc"}
        assert again.model_dump(exclude=nan) == report.model_dump(exclude=nan)
