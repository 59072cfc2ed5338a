"""pretrain.py refuses a layout that does not fit, listing every violated rule, and writes nothing."""

from _train_launch import launch


def test_every_layout_problem_is_named_before_training(tmp_path, corpus_cache):
    run = tmp_path / "bad"
    run.mkdir()
    rc, out = launch(run, corpus_cache, "+recipe=bf16_tiny", "model.num_layers=3",
                     "parallel.pipeline_model_parallel_size=2", "train.micro_batch_size=2",
                     "train.global_batch_size=3")
    assert rc != 0 and "exitcode  : 2" in out, out[-3000:]  # torchrun exits 1 for a child's 2
    assert "error: LayoutError" in out, out[-3000:]
    # both rules in one message (2 ranks at PP=2: DP=1)
    assert "num_layers=3 not divisible by PP=2" in out, out[-3000:]
    assert "global_batch_size=3 not divisible by micro_batch_size=2 x DP=1 = 2" in out
    assert list(run.iterdir()) == []  # refused before the run directory is written
