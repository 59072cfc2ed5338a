"""The dry-run planner on the project's recipes (nvfp4_megatron.parallel.planner).

Recipes are read with OmegaConf directly (they are plain YAML under ``# @package _global_``), so
these tests do not depend on the Hydra root config; test_pretrain_dry_run.py covers the CLI.
"""

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from nvfp4_megatron.parallel.layout import LayoutError
from nvfp4_megatron.parallel.planner import plan, run_dry_run

RECIPES = Path(__file__).resolve().parents[2] / "recipes"

# recipe -> the world size its layout is written for (documented in docs/planner.md)
REFERENCE_WORLD = {
    "nvfp4_12b": 1024, "fp8_12b": 1024, "bf16_12b": 1024,
    "nvfp4_8b_hybrid": 256, "mxfp4_8b_hybrid": 256,
    "nvfp4_1p2b": 64, "bf16_1p2b": 64,
    "bf16_llama3_8b": 64, "fp8cs_llama3_8b": 64, "mxfp8_llama3_8b": 64, "nvfp4_llama3_8b": 64,
    "mixtral_8x22b_folding": 128, "mixtral_8x22b_baseline": 128,
    "qwen2_57b_a14b_folding": 64, "qwen2_57b_a14b_baseline": 64,
    "mixtral_tiny_folding": 8, "mixtral_tiny_baseline": 8,
    "mixtral_8gpu_folding": 8, "mixtral_8gpu_baseline": 8,
    "nvfp4_hybrid_proxy": 1, "bf16_hybrid_proxy": 1,
}


def load(name: str):
    return OmegaConf.load(RECIPES / f"{name}.yaml")


