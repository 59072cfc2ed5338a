"""Known upstream warnings are shown once, on rank 0 only; everything with the knob."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "training"))
from _train_launch import env as train_env  # noqa: E402

from nvfp4_megatron.runtime import warnings_filter as wf  # noqa: E402

# What a process prints when the known warnings fire, twice each (as they do: several modules,
# several model builds), plus one unknown warning that must always pass.
PROBE = r"""
import logging, sys, warnings
from nvfp4_megatron.runtime.warnings_filter import install_warning_filters
print("STATE", install_warning_filters(sys.argv[1:]), install_warning_filters(), file=sys.stderr)
# twice, from different lines (Python's default shows a warning once per call site)
warnings.warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.")
warnings.warn("Apex is not installed. Falling back to Torch Norm")
warnings.warn("MimoModelConfig is experimental and still under active development.")
warnings.warn("`load_state_dict` is deprecated and will be removed in future versions.", FutureWarning)
logging.getLogger("megatron.core.models.gpt.gpt_model").warning("GPTModel IS DEPRECATED. x")
logging.getLogger("megatron.core.dist_checkpointing.strategies.torch").warning(
    "MCore's async save is deprecated and will be removed")
logging.getLogger("torch.utils.cpp_extension").warning("No CUDA runtime is found, using CUDA_HOME='/x'")
warnings.warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.")
warnings.warn("Apex is not installed. Falling back to Torch Norm")
warnings.warn("MimoModelConfig is experimental and still under active development.")
warnings.warn("`load_state_dict` is deprecated and will be removed in future versions.", FutureWarning)
logging.getLogger("megatron.core.models.gpt.gpt_model").warning("GPTModel IS DEPRECATED. x")
logging.getLogger("megatron.core.dist_checkpointing.strategies.torch").warning(
    "MCore's async save is deprecated and will be removed")
logging.getLogger("torch.utils.cpp_extension").warning("No CUDA runtime is found, using CUDA_HOME='/x'")
warnings.warn("an unknown warning of ours")
logging.getLogger("megatron.core.models.gpt.gpt_model").warning("another GPTModel message")
"""
KNOWN = ["Transformer Engine and Apex are not installed", "Apex is not installed. Falling back",
         "MimoModelConfig is experimental", "`load_state_dict` is deprecated",
         "GPTModel IS DEPRECATED", "MCore's async save is deprecated", "No CUDA runtime is found"]


def _probe(rank, *args, show_env=None):
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "SLURM_PROCID", wf.ENV_SHOW_ALL,
                                                          "PYTHONWARNINGS")}
    e["RANK"] = str(rank)
    if show_env is not None:
        e[wf.ENV_SHOW_ALL] = show_env
    r = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True,
                       env=e, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stderr


def test_rank0_once_other_ranks_none():
    out0 = _probe(0)
    for k in KNOWN:
        assert out0.count(k) == 1, (k, out0)
    out1 = _probe(1)
    for k in KNOWN:
        assert k not in out1, (k, out1)
    for out in (out0, out1):  # unknown ones untouched, on every rank
        assert "an unknown warning of ours" in out and "another GPTModel message" in out
    assert "'installed': True" in out0


@pytest.mark.parametrize("how", ["env", "argv", "argv+"])
def test_knob_shows_all(how):
    args, show_env = [], None
    if how == "env":
        show_env = "1"
    else:
        args = [("+" if how == "argv+" else "") + "logging.all_warnings=true", "train.lr=1"]
    out1 = _probe(1, *args, show_env=show_env)
    for k in KNOWN:
        assert out1.count(k) == 2, (k, out1)
    assert "'show_all': True" in out1


def test_show_all_requested_parsing(monkeypatch):
    monkeypatch.delenv(wf.ENV_SHOW_ALL, raising=False)
    assert not wf.show_all_requested([])
    assert not wf.show_all_requested(["logging.all_warnings=false"])
    assert wf.show_all_requested(["logging.all_warnings=True"])
    assert not wf.show_all_requested(["logging.all_warnings=true", "logging.all_warnings=false"])
    monkeypatch.setenv(wf.ENV_SHOW_ALL, "1")
    assert wf.show_all_requested([])


def test_filter_imports_no_megatron():
    r = subprocess.run([sys.executable, "-c",
                        "import sys, nvfp4_megatron.runtime.warnings_filter; "
                        "print(any(m.startswith(('megatron', 'torch')) for m in sys.modules))"],
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False", r.stdout + r.stderr


def _count_known(text):
    # the warning's own lines, not the source line Python prints under it (indented)
    text = "\n".join(ln for ln in text.splitlines() if not ln[:1].isspace())
    return {k: text.count(k) for k in ("Transformer Engine and Apex are not installed. Falling back to Torch optimizers",
                                       "Apex is not installed. Falling back to Torch Norm",
                                       "MimoModelConfig is experimental",
                                       "MCore's async save is deprecated",
                                       "full scope is deprecated",
                                       "No CUDA runtime is found")}


def test_two_rank_run_prints_each_once(tmp_path):
    """A real 2-process run (torchrun) through an entry that installs the filter first."""
    def run(extra_env):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(HERE / "_warn_entry.py"), f"run_dir={tmp_path}/run-{len(extra_env)}",
               f"data.cache_dir={tmp_path}/cache", "data.default_corpus_max_mb=1.0",
               "+recipe=bf16_tiny", "train.train_iters=2", "train.warmup_iters=1", "train.save_interval=1",
               "logging.plot=false", "logging.tensorboard=false"]
        e = dict(train_env(), **extra_env)
        e.pop(wf.ENV_SHOW_ALL, None) if not extra_env else None
        r = subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=300, cwd=tmp_path)
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        return _count_known(r.stdout + r.stderr)

    filtered = run({})
    everything = run({wf.ENV_SHOW_ALL: "1"})
    for k, n in filtered.items():
        assert n <= 1, (k, filtered)
        assert everything[k] >= n, (k, everything)
    assert sum(everything.values()) > sum(filtered.values()) >= 3, (filtered, everything)
