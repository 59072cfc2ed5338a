"""Config composition: every recipe composes; bad keys, values and recipe names say what is valid."""

from pathlib import Path

import pytest

from nvfp4_megatron.cli import pretrain
from nvfp4_megatron.cli.compose import ConfigError, compose_config, known_recipes, to_plain

RECIPES = sorted(p.stem for p in (Path(__file__).parents[2] / "recipes").glob("*.yaml"))


def test_recipes_found():
    assert "nvfp4_tiny" in RECIPES and RECIPES == known_recipes()


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_composes(name):
    cfg = compose_config([f"+recipe={name}"])
    plain = to_plain(cfg)
    assert set(plain) >= {"model", "precision", "parallel", "data", "train", "logging",
                          "dry_run", "world_size", "run_dir"}
    assert plain["model"]["num_layers"] >= 1
    assert isinstance(plain["precision"]["recipe"], str)


def test_recipe_values_override_defaults_and_cli_overrides_recipe():
    cfg = compose_config(["+recipe=nvfp4_tiny", "train.lr=0.5", "model.hidden_size=32"])
    assert cfg.precision.recipe == "nvfp4"
    assert cfg.train.lr == 0.5 and cfg.model.hidden_size == 32
    assert cfg.train.train_iters == 300  # from the recipe, not configs/train/default.yaml (100)


def test_composed_config_is_read_only():
    cfg = compose_config([])
    with pytest.raises(Exception):
        cfg.train.lr = 1.0


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        compose_config(["train.lrr=1"])
    msg = str(e.value)
    assert "'lrr'" in msg and "valid keys" in msg and "global_batch_size" in msg


def test_unknown_key_inside_a_recipe_group_value():
    with pytest.raises(ConfigError, match="valid keys.*num_layers"):
        compose_config(["model.num_layer=3"])


def test_bad_enum_value_lists_choices():
    with pytest.raises(ConfigError) as e:
        compose_config(["train.lr_schedule=linear"])
    assert "wsd" in str(e.value) and "cosine" in str(e.value)


def test_wrong_type_fails():
    with pytest.raises(ConfigError, match="num_layers"):
        compose_config(["model.num_layers=abc"])


def test_unknown_recipe_lists_known():
    with pytest.raises(ConfigError) as e:
        compose_config(["+recipe=nvfp4_tinyy"])
    assert "nvfp4_tiny" in str(e.value) and "bf16_tiny" in str(e.value)


def test_main_returns_2_on_bad_config(capsys):
    assert pretrain.main(["train.nope=1"]) == 2
    assert "valid keys" in capsys.readouterr().err


def test_dry_run_calls_planner_and_launches_nothing(monkeypatch):
    from nvfp4_megatron.parallel import planner

    seen = []
    monkeypatch.setattr(planner, "run_dry_run", lambda cfg: seen.append(cfg.world_size))
    import nvfp4_megatron.training.loop as loop

    monkeypatch.setattr(loop, "run", lambda cfg: pytest.fail("dry_run must not train"))
    assert pretrain.main(["+recipe=nvfp4_12b", "dry_run=true", "world_size=1024"]) == 0
    assert seen == [1024]