def test_nvfp4_12b_at_1024():
    p = plan(load("nvfp4_12b"), 1024)
    assert abs(p.params["total"] - 12.31e9) / 12.31e9 < 0.005
    lay = p.layout
    assert lay.tp * lay.cp * lay.dp * lay.pp == 1024
    assert p.recipe == "nvfp4"
    assert p.bf16_layers == [0, 1, 54, 55, 56, 57, 58, 59, 60, 61]
    assert p.tokens_per_step == 736 * 8192
    assert p.steps == -(-10**13 // (736 * 8192))
    assert p.native and p.gpu.name == "B200"
    # BF16 work (embeddings/LM head, attention cores, SSD, BF16 blocks) is a minority
    assert 0 < p.flops.bf16 < p.flops.quantized
    assert p.max_memory_gib < p.gpu.memory_gib


def test_mixtral_folding_at_128():
    p = plan(load("mixtral_8x22b_folding"), 128)
    lay = p.layout
    assert (lay.tp, lay.ep, lay.etp, lay.pp, lay.cp) == (2, 8, 1, 8, 1)
    assert lay.dp == 8 and lay.edp == 2
    assert p.meta_params == p.params["total"]


def test_mixtral_baseline_differs_only_in_expert_mapping():
    f, b = plan(load("mixtral_8x22b_folding"), 128), plan(load("mixtral_8x22b_baseline"), 128)
    assert (b.layout.tp, b.layout.dp, b.layout.pp) == (f.layout.tp, f.layout.dp, f.layout.pp)
    assert (b.layout.etp, b.layout.ep, b.layout.edp) == (2, 4, 2)
    # the folded layout holds 8/8 = 1 expert per GPU, the baseline 8/4 = 2 experts split in two
    assert f.stages[0].breakdown["expert_params"] == b.stages[0].breakdown["expert_params"]


@pytest.mark.parametrize("world", [100, 96])
def test_world_that_does_not_fit_is_refused(world):
    with pytest.raises(LayoutError) as exc:
        plan(load("mixtral_8x22b_folding"), world)
    msg = str(exc.value)
    assert f"world_size={world}" in msg and "TP=2" in msg and "PP=8" in msg and "EP=8" in msg


def test_run_dry_run_refusal_exits_2(tmp_path, capsys):
    cfg = load("nvfp4_12b")
    cfg.world_size = 1000
    cfg.run_dir = str(tmp_path)
    with pytest.raises(SystemExit) as exc:
        run_dry_run(cfg)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "TP=8 x CP=2 x PP=2 = 32 does not divide world_size=1000" in err
    assert not (tmp_path / "plan.json").exists()


def test_run_dry_run_writes_plan_json(tmp_path, capsys):
    cfg = load("mixtral_tiny_folding")
    cfg.world_size = 8
    cfg.run_dir = str(tmp_path / "run")
    p = run_dry_run(cfg)
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert data["params"]["total"] == p.params["total"] == data["meta_device_params"]
    assert data["layout"]["expert_model_parallel_size"] == 4
    assert data["layout"]["data_parallel_size"] == 2
    assert data["rank_groups"]["ep"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert data["rank_groups"]["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert data["tokens_per_s"] == pytest.approx(p.tokens_per_s)
    assert "rank table" in out and "ep    groups: [[0, 1, 2, 3], [4, 5, 6, 7]]" in out
    assert f"{p.params['total']:,}" in out


def test_no_rank_table_for_large_worlds(tmp_path, capsys):
    cfg = load("mixtral_8x22b_folding")
    cfg.world_size = 128
    cfg.run_dir = str(tmp_path)
    run_dry_run(cfg)
    assert "rank table" not in capsys.readouterr().out
    assert "rank_groups" not in json.loads((tmp_path / "plan.json").read_text())


def test_gpu_type_and_emulation_note():
    cfg = load("nvfp4_llama3_8b")
    cfg.planner = {"gpu_type": "H100", "assumed_mfu": 0.5}
    p = plan(cfg, 64)
    assert not p.native and p.gpu.name == "H100" and p.assumed_mfu == 0.5
    assert any("emulated" in n for n in p.notes)
    assert p.step_time_s == pytest.approx(p.step_time_bf16_bound_s, rel=1e-12)
    cfg.planner = {"gpu_type": "MI300"}
    with pytest.raises(ValueError, match="planner.gpu_type='MI300' unknown; known: "):
        plan(cfg, 64)


def test_lower_precision_is_faster_on_blackwell():
    t = {n: plan(load(n), 64).step_time_s for n in
         ("bf16_llama3_8b", "fp8cs_llama3_8b", "mxfp8_llama3_8b", "nvfp4_llama3_8b")}
    assert t["nvfp4_llama3_8b"] < t["mxfp8_llama3_8b"] < t["fp8cs_llama3_8b"] < t["bf16_llama3_8b"]


@pytest.mark.parametrize("name", sorted(REFERENCE_WORLD))
def test_every_recipe_plans_at_its_reference_world(name):
    text = (RECIPES / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    assert "arXiv" in text or "Megatron-Bridge" in text or "_tiny_" in name  # source cited
    p = plan(load(name), REFERENCE_WORLD[name])
    assert p.params["total"] > 0 and p.step_time_s > 0


def test_all_paper_recipes_are_covered():
    present = {p.stem for p in RECIPES.glob("*.yaml") if "_tiny" not in p.stem}
    ours = {n for n in REFERENCE_WORLD if "_tiny" not in n}
    assert ours <= present


def test_unset_bf16_blocks_take_the_registered_recipe_default():
    cfg = load("nvfp4_1p2b")
    cfg.precision = {"recipe": "nvfp4"}  # no bf16_* keys: the registry's nvfp4 keeps 2 + 8 BF16
    p = plan(cfg, 64)
    assert p.bf16_layers == [0, 1] + list(range(12, 20))
    cfg.precision = {"recipe": "nvfp4", "bf16_first_blocks": 0, "bf16_last_blocks": 0,
                     "bf16_blocks": [5]}
    assert plan(cfg, 64).bf16_layers == [5]
    cfg.precision = {"recipe": "nvfp4", "bf16_first_blocks": 15, "bf16_last_blocks": 8}
    with pytest.raises(ValueError, match="bf16_first_blocks=15 \\+ bf16_last_blocks=8 exceeds "
                                         "the model's 20 blocks"):
        plan(cfg, 64)
    cfg.precision = {"recipe": "fp7"}
    with pytest.raises(ValueError, match="unknown precision recipe 'fp7'"):
        plan(cfg, 64)


@pytest.mark.parametrize("name", sorted(REFERENCE_WORLD))
def test_every_recipe_composes_against_the_schema_and_plans(name):
    """Through the project's Hydra composition (typed schemas, enums), as pretrain.py sees it."""
    from nvfp4_megatron.cli.compose import compose_config

    world = REFERENCE_WORLD[name]
    cfg = compose_config([f"+recipe={name}", "dry_run=true", f"world_size={world}"])
    direct = plan(load(name), world, meta_build=False)
    composed = plan(cfg, world, meta_build=False)
    assert composed.params == direct.params
    assert composed.layout == direct.layout
    assert composed.steps == direct.steps and composed.bf16_layers == direct.bf16_layers


def test_local_mamba_rules_refuse_on_the_emulated_backend_and_are_notes_otherwise():
    """fp8_12b at TP8: in_proj shard 2832 rows (not whole 128-blocks) and CP2, which the local
    mixer cannot run. The dry run plans the Blackwell target (TE + mamba_ssm) with a note each;
    precision.backend=emulated (what the training loop checks with the local mixer) refuses."""
    p = plan(load("fp8_12b"), 1024, meta_build=False)
    notes = "\n".join(p.notes)
    assert "rows 2832 is not a multiple of 128 (recipe fp8_block" in notes
    assert "CP=2 > 1 with Mamba layers" in notes
    cfg = load("fp8_12b")
    cfg.precision.backend = "emulated"
    with pytest.raises(LayoutError) as err:
        plan(cfg, 1024, meta_build=False)
    assert "rows 2832 is not a multiple of 128" in str(err.value)
    assert "CP=2 > 1 with Mamba layers" in str(err.value)
    # NVFP4 blocks are 16: only CP remains; at CP1 the 12B is accepted on the emulated backend
    cfg = load("nvfp4_12b")
    cfg.precision.backend = "emulated"
    cfg.parallel.context_parallel_size = 1
    assert plan(cfg, 512, meta_build=False).layout.cp == 1
    # Mamba blocks all in BF16 (bf16 recipe): no block rule
    p = plan(load("bf16_12b"), 1024, meta_build=False)
    assert not any("not a multiple" in n for n in p.notes)


def test_mamba_num_heads_unset_is_derived_like_megatron():
    from nvfp4_megatron.parallel.model_stats import ModelShape

    m = dict(OmegaConf.to_container(load("nvfp4_hybrid_tiny").model))
    m["mamba_num_heads"] = None
    assert ModelShape.from_cfg(m).mamba_num_heads == 2 * 64 // 4
    with pytest.raises(ValueError, match="not a multiple of mamba_head_dim=5"):
        ModelShape.from_cfg({**m, "mamba_head_dim": 5})


def _layer_times_file(tmp_path, **over) -> str:
    lt = {"format": "nvfp4_megatron.layer_times.v1", "gpu": "NVIDIA H200", "seq_length": 8192,
          "micro_batch_size": 1, "tensor_model_parallel_size": 1,
          "model": {"hidden_size": 5120, "mamba_num_heads": 128, "ffn_hidden_size": 20480},
          "fwd_bwd_ms": {"bf16": {"M": 10.0, "*": 4.0, "-": 6.0},
                         "nvfp4": {"M": 20.0, "*": 8.0, "-": 12.0}}}
    lt.update(over)
    path = tmp_path / "layers.json"
    path.write_text(json.dumps({"meta": {}, "layer_times": lt}))
    return str(path)


def test_step_estimate_from_measured_layer_times(tmp_path, capsys):
    """12B on 64 H200 at TP8 CP1 PP2: per micro-batch each GPU holds 1/8 of 8192 tokens of every
    layer of its stage. Stage 0 = blocks 0-30: BF16 0-1 (M, -), NVFP4 2-30; stage 1 = blocks
    31-61: NVFP4 31-53, BF16 54-61."""
    cfg = load("nvfp4_12b")
    cfg.parallel.context_parallel_size = 1
    cfg.planner = {"gpu_type": "H200", "layer_times": _layer_times_file(tmp_path)}
    p = plan(cfg, 64, meta_build=False)
    pat = cfg.model.hybrid_override_pattern
    ms = {"bf16": {"M": 10.0, "*": 4.0, "-": 6.0}, "nvfp4": {"M": 20.0, "*": 8.0, "-": 12.0}}
    bf16 = {0, 1, *range(54, 62)}
    stage = [sum(ms["bf16" if i in bf16 else "nvfp4"][pat[i]] for i in rng) * 1e-3 / 8
             for rng in (range(0, 31), range(31, 62))]
    head = 3 * 2 * 5120 * 131072 * 8192 / 8 / (989.5e12 * 0.4)  # LM head, BF16 at 40 %
    assert p.gpu.bf16_tflops == 989.5
    nmb = p.layout.num_microbatches
    expect = max(stage[0], stage[1] + head) * nmb * (1 + 1 / nmb)
    assert p.measured["step_time_s"] == pytest.approx(expect, rel=1e-12)
    assert p.measured["gpu_mismatch"] is None
    assert ("at nvfp4 and bf16 on NVIDIA H200, seq 8192, micro-batch 1, TP1"
            in p.measured["measured"])
    assert "no communication" in p.measured["assumed"]
    out = run_dry_run(OmegaConf.merge(cfg, {"world_size": 64, "run_dir": str(tmp_path)}))
    text = capsys.readouterr().out
    assert "from layers: step" in text and "  measured  : " in text and "  assumed   : " in text
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["step_time_from_layer_times"]["step_time_s"] == pytest.approx(expect)
    assert out.measured is not None
    # planning another GPU with H200 figures says so
    cfg.planner.gpu_type = "B200"
    assert any("measured on NVIDIA H200, planning for B200" in n
               for n in plan(cfg, 64, meta_build=False).notes)


def test_layer_times_that_do_not_fit_are_refused(tmp_path):
    cfg = load("nvfp4_12b")
    cfg.parallel.context_parallel_size = 1
    cfg.planner = {"gpu_type": "H200",
                   "layer_times": _layer_times_file(tmp_path, fwd_bwd_ms={"bf16": {"M": 1.0}})}
    # the BF16 blocks 0-1 and 54-61 hold no attention layer: bf16/* is not needed
    with pytest.raises(ValueError, match=r"has no time for \['bf16/-', 'nvfp4/\*', 'nvfp4/-', "
                                         r"'nvfp4/M'\] \(recipe/layer kind; it has \['bf16/M'\]\)"):
        plan(cfg, 64, meta_build=False)
    cfg.planner.layer_times = _layer_times_file(tmp_path, model={"hidden_size": 512})
    with pytest.raises(ValueError, match=r"another layer shape: hidden_size=512 \(plan: 5120\)"):
        plan(cfg, 64, meta_build=False)
    cfg.planner.layer_times = _layer_times_file(tmp_path, format="other")
    with pytest.raises(ValueError, match="not a layer-times file"):
        plan(cfg, 64, meta_build=False)


def test_hybrid_proxy_has_the_12b_pattern_and_passes_the_local_mixer_rules():
    """The one-GPU proxy: the 12B's 62-block pattern and BF16 blocks at reduced width, accepted by
    the layout rules of the emulated backend (the local Mamba mixer runs on the H200)."""
    big = load("nvfp4_12b")
    for name in ("nvfp4_hybrid_proxy", "bf16_hybrid_proxy"):
        cfg = load(name)
        assert cfg.model.hybrid_override_pattern == big.model.hybrid_override_pattern
        cfg.precision.backend = "emulated"
        p = plan(cfg, 1)
        assert p.meta_params == 118_964_352 and not p.notes, p.notes
    assert plan(load("nvfp4_hybrid_proxy"), 1).bf16_layers == plan(big, 1024).bf16_layers


# The compute classes as they were written by hand per recipe name before they were derived from
# the recipes' properties (issue 19): the derivation must reproduce every one of them exactly.
_HAND_WRITTEN_COMPUTE = {
    "bf16": ("bf16", 2.0, 0.0, False),
    "fp8_cs": ("fp8", 1.0, 1.0, False),
    "fp8_block": ("fp8", 1.0 + 4 / 128, 1.0 + 4 / 16384, False),
    "mxfp8": ("fp8", 1.0 + 1 / 32, 1.0 + 1 / 32, True),
    "mxfp4": ("fp4", 0.5 + 1 / 32, 0.5 + 1 / 32, True),
    **{n: ("fp4", 0.5 + 1 / 16, 0.5 + 1 / 16, False)
       for n in ("nvfp4", "nvfp4_no_rht", "nvfp4_no_sr", "nvfp4_no_2d", "nvfp4_all_layers")},
    "msfp4": ("fp4", 0.5 + 0.12, 0.5, False),
    "msfp4_no_dge": ("fp4", 0.5 + 0.12, 0.5, False),
    "msfp4_no_occ": ("fp4", 0.5, 0.5, False),
    "fp4_direct": ("fp4", 0.5, 0.5, False),
    # fwd_only saves X in BF16 for its BF16 Wgrad and keeps the Fprop weight copy; bwd_only saves
    # X's NVFP4 Wgrad copy and keeps the Dgrad weight copy
    "nvfp4_fwd_only": ("fp4", 2.0, 0.5 + 1 / 16, False),
    "nvfp4_bwd_only": ("fp4", 0.5 + 1 / 16, 0.5 + 1 / 16, False),
}


@pytest.mark.parametrize("name", sorted(_HAND_WRITTEN_COMPUTE))
def test_compute_class_is_derived_from_the_recipe(name):
    from nvfp4_megatron.parallel.hardware import recipe_compute
    from nvfp4_megatron.quant.registry import get_recipe

    rc = recipe_compute(get_recipe(name))
    assert (rc.gemm_class, rc.act_bytes, rc.weight_bytes, rc.mx) == _HAND_WRITTEN_COMPUTE[name]


def test_compute_class_follows_recipe_overrides_not_names():
    from nvfp4_megatron.parallel.hardware import recipe_compute
    from nvfp4_megatron.quant.registry import build_recipe

    # nvfp4 + OCC (the precision.occ knob): the Wgrad copy carries OCC's residual
    occ = recipe_compute(build_recipe("nvfp4", occ={"enabled": True}))
    assert occ.act_bytes == 0.5 + 1 / 16 + 0.12
    no_comp = recipe_compute(build_recipe("msfp4", occ={"compensate": False}))
    assert no_comp.act_bytes == 0.5


def test_every_registered_recipe_has_a_compute_class():
    from nvfp4_megatron.parallel.hardware import recipe_compute
    from nvfp4_megatron.quant.registry import get_recipe, list_recipes

    for name in list_recipes():
        assert recipe_compute(get_recipe(name)).gemm_class in ("bf16", "fp8", "fp4")
