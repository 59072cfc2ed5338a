"""Config input checks (issue 14, row 3): every numeric field's range, cross-field rules, unknown
keys added with '+', hydra.run.dir, and Hydra's --help / --cfg job / --info flags. Bad input exits 2
before anything is written."""

import os
from pathlib import Path

import pytest
import yaml

from nvfp4_megatron.cli import pretrain, schema
from nvfp4_megatron.cli.compose import ConfigError, compose_config, to_plain

RECIPES = sorted(p.stem for p in (Path(__file__).parents[2] / "recipes").glob("*.yaml"))


@pytest.fixture
def no_training(monkeypatch, tmp_path):
    """Run main() in an empty directory; fail if training or the planner would start."""
    import nvfp4_megatron.training.loop as loop
    from nvfp4_megatron.parallel import planner

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loop, "run", lambda cfg: pytest.fail("must not train"))
    monkeypatch.setattr(planner, "run_dry_run", lambda cfg: pytest.fail("must not plan"))
    return tmp_path


def _nothing_written(where: Path) -> bool:
    return list(where.iterdir()) == []


# ---- every numeric field has a declared range -------------------------------------------------

def test_every_numeric_field_declares_a_range():
    fields = schema.numeric_fields()
    missing = [key for key, _, rng in fields if rng is None]
    assert missing == [], f"numeric fields without a range (use schema.num(...)): {missing}"
    keys = {key for key, _, _ in fields}
    assert {"model.seq_length", "train.keep_last", "planner.assumed_mfu", "world_size",
            "data.default_corpus_max_mb", "precision.switch_to_bf16.at_step"} <= keys


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_passes_validation(name):
    assert schema.validate(to_plain(compose_config([f"+recipe={name}"]))) == []


# ---- ranges: bad values refused, naming key, value and range; boundaries accepted --------------

BAD = [
    ("model.seq_length=0", "model.seq_length=0: must be >= 1"),
    ("model.hidden_size=0", "model.hidden_size=0: must be >= 1"),
    ("model.num_layers=-1", "model.num_layers=-1: must be >= 1"),
    ("model.vocab_size=0", "model.vocab_size=0: must be >= 1"),
    ("model.ffn_hidden_size=0", "model.ffn_hidden_size=0: must be >= 1 or null"),
    ("model.hidden_dropout=1.0", "model.hidden_dropout=1.0: must be in [0, 1)"),
    ("model.attention_dropout=-0.1", "model.attention_dropout=-0.1: must be in [0, 1)"),
    ("model.init_method_std=0", "model.init_method_std=0.0: must be > 0"),
    ("parallel.tensor_model_parallel_size=0",
     "parallel.tensor_model_parallel_size=0: must be >= 1"),
    ("data.default_corpus_max_mb=0", "data.default_corpus_max_mb=0.0: must be > 0"),
    ("train.micro_batch_size=0", "train.micro_batch_size=0: must be >= 1"),
    ("train.train_iters=0", "train.train_iters=0: must be >= 1 or null"),
    ("train.lr=0", "train.lr=0.0: must be > 0"),
    ("train.lr=inf", "train.lr=inf: must be > 0"),
    ("train.min_lr=-1e-5", "train.min_lr=-1e-05: must be >= 0"),
    ("train.warmup_iters=-1", "train.warmup_iters=-1: must be >= 0"),
    ("train.lr_decay_fraction=0", "train.lr_decay_fraction=0.0: must be in (0, 1]"),
    ("train.lr_decay_fraction=1.5", "train.lr_decay_fraction=1.5: must be in (0, 1]"),
    ("train.adam_beta1=1.0", "train.adam_beta1=1.0: must be in [0, 1)"),
    ("train.adam_beta2=-0.1", "train.adam_beta2=-0.1: must be in [0, 1)"),
    ("train.clip_grad=-1", "train.clip_grad=-1.0: must be >= 0"),
    ("train.weight_decay=-0.1", "train.weight_decay=-0.1: must be >= 0"),
    ("train.seed=-1", "train.seed=-1: must be in [0, 4294967295]"),
    ("train.log_interval=0", "train.log_interval=0: must be >= 1"),
    ("train.eval_interval=-1", "train.eval_interval=-1: must be >= 0 or null"),
    ("train.eval_iters=0", "train.eval_iters=0: must be >= 1"),
    ("train.save_interval=0", "train.save_interval=0: must be >= 1 or null"),
    ("train.keep_last=-1", "train.keep_last=-1: must be >= 1"),
    ("planner.assumed_mfu=0", "planner.assumed_mfu=0.0: must be in (0, 1]"),
    ("planner.assumed_mfu=1.2", "planner.assumed_mfu=1.2: must be in (0, 1]"),
    ("world_size=0", "world_size=0: must be >= 1 or null"),
    ("precision.bf16_blocks=[0,-1]", "items [-1] out of range; each item must be >= 0"),
    ("precision.dge.k=1", "precision.dge.k=1.0: must be > 1 or null (the paper uses 5)"),
    ("precision.dge.cap=0", "precision.dge.cap=0.0: must be > 0 or null"),
    ("precision.occ.quantile=0.5", "precision.occ.quantile=0.5: must be in (0.5, 1) or null"),
    ("precision.occ.quantile=1", "precision.occ.quantile=1.0: must be in (0.5, 1) or null"),
    ("logging.quant_stats_interval=0", "logging.quant_stats_interval=0: must be >= 1 or null"),
]


