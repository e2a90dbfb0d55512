"""Tests of nas.config: presets, the paper's defaults, dotted overrides, one-line errors naming the field."""

from __future__ import annotations

import pytest
import yaml
from pydantic import BaseModel, Field

from nas.config import (
    PRESETS_DIR,
    Config,
    ConfigError,
    DataConfig,
    RetrainConfig,
    SearchConfig,
    apply_override,
    format_validation_error,
    list_presets,
    load_config,
    to_flat_dict,
)
from nas.genotypes import DARTS_V2, parse_genotype
from nas.ops import PRIMITIVES


def _one_line_error(preset: str | None, overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(preset, overrides)
    message = str(info.value)
    assert message and "\n" not in message and "\r" not in message, message
    return message


# --------------------------------------------------------------------------------------------------- presets


def test_the_shipped_presets_are_listed():
    assert set(list_presets()) >= {"cifar10", "cifar10-cpu", "cifar10-proxy", "digits", "quick"}


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_loads_and_validates(preset):
    cfg = load_config(preset, known_sections_only=True)  # the library's sections of every preset
    assert isinstance(cfg, Config)
    assert cfg.name == preset
    assert parse_genotype(cfg.retrain.genotype) == DARTS_V2  # every preset retrains the paper's cell by default
    # Whatever a preset sets is valid when re-validated on its own (nothing slipped past validation).
    assert Config.model_validate(cfg.model_dump()) == cfg


def test_presets_differ_from_the_defaults_where_they_say_so():
    digits = load_config("digits")
    written = yaml.safe_load((PRESETS_DIR / "digits.yaml").read_text())
    assert digits.data.source == "digits"
    for section in ("search", "retrain"):
        for key, value in written[section].items():
            assert getattr(getattr(digits, section), key) == value, f"{section}.{key}"
    assert digits.search.layers < SearchConfig().layers and digits.search.channels < SearchConfig().channels
    cpu = load_config("cifar10-cpu", known_sections_only=True)
    assert cpu.data.source.startswith("parquet:")
    assert (cpu.data.limit, cpu.data.test_limit) == (4000, 1000)


# --------------------------------------------------------------------------------------------------- defaults


def test_search_defaults_are_the_papers_settings():
    s = Config().search
    assert (s.epochs, s.batch_size, s.layers, s.channels, s.nodes, s.train_portion) == (50, 64, 8, 16, 4, 0.5)
    assert s.primitives == list(PRIMITIVES) and len(s.primitives) == 8
    # Weights: SGD, lr 0.025 annealed (cosine) to 0.001, momentum 0.9, weight decay 3e-4, gradient clip 5.
    assert (s.w_lr, s.w_lr_min, s.w_momentum, s.w_weight_decay, s.w_grad_clip) == (0.025, 0.001, 0.9, 3e-4, 5.0)
    # α: Adam, lr 3e-4, betas (0.5, 0.999), weight decay 1e-3.
    assert (s.alpha_lr, s.alpha_betas, s.alpha_weight_decay) == (3e-4, (0.5, 0.999), 1e-3)
    assert s.xi is None and s.is_second_order()  # ξ = the current weight lr: second order, as in the paper
    assert s.hessian_scale == 0.01


def test_retrain_defaults_are_the_papers_settings():
    r = Config().retrain
    assert (r.epochs, r.batch_size, r.channels, r.layers) == (600, 96, 36, 20)
    assert (r.lr, r.lr_min, r.momentum, r.weight_decay, r.grad_clip) == (0.025, 0.0, 0.9, 3e-4, 5.0)
    assert (r.auxiliary, r.auxiliary_weight, r.drop_path, r.cutout) == (True, 0.4, 0.2, 16)
    assert parse_genotype(r.genotype) == DARTS_V2


def test_the_cifar10_preset_spells_out_exactly_the_defaults():
    cfg = load_config("cifar10", known_sections_only=True)
    assert cfg.search == SearchConfig()
    assert cfg.retrain == RetrainConfig()
    assert cfg.data.source == "cifar10" and cfg.data.num_workers == 4


# --------------------------------------------------------------------------------------------------- overrides


def test_overrides_of_ints_floats_bools_and_lists():
    cfg = load_config(
        "digits",
        [
            "search.epochs=3",
            "search.w_lr=0.1",
            "search.primitives=[none, skip_connect, sep_conv_3x3]",
            "search.alpha_betas=[0.9, 0.99]",
            "retrain.auxiliary=false",
            "data.limit=200",
            "name=my-run",
        ],
    )
    assert cfg.search.epochs == 3 and type(cfg.search.epochs) is int
    assert cfg.search.w_lr == 0.1
    assert cfg.search.primitives == ["none", "skip_connect", "sep_conv_3x3"]
    assert cfg.search.alpha_betas == (0.9, 0.99)
    assert cfg.retrain.auxiliary is False
    assert cfg.data.limit == 200
    assert cfg.name == "my-run"
    # Untouched preset values stay.
    assert cfg.search.layers == 5 and cfg.retrain.layers == 6


def test_null_and_zero_xi():
    assert load_config("digits", ["search.xi=0.01"]).search.xi == 0.01
    cfg = load_config("digits", ["search.xi=0.01", "search.xi=null"])  # the last override wins
    assert cfg.search.xi is None and cfg.search.is_second_order()
    first_order = load_config("digits", ["search.xi=0"]).search
    assert first_order.xi == 0 and not first_order.is_second_order()
    assert load_config("digits", ["data.limit=50", "data.limit=null"]).data.limit is None


def test_overrides_without_a_preset_start_from_the_defaults():
    cfg = load_config(None, ["search.epochs=2"])
    assert cfg.search.epochs == 2
    assert cfg.model_dump(exclude={"search": {"epochs"}}) == Config().model_dump(exclude={"search": {"epochs"}})


def test_apply_override_builds_nested_sections_and_refuses_to_descend_into_values():
    data: dict = {}
    apply_override(data, "search.epochs=4")
    apply_override(data, "retrain.genotype=DARTS_V1")
    apply_override(data, "name=x=y")  # only the first '=' separates key and value
    assert data == {"search": {"epochs": 4}, "retrain": {"genotype": "DARTS_V1"}, "name": "x=y"}
    with pytest.raises(ConfigError, match="'epochs' is not a section"):
        apply_override(data, "search.epochs.inner=1")


# --------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("override", "field", "also"),
    [
        ("search.bogus=1", "search.bogus", "unknown field"),
        ("bogus.epochs=1", "bogus", "unknown field"),
        ("search.xi=-1", "search.xi", "greater than or equal to 0"),
        ("search.primitives=[none, sep_conv_3x3, no_such_op]", "search.primitives", "no_such_op"),
        ("search.primitives=[none]", "search.primitives", "other than 'none'"),
        ("data.source=ftp:somewhere", "data.source", "ftp:somewhere"),
        ("data.source='parquet:'", "data.source", "needs a path"),
        ("data.source=imagefolder", "data.source", "needs a path"),
        ("retrain.genotype=Genotype(normal=1)", "retrain.genotype", "not a genotype"),
        ("retrain.genotype=NO_SUCH_CELL", "retrain.genotype", "NO_SUCH_CELL"),
        ("search.epochs", "search.epochs", "section.field=value"),
        ("search.epochs=many", "search.epochs", "integer"),
        ("search.epochs=0", "search.epochs", "greater than 0"),
        ("search.layers=2", "search.layers", "layers >= 3"),
        ("name=has space", "name", "pattern"),
    ],
)
def test_invalid_overrides_raise_one_line_config_errors_naming_the_field(override, field, also):
    message = _one_line_error("digits", [override])
    assert field in message
    assert also in message


