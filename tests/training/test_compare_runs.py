"""scripts/compare_runs.py on hand-made run directories: arms, seeds, gaps, resumed rows."""

import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parents[2] / "scripts"))
import compare_runs  # noqa: E402


def _run(root: Path, name: str, recipe: str, seed: int, valid: dict[int, float], *,
         finished=True, extra_rows=(), last_blocks=0) -> Path:
    d = root / name
    d.mkdir(parents=True)
    cfg = {"model": {"seq_length": 8}, "train": {"seed": seed, "global_batch_size": 2},
           "precision": {"recipe": recipe, "bf16_last_blocks": last_blocks},
           "run_dir": str(d), "logging": {"plot": True}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows = [{"kind": "train", "step": s, "loss": 5.0 - s / 10, "tokens": s * 16, "step_time_s": 0.5}
            for s in range(1, 5)]
    rows += [{"kind": "valid", "step": s, "loss": v} for s, v in valid.items()]
    rows += list(extra_rows)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if finished:
        (d / "result.json").write_text(json.dumps({"iteration": 4, "stopped_by_signal": None}))
    return d


def test_table_groups_seeds_into_arms_and_measures_the_gap(tmp_path, capsys):
    sw = tmp_path / "sweep"
    _run(sw, "a1", "bf16", 1, {2: 4.0, 4: 3.0})
    _run(sw, "a2", "bf16", 2, {2: 4.0, 4: 3.2})
    # a resumed run: step 3 and 4 logged twice; the last rows win (train time counts each once)
    _run(sw, "b1", "nvfp4", 1, {4: 3.5}, extra_rows=[
        {"kind": "train", "step": 4, "loss": 9.0, "tokens": 64, "step_time_s": 0.5},
        {"kind": "valid", "step": 4, "loss": 3.3}])
    _run(sw, "b2", "nvfp4", 2, {4: 3.4})
    _run(tmp_path, "c1", "mxfp4", 1, {2: 4.1}, finished=False)  # stopped at step 4, no final eval
    out = tmp_path / "report"
    assert compare_runs.main([str(sw), str(tmp_path / "c1"), "--baseline", "bf16",
                              "--out", str(out)]) == 0
    data = json.loads((out / "compare.json").read_text())
    arms = {a["arm"]: a for a in data["arms"]}
    assert data["baseline"] == "bf16" and set(arms) == {"bf16", "nvfp4", "mxfp4"}
    assert arms["bf16"]["final_valid_loss"] == pytest.approx(3.1)
    assert arms["bf16"]["spread"] == pytest.approx(0.2)
    assert arms["nvfp4"]["final_valid_loss"] == pytest.approx(3.35)
    assert arms["nvfp4"]["gap_nats"] == pytest.approx(0.25)
    assert arms["nvfp4"]["gap_rel_pct"] == pytest.approx(100 * 0.25 / 3.1)
    assert arms["nvfp4"]["tokens"] == [64] and arms["nvfp4"]["train_time_s"] == pytest.approx(2.0)
    assert arms["nvfp4"]["seeds"] == ["1", "2"] and arms["nvfp4"]["finished"]
    assert arms["mxfp4"]["final_valid_loss"] is None and not arms["mxfp4"]["finished"]
    # paired: nvfp4 seed 1 (3.3) - bf16 seed 1 (3.0) = 0.3, seed 2: 3.4 - 3.2 = 0.2
    assert arms["nvfp4"]["paired_gaps"] == pytest.approx([0.3, 0.2])
    assert arms["nvfp4"]["paired_gap_nats"] == pytest.approx(0.25)
    assert arms["bf16"]["paired_gap_nats"] is None and arms["mxfp4"]["paired_gap_nats"] is None
    md = (out / "compare.md").read_text()
    # paired train gap, last 100 common steps (1-4): seed 1 (0 + 0 + 0 + 9.0 - 4.6) / 4 = 1.1, seed 2: 0
    assert arms["nvfp4"]["paired_train_gaps"] == pytest.approx([1.1, 0.0])
    assert ("| nvfp4 | 1, 2 | 3.3500 | +0.2500 | +8.06 | +0.2500 [+0.2000, +0.3000] "
            "| +0.5500 [+0.0000, +1.1000] | 0.1000 |") in md
    assert arms["bf16"]["paired_train_gap_nats"] is None
    # the unfinished mxfp4 run still gets its paired gap at the step it reached (4.1 - 4.0 at step 2)
    assert "| mxfp4 (unfinished) | 1 | +0.1000 |  |" in md
    assert "| nvfp4 | 2 |  | +0.2000 |" in md
    assert "mxfp4 (unfinished)" in md
    assert (out / "compare.png").stat().st_size > 10_000
    assert md in capsys.readouterr().out
    # train loss at the steps all runs reached (1..4; every 10 -> first and last): the seeds' mean,
    # arm minus baseline; b1's step 4 is the resumed row (9.0), so nvfp4's mean is (9.0 + 4.6) / 2
    assert "| step | bf16 | nvfp4 | mxfp4 | nvfp4 - bf16 | mxfp4 - bf16 |" in md
    assert "| 1 | 4.9000 | 4.9000 | 4.9000 | +0.0000 | +0.0000 |" in md
    assert "| 4 | 4.6000 | 6.8000 | 4.6000 | +2.2000 | +0.0000 |" in md
    assert "| 2 |" not in md.split("Train loss at the steps")[1]


def test_arm_names_from_the_differing_keys_and_baseline_errors(tmp_path):
    _run(tmp_path, "x", "nvfp4", 1, {4: 3.0})
    _run(tmp_path, "y", "nvfp4", 1, {4: 3.1}, last_blocks=1)
    runs = [compare_runs.read_run(tmp_path / n) for n in ("x", "y")]
    assert compare_runs.arm_names(runs, {}) == ["bf16_last_blocks=0", "bf16_last_blocks=1"]
    assert compare_runs.arm_names(runs, {str(tmp_path / "y"): "last15"})[1] == "last15"
    with pytest.raises(SystemExit, match="matches 2 arms"):
        compare_runs.summarise(runs, compare_runs.arm_names(runs, {}), "nvfp4")
    with pytest.raises(SystemExit, match="neither a run directory"):
        compare_runs.find_runs([tmp_path / "nothing"])


def test_study_layout_arm_from_dir_and_train_window(tmp_path):
    """A study root (CORPUS/ARM/seed_N) is searched at any depth; --arm-from-dir names arms by
    ARM even where their configs differ in several keys; --train-window picks the last N steps."""
    root = tmp_path / "study" / "debian_docs"
    _run(root / "bf16", "seed_1", "bf16", 1, {4: 3.0})
    _run(root / "nvfp4_last_bf16", "seed_1", "nvfp4", 1, {4: 3.2}, last_blocks=1,
         extra_rows=[{"kind": "train", "step": 4, "loss": 4.8, "tokens": 64, "step_time_s": 0.5}])
    _run(root / "nvfp4", "seed_1", "nvfp4", 1, {4: 3.3})
    out = tmp_path / "rep"
    assert compare_runs.main([str(tmp_path / "study"), "--baseline", "bf16", "--arm-from-dir",
                              "--train-window", "2", "--out", str(out)]) == 0
    data = json.loads((out / "compare.json").read_text())
    arms = {a["arm"]: a for a in data["arms"]}
    assert set(arms) == {"bf16", "nvfp4", "nvfp4_last_bf16"}
    # steps 3-4: (4.7 - 4.7 + 4.8 - 4.6) / 2 = 0.1; nvfp4 trains like bf16 here: 0
    assert arms["nvfp4_last_bf16"]["paired_train_gap_nats"] == pytest.approx(0.1)
    assert arms["nvfp4_last_bf16"]["runs"][0]["paired_train_steps"] == [3, 4]
    assert arms["nvfp4"]["paired_train_gap_nats"] == pytest.approx(0.0)
    assert arms["nvfp4_last_bf16"]["paired_gap_nats"] == pytest.approx(0.2)
    md = (out / "compare.md").read_text()
    assert "paired train gap (last 2 common steps" in md and "| +0.1000 (3–4) |" in md
    assert compare_runs.dir_arm_name(str(tmp_path / "sweep" / "job3")) == "job3"
    with pytest.raises(SystemExit, match="--train-window 0"):
        compare_runs.main([str(tmp_path / "study"), "--train-window", "0", "--out", str(out)])


def test_paired_train_gap_by_window_counts_back_from_the_last_step(tmp_path):
    """The windowed paired train gap: windows of N common steps counted back from the last one (the
    last window equals the reported paired train gap; the first may be shorter), one table row per
    run, and none for the baseline."""
    root = tmp_path / "study" / "dd"
    _run(root / "bf16", "seed_1", "bf16", 1, {4: 3.0})
    # step 1: 5.9 vs bf16 4.9 (+1.0); step 4: 4.9 vs 4.6 (+0.3); steps 2-3 equal
    _run(root / "msfp4", "seed_1", "msfp4", 1, {4: 3.1}, extra_rows=[
        {"kind": "train", "step": 1, "loss": 5.9, "tokens": 16, "step_time_s": 0.5},
        {"kind": "train", "step": 4, "loss": 4.9, "tokens": 64, "step_time_s": 0.5}])
    out = tmp_path / "rep"
    assert compare_runs.main([str(tmp_path / "study"), "--baseline", "bf16", "--arm-from-dir",
                              "--train-window", "3", "--out", str(out)]) == 0
    arms = {a["arm"]: a for a in json.loads((out / "compare.json").read_text())["arms"]}
    run = arms["msfp4"]["runs"][0]
    assert [w[:2] for w in run["paired_train_windows"]] == [[1, 1], [2, 4]]
    assert [w[2] for w in run["paired_train_windows"]] == pytest.approx([1.0, 0.1])
    assert run["paired_train_gap"] == pytest.approx(0.1)
    assert arms["bf16"]["runs"][0]["paired_train_windows"] == []
    md = (out / "compare.md").read_text()
    table = md.split("Paired train gap by window of 3 steps")[1].split("\n\n")[1]
    assert table.splitlines() == ["| arm | seed | 1 | 4 |", "|---|---|---|---|",
                                  "| msfp4 | 1 | +1.0000 | +0.1000 |"]