@pytest.mark.parametrize("override,expected", BAD, ids=[b[0] for b in BAD])
def test_out_of_range_value_is_refused(override, expected):
    with pytest.raises(ConfigError) as e:
        compose_config([override])
    assert expected in str(e.value)


@pytest.mark.parametrize("overrides", [
    ["train.eval_interval=0"], ["train.eval_interval=null"], ["train.save_interval=1"],
    ["train.keep_last=1"], ["train.warmup_iters=0"], ["train.lr_decay_fraction=1"],
    ["model.hidden_dropout=0"], ["planner.assumed_mfu=1"], ["train.clip_grad=0"],
    ["train.min_lr=0"], ["precision.switch_to_bf16.at_step=0"],
    ["logging.quant_stats_interval=1"],
    ["precision.recipe=nvfp4", "precision.occ.enabled=true", "precision.occ.quantile=0.97",
     "precision.dge.enabled=true", "precision.dge.k=1.5", "precision.dge.cap=0.1"],
    ["precision=msfp4", "precision.recipe=fp4_direct"],
])
def test_boundary_values_are_accepted(overrides):
    compose_config(overrides)


def test_all_violations_in_one_message_and_exit_2_before_any_directory(no_training, capsys):
    run_dir = no_training / "run"
    rc = pretrain.main(["model.seq_length=0", "model.hidden_size=0", "model.num_layers=-1",
                        "train.keep_last=-1", "train.save_interval=0", f"run_dir={run_dir}"])
    err = capsys.readouterr().err
    assert rc == 2
    for line in ("model.seq_length=0: must be >= 1", "model.hidden_size=0: must be >= 1",
                 "model.num_layers=-1: must be >= 1", "train.keep_last=-1: must be >= 1",
                 "train.save_interval=0: must be >= 1 or null"):
        assert line in err
    assert "5 invalid config value(s)" in err
    assert not run_dir.exists() and _nothing_written(no_training)


# ---- cross-field rules (not layout rules) -------------------------------------------------------

@pytest.mark.parametrize("overrides,expected", [
    (["dry_run=true"], "dry_run=true needs world_size=N"),
    (["train.min_lr=0.01", "train.lr=0.001"], "train.min_lr=0.01 must be <= train.lr=0.001"),
    (["train.train_iters=null"], "set train.train_iters or train.train_tokens"),
    (["train.warmup_iters=100", "train.train_iters=100"], "train.warmup_iters=100 must be <"),
    (["model.num_attention_heads=4", "model.num_query_groups=3"], "multiple of"),
    (["model.hidden_size=2", "model.num_attention_heads=4"], "kv_channels=null"),
    (["model.num_moe_experts=2", "model.moe_router_topk=3"], "moe_router_topk=3 must be <="),
    (["precision.switch_to_bf16.at_step=5", "precision.switch_to_bf16.at_tokens=1e6"],
     "not both"),
    (["precision.bf16_blocks=[1,1]"], "lists an index twice"),
    (["data.split=abc"], "data.split='abc'"),
    (["precision.recipe=nvfp5"], "precision.recipe='nvfp5' is not a recipe (did you mean 'nvfp4'?)"),
    (["precision.recipe=mxfp8", "precision.occ.enabled=true"],
     "precision.occ.enabled=true needs a recipe whose Fprop is FP4"),
    (["precision.recipe=fp4_direct", "precision.dge.cap=2"], "precision.dge.cap is set but DGE is off"),
    (["precision.recipe=msfp4", "precision.occ.enabled=false", "precision.occ.quantile=0.9"],
     "precision.occ.quantile is set but OCC is off"),
    (["precision.recipe=msfp4", "parallel.tensor_model_parallel_size=2"],
     "needs parallel.tensor_model_parallel_size=1, got 2"),
    (["logging.quant_stats_occ_table=true"], "logging.quant_stats_occ_table=true needs "
                                             "logging.quant_stats_interval=N"),
])
def test_cross_field_rule(overrides, expected):
    with pytest.raises(ConfigError, match="invalid config value") as e:
        compose_config(overrides)
    assert expected in str(e.value)