def test_every_failing_field_is_named_on_the_one_line():
    message = _one_line_error("digits", ["search.xi=-1", "data.source=bogus", "retrain.epochs=0"])
    assert message.startswith("invalid config: ")
    for field in ("search.xi", "data.source", "retrain.epochs"):
        assert field in message


def test_a_config_error_is_a_value_error():
    with pytest.raises(ValueError, match="search.xi"):
        load_config("digits", ["search.xi=-1"])


def test_code_in_a_genotype_is_rejected_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    override = f"retrain.genotype=Genotype(normal=__import__('os').system('touch {marker}'))"
    message = _one_line_error("digits", [override])
    assert "retrain.genotype" in message
    assert not marker.exists()


def test_a_multi_line_genotype_error_stays_on_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("retrain:\n  genotype: |\n    Genotype(\n      normal=[('nope', 0)],\n    )\n")
    message = _one_line_error(str(path), [])
    assert "retrain.genotype" in message


def test_the_auxiliary_head_needs_three_retrain_layers():
    message = _one_line_error("digits", ["retrain.layers=2"])
    assert "retrain" in message and "auxiliary" in message
    assert load_config("digits", ["retrain.layers=2", "retrain.auxiliary=false"]).retrain.layers == 2


# --------------------------------------------------------------------------------------------------- files