def test_dry_run_without_world_size_exits_2_without_traceback(no_training, capsys):
    assert pretrain.main(["+recipe=nvfp4_12b", "dry_run=true"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "world_size=N" in err and "Traceback" not in err
    assert _nothing_written(no_training)


# ---- unknown keys added with '+' ----------------------------------------------------------------

@pytest.mark.parametrize("override", ["+train.lrr=1", "++train.lrr=1"])
def test_unknown_key_added_with_plus_is_refused_like_without(override, no_training, capsys):
    assert pretrain.main(["train.lrr=1"]) == 2
    plain = capsys.readouterr().err
    assert pretrain.main([override]) == 2
    plus = capsys.readouterr().err
    assert "unknown key 'lrr' in train; valid keys:" in plain
    valid_line = next(ln for ln in plain.splitlines() if "valid keys" in ln)
    assert valid_line in plus and override in plus
    assert _nothing_written(no_training)


@pytest.mark.parametrize("override,where", [("+lrr=3", "the top level"),
                                            ("+model.foo.bar=1", "model")])
def test_unknown_key_with_plus_at_other_depths(override, where):
    with pytest.raises(ConfigError) as e:
        compose_config([override])
    assert f"in {where}; valid keys:" in str(e.value)


def test_plus_recipe_still_selects_a_recipe():
    cfg = compose_config(["+recipe=nvfp4_tiny"])
    assert cfg.precision.recipe == "nvfp4" and "recipe" not in cfg


# ---- hydra.run.dir ------------------------------------------------------------------------------

def test_hydra_run_dir_is_refused_naming_run_dir(no_training, capsys):
    target = no_training / "out"
    assert pretrain.main([f"hydra.run.dir={target}"]) == 2
    err = capsys.readouterr().err
    assert "hydra.run.dir" in err and f"run_dir={target}" in err
    assert not target.exists() and _nothing_written(no_training)


def test_other_hydra_settings_are_refused(no_training, capsys):
    assert pretrain.main(["hydra.job.name=x"]) == 2
    assert "no effect here" in capsys.readouterr().err


# ---- --help, --cfg job, --info ------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_usage_and_exits_0(flag, no_training, capsys):
    assert pretrain.main([flag]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: pretrain.py")
    for word in ("model", "precision", "parallel", "train", "nvfp4_tiny", "nvfp4_12b",
                 "+recipe=", "Examples:", "dry_run=true world_size=1024", "run_dir="):
        assert word in out
    assert _nothing_written(no_training)


@pytest.mark.parametrize("args", [["--cfg", "job"], ["--cfg=job"], ["-c", "job"]])
def test_cfg_job_prints_the_composed_config(args, no_training, capsys):
    assert pretrain.main(["+recipe=nvfp4_tiny", *args, "train.lr=0.5"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == to_plain(compose_config(["+recipe=nvfp4_tiny", "train.lr=0.5"]))
    assert printed["train"]["lr"] == 0.5
    assert _nothing_written(no_training)


def test_cfg_job_with_package(no_training, capsys):
    assert pretrain.main(["--cfg", "job", "--package", "train"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert "global_batch_size" in printed and "model" not in printed


def test_cfg_job_with_bad_value_exits_2(no_training, capsys):
    assert pretrain.main(["--cfg", "job", "train.keep_last=0"]) == 2
    assert "train.keep_last=0: must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--info"], ["--info", "all"], ["-i"]])
def test_info_prints_search_path_defaults_and_config(args, no_training, capsys):
    assert pretrain.main(["+recipe=nvfp4_tiny", *args]) == 0
    out = capsys.readouterr().out
    assert "Config search path" in out and "configs" in out
    assert "Defaults list" in out and "recipe/nvfp4_tiny" in out and "model/tiny" in out
    assert "Config\n------" in out and "recipe: nvfp4" in out
    assert _nothing_written(no_training)


def test_info_defaults_only(no_training, capsys):
    assert pretrain.main(["--info", "defaults", "model=small"]) == 0
    out = capsys.readouterr().out
    assert "model/small" in out and "Config search path" not in out


@pytest.mark.parametrize("args,expected", [
    (["--foo"], "unknown flag '--foo'"),
    (["--cfg"], "--cfg needs a value"),
    (["--cfg", "jobs"], "choose one of"),
    (["--cfg", "train.lr=1"], "--cfg needs a value"),
    (["--info", "everything"], "choose one of"),
    (["-m", "train.lrr=1,2"], "job 'train.lrr=1': invalid config"),
    (["-m", "precision.recipe=bf16,nvfp5"], "job 'precision.recipe=nvfp5'"),
    (["-m", "train.lr=1e-3", "run_dir=a,b"], "run_dir is the sweep directory"),
    (["-m", "train.lr=interval(0.1,1)"], "interval sweeps"),
    (["--nproc", "2", "train.lr=1"], "--nproc goes with -m"),
    (["-m", "--nproc", "0", "train.lr=1"], "--nproc '0'"),
    (["--config-name", "other"], "+recipe=NAME"),
])
def test_bad_flags_exit_2(args, expected, no_training, capsys):
    assert pretrain.main(args) == 2
    assert expected in capsys.readouterr().err
    assert _nothing_written(no_training)


def test_dry_run_still_works(monkeypatch, tmp_path):
    from nvfp4_megatron.parallel import planner

    monkeypatch.chdir(tmp_path)
    seen = []
    monkeypatch.setattr(planner, "run_dry_run", lambda cfg: seen.append(cfg.world_size))
    assert pretrain.main(["+recipe=nvfp4_12b", "dry_run=true", "world_size=1024"]) == 0
    assert seen == [1024]
    assert os.getcwd() == str(tmp_path)