def test_a_yaml_file_path_is_a_preset(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nsearch:\n  epochs: 7\n  xi: 0\ndata:\n  limit: 100\n")
    for preset in (path, str(path)):
        cfg = load_config(preset, ["search.layers=4"])
        assert cfg.name == "mine"
        assert (cfg.search.epochs, cfg.search.xi, cfg.search.layers, cfg.data.limit) == (7, 0.0, 4, 100)
        assert cfg.retrain == RetrainConfig()  # sections the file leaves out keep their defaults


def test_an_empty_yaml_file_gives_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert load_config(path) == Config()


def test_an_unknown_preset_lists_the_presets():
    message = _one_line_error("no-such-preset", [])
    assert "no-such-preset" in message
    for name in list_presets():
        assert name in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [("search: [unclosed\n", "not valid YAML"), ("- a\n- b\n", "must be a mapping"), ("search: 3\n", "search")],
)
def test_a_bad_yaml_file_is_a_one_line_config_error(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert expected in _one_line_error(str(path), [])


def test_an_unknown_field_in_a_yaml_file_is_named(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("search:\n  epoch: 3\n")
    assert "search.epoch: unknown field" in _one_line_error(str(path), [])


# --------------------------------------------------------------------------------------------------- helpers


def test_to_flat_dict_has_dotted_keys_and_plain_values():
    cfg = load_config("digits", ["search.epochs=3"])
    flat = to_flat_dict(cfg)
    assert flat["search.epochs"] == 3
    assert flat["retrain.genotype"] == "DARTS_V2"
    assert flat["data.source"] == "digits"
    assert flat["name"] == "digits"
    assert flat["search.xi"] is None
    assert flat["search.alpha_betas"] == [0.5, 0.999]
    assert not any(isinstance(v, dict) for v in flat.values())
    assert set(flat) == {"name", "output_dir"} | _leaves("data", DataConfig) | _leaves("search", SearchConfig) | (
        _leaves("retrain", RetrainConfig)
    )


def _leaves(prefix: str, model: type[BaseModel]) -> set[str]:
    """Every field's dotted name, sub-sections (search.speed) descended into."""
    names = set()
    for name, info in model.model_fields.items():
        kind = info.annotation
        nested = isinstance(kind, type) and issubclass(kind, BaseModel)
        names |= _leaves(f"{prefix}.{name}", kind) if nested else {f"{prefix}.{name}"}
    return names


@pytest.mark.parametrize("preset", [None, *list_presets()])
def test_the_config_round_trips_through_model_dump(preset):
    overrides = ["search.xi=0", "search.primitives=[none, skip_connect]", "data.limit=10"]
    cfg = load_config(preset, overrides, known_sections_only=True)
    assert Config.model_validate(cfg.model_dump()) == cfg
    assert Config.model_validate(cfg.model_dump(mode="json")) == cfg
    assert Config.model_validate_json(cfg.model_dump_json()) == cfg


def test_format_validation_error_joins_every_problem():
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as info:
        Config.model_validate({"search": {"xi": -1, "nope": 2}, "extra": {}})
    message = format_validation_error(info.value)
    assert "\n" not in message
    assert message.startswith("invalid config: ")
    assert "search.xi:" in message and "(got -1)" in message
    assert "search.nope: unknown field" in message
    assert "extra: unknown field" in message
    assert message.count("; ") == 2


class _Tracking(BaseModel):
    model_config = Config.model_config
    uri: str = "file:./mlruns"
    every: int = Field(1, gt=0)


class _ExtendedConfig(Config):
    tracking: _Tracking = Field(default_factory=_Tracking)


def test_load_config_builds_the_model_it_is_given():
    cfg = load_config("digits", ["tracking.every=5"], model=_ExtendedConfig)
    assert isinstance(cfg, _ExtendedConfig)
    assert cfg.tracking.every == 5 and cfg.search.epochs == load_config("digits").search.epochs
    assert "tracking.every" in _one_line_error_model(["tracking.every=0"])
    with pytest.raises(ConfigError, match="tracking: unknown field"):
        load_config("digits", ["tracking.every=5"])  # the plain Config has no such section


def _one_line_error_model(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config("digits", overrides, model=_ExtendedConfig)
    assert "\n" not in str(info.value)
    return str(info.value)


# --------------------------------------------------------------------------------------------------- composition


def test_a_preset_builds_on_its_base(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("name: base\nsearch:\n  epochs: 7\n  layers: 4\ndata:\n  limit: 100\n")
    (tmp_path / "sub").mkdir()
    child = tmp_path / "sub" / "child.yaml"
    child.write_text("base: ../base.yaml\nname: child\nsearch:\n  layers: 5\n  primitives: [none, skip_connect]\n")
    cfg = load_config(child, ["search.epochs=9"])
    assert cfg.name == "child" and cfg.data.limit == 100  # inherited section
    assert (cfg.search.epochs, cfg.search.layers) == (9, 5)  # the child and then the override win, field by field
    assert cfg.search.primitives == ["none", "skip_connect"]  # lists replace
    named = tmp_path / "named.yaml"
    named.write_text("base: digits\nname: named\n")
    assert load_config(named).search == load_config("digits").search


def test_quick_is_digits_shrunk():
    written = yaml.safe_load((PRESETS_DIR / "quick.yaml").read_text())
    quick, digits = load_config("quick", known_sections_only=True), load_config("digits")
    assert written["base"] == "digits"
    assert quick.search.layers == written["search"]["layers"] < digits.search.layers
    assert quick.search.alpha_lr == digits.search.alpha_lr and quick.retrain.cutout == digits.retrain.cutout


def test_a_cycle_of_bases_is_one_line(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    assert "cycle" in _one_line_error(str(tmp_path / "a.yaml"), [])
    (tmp_path / "c.yaml").write_text("base: 3\n")
    assert "base must name a preset" in _one_line_error(str(tmp_path / "c.yaml"), [])


def test_sections_of_the_stages_are_dropped_only_when_asked():
    with pytest.raises(ConfigError, match="ray: unknown field"):
        load_config("quick")
    assert load_config("quick", known_sections_only=True).name == "quick"


def test_text_fields_take_overrides_as_written(tmp_path):
    as_json = DARTS_V2.to_json()
    cfg = load_config("digits", [f"retrain.genotype={as_json}", "name=2024"])
    assert cfg.retrain.genotype == as_json and cfg.name == "2024"  # not read as a mapping, nor as a number
    path = tmp_path / "genotype.json"
    path.write_text(as_json)
    from_file = load_config("digits", [f"retrain.genotype={path}"])
    assert from_file.retrain.genotype == as_json  # the file's text travels with the config, not its path


def test_params_round_trip_to_the_same_config():
    from nas.config import from_params, to_params

    cfg = load_config(
        "digits", ["search.xi=null", "search.alpha_lr=1e-3", "data.limit=50", f"retrain.genotype={DARTS_V2.to_json()}"]
    )
    params = to_params(cfg)
    assert all(isinstance(v, str) for v in params.values())
    assert params["search.xi"] == "null" and params["data.source"] == "digits"
    assert from_params(params, Config) == cfg
    with pytest.raises(ConfigError, match="search.bogus"):
        from_params({**params, "search.bogus": "1"}, Config)
