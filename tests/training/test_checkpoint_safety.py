"""Issue 14, rows 1, 4 and 5: a checkpoint cannot run code; a damaged or incomplete checkpoint is
found, kept and survived; a full disk is reported; another precision is refused; every start's
config is kept. End-to-end cases run ``pretrain.py`` under torchrun (2 gloo processes, CPU) on
copies of one small nvfp4_tiny run.
"""

import dataclasses
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _train_launch import launch, train_losses, tree_hash
from nvfp4_megatron.training import checkpoint as C
from nvfp4_megatron.training import safe_pickle

COMMON = ["+recipe=nvfp4_tiny", "train.train_iters=20", "train.save_interval=10",
          "train.warmup_iters=2", "train.eval_interval=0", "train.log_interval=5",
          "logging.plot=false", "logging.tensorboard=false"]
STEP10, STEP20 = "step_0000010", "step_0000020"


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, corpus_cache):
    """A finished 20-step nvfp4_tiny run with checkpoints at steps 10 and 20."""
    run = tmp_path_factory.mktemp("safety") / "base"
    rc, out = launch(run, corpus_cache, *COMMON)
    assert rc == 0, out[-3000:]
    assert _names(run) == [STEP10, STEP20]
    return run


def _names(run) -> list[str]:
    root = Path(run) / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def _exit2(out: str) -> bool:
    """torchrun exits 1 whatever its workers did; its failure report shows their exit code."""
    return re.search(r"exitcode\s*:\s*2 ", out) is not None




def _rehash(ckpt):
    """What a deliberate attacker does: make manifest.json match the altered files."""
    m = json.loads((ckpt / "manifest.json").read_text())
    for name, entry in m["files"].items():
        data = (ckpt / name).read_bytes()
        entry.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    (ckpt / "manifest.json").write_text(json.dumps(m))


class _Payload:
    """Unpickling this creates ``path``: a stand-in for any code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# ---- row 1: nothing read from a checkpoint runs code

def test_payload_in_a_rank_file_is_refused_and_never_runs(base_run, tmp_path, corpus_cache):
    """The issue's case: a copied checkpoint whose rank_00000.pt carries a __reduce__ payload,
    loaded with train.load=."""
    ckpt = shutil.copytree(base_run / "checkpoints" / STEP20, tmp_path / "copied")
    marker = tmp_path / "payload_ran"
    torch.save({"torch_cpu": _Payload(marker), "tracker": {}}, ckpt / "rank_00000.pt")
    _rehash(ckpt)
    rc, out = launch(tmp_path / "run", corpus_cache, *COMMON, f"train.load={ckpt}")
    assert rc != 0 and _exit2(out), out[-3000:]
    assert f"{ckpt / 'rank_00000.pt'} holds more than tensors" in out, out[-3000:]
    assert "GLOBAL _io.open" in out
    assert not marker.exists()


def test_payload_in_dcp_metadata_is_refused_on_resume(base_run, tmp_path, corpus_cache):
    run = shutil.copytree(base_run, tmp_path / "run")
    ckpt = run / "checkpoints" / STEP20
    marker = tmp_path / "payload_ran"
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    _rehash(ckpt)
    rc, out = launch(run, corpus_cache, *COMMON)
    assert rc != 0 and _exit2(out), out[-3000:]
    assert f"{ckpt / '.metadata'} refers to _io.open" in out, out[-3000:]
    assert not marker.exists()
    assert _names(run) == [STEP10, STEP20]  # refused, not treated as damage: nothing renamed


def test_payload_in_a_shard_byte_item_is_refused(base_run, tmp_path):
    """torch's DefaultLoadPlanner.load_bytes unpickles the shards' byte items (here the common
    state) with weights_only=False; check_pickles reads them first, weights-only."""
    ckpt = shutil.copytree(base_run / "checkpoints" / STEP10, tmp_path / "ckpt")
    marker = tmp_path / "payload_ran"
    md = safe_pickle.load_dcp_metadata(ckpt / ".metadata")
    index = next(i for i in md.storage_data if i.fqn.startswith("common_state"))
    buf = io.BytesIO()
    torch.save([_Payload(marker)], buf)
    shard = ckpt / md.storage_data[index].relative_path
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(buf.getvalue())
    md.storage_data[index] = dataclasses.replace(md.storage_data[index], offset=offset,
                                                 length=len(buf.getvalue()))
    (ckpt / ".metadata").write_bytes(pickle.dumps(md))
    _rehash(ckpt)
    assert C.verify_checkpoint(ckpt) is None  # consistent files: only the pickle check stops it
    with pytest.raises(safe_pickle.UnsafePickleError,
                       match=re.escape(f"{shard} (item {index.fqn}) holds more than tensors")):
        C.check_pickles(ckpt)
    assert not marker.exists()
    # control: Megatron's own reader of the common state runs the payload
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict

    load_common_state_dict(str(ckpt))
    assert marker.exists()


def test_real_checkpoint_files_load_weights_only(base_run):
    ckpt = base_run / "checkpoints" / STEP10
    C.check_pickles(ckpt)
    state = C._read_rng_file(ckpt / "rank_00001.pt")
    assert set(state) >= {"torch_cpu", "tracker"}


# ---- row 4: manifests, damaged checkpoints, stale temporaries, a full disk

@pytest.mark.parametrize("damage,reason,file", [
    ("truncate", "truncated", "__1_0.distcp"),
    ("delete", "missing", "__0_0.distcp"),
    ("delete", "missing", "rank_00001.pt"),
])
def test_damaged_newest_checkpoint_is_kept_and_the_previous_one_resumed(
        base_run, tmp_path, corpus_cache, damage, reason, file):
    run = shutil.copytree(base_run, tmp_path / "run")
    root = run / "checkpoints"
    target = root / STEP20 / file
    if damage == "truncate":
        os.truncate(target, target.stat().st_size // 2)
    else:
        target.unlink()
    damaged_hash = tree_hash(root / STEP20)
    (root / ".tmp-step_0000030").mkdir()  # a crashed save's leftovers
    (root / ".tmp-step_0000030" / "__0_0.distcp").write_bytes(b"partial")
    rc, out = launch(run, corpus_cache, *COMMON)
    assert rc == 0, out[-3000:]
    assert f"{root / STEP20} is damaged: {target}" in out, out[-3000:]
    assert f"Kept as {STEP20}.damaged-{reason}" in out
    assert f"resumed from {root / STEP10} at step 10" in out
    assert "removed unfinished save(s) .tmp-step_0000030" in out
    assert _names(run) == [STEP10, STEP20, f"{STEP20}.damaged-{reason}"]
    assert tree_hash(root / f"{STEP20}.damaged-{reason}") == damaged_hash  # kept as it was
    assert C.verify_checkpoint(root / STEP20) is None  # the new step 20
    a, b = train_losses(base_run), train_losses(run)
    assert [b[s] for s in range(11, 21)] == [a[s] for s in range(11, 21)]  # exact resume


def test_explicit_load_of_a_damaged_checkpoint_is_refused(base_run, tmp_path, corpus_cache):
    ckpt = shutil.copytree(base_run / "checkpoints" / STEP20, tmp_path / "copied")
    shard = ckpt / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte: only the checksum sees it
    shard.write_bytes(bytes(data))
    before = tree_hash(ckpt)
    rc, out = launch(tmp_path / "run", corpus_cache, *COMMON, f"train.load={ckpt}")
    assert rc != 0 and _exit2(out), out[-3000:]
    assert f"train.load={ckpt} is damaged: {shard} does not match its sha256" in out, out[-3000:]
    assert tree_hash(ckpt) == before  # not renamed, not touched


def test_verify_finds_each_damage_with_and_without_manifest(base_run, tmp_path):
    def copy(name):
        return shutil.copytree(base_run / "checkpoints" / STEP10, tmp_path / name)

    assert C.verify_checkpoint(copy("intact")) is None
    old = copy("old")  # saved before manifests: structural check only
    (old / "manifest.json").unlink()
    assert C.verify_checkpoint(old) is None
    os.truncate(old / "__1_0.distcp", 1000)
    assert C.verify_checkpoint(old) == (
        "truncated", f"{old / '__1_0.distcp'} has 1000 bytes, the index needs "
        f"{(base_run / 'checkpoints' / STEP10 / '__1_0.distcp').stat().st_size}")
    old2 = copy("old2")
    (old2 / "manifest.json").unlink()
    (old2 / "rank_00001.pt").unlink()
    assert C.verify_checkpoint(old2) == ("missing", f"{old2 / 'rank_00001.pt'} is missing")
    garbled = copy("garbled")
    (garbled / "manifest.json").write_text("{")
    assert C.verify_checkpoint(garbled)[0] == "manifest"


def test_a_full_disk_during_save_is_named_and_keeps_the_previous_checkpoint(tmp_path):
    out = tmp_path / "out.json"
    worker = Path(__file__).parent / "disk_full_worker.py"
    proc = subprocess.run([sys.executable, str(worker), str(tmp_path / "run"), str(out)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    root = r["root"]
    for step, err in (("step_0000002", r["errors"]["writer"]),
                      ("step_0000003", r["errors"]["manifest"])):
        assert err.startswith(f"could not save checkpoint {step} into {root}/.tmp-{step}: "
                              "no space left on device"), err
        assert f"The newest checkpoint, {root}/step_0000001, is intact" in err, err
    assert r["unchanged"] and r["intact"] and r["checkpoints"] == ["step_0000001"]
    assert r["tmp"] == [".tmp-step_0000002", ".tmp-step_0000003"]  # removed at the next start


def _mount_tmpfs(path, size) -> bool:
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.slow
def test_real_full_disk(tmp_path, corpus_cache):
    """On a real 4 MiB file system (tmpfs; needs root, skipped otherwise) the step-20 save runs
    out of space: the message says so and names the intact step-10 checkpoint; the next start
    removes the partial save and resumes from step 10."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "4m"):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        run = disk / "run"
        rc, out = launch(run, corpus_cache, *COMMON)
        assert rc != 0
        root = run / "checkpoints"
        assert (f"could not save checkpoint {STEP20} into {root / '.tmp-step_0000020'}: no space "
                f"left on device") in out, out[-3000:]
        assert f"The newest checkpoint, {root / STEP10}, is intact" in out
        assert _names(run) == [".tmp-step_0000020", STEP10]
        assert C.verify_checkpoint(root / STEP10) is None
        rc, out = launch(run, corpus_cache, *COMMON)  # the disk is still too small for step 20
        assert "removed unfinished save(s) .tmp-step_0000020" in out, out[-3000:]
        assert f"resumed from {root / STEP10} at step 10" in out
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_clean_stale_tmp_removes_only_our_temporaries(tmp_path):
    root = tmp_path / "checkpoints"
    for name in (".tmp-step_0000030", ".tmp-step_0000040", ".tmp-other", "step_0000010",
                 "step_0000020.damaged-missing"):
        (root / name).mkdir(parents=True)
    assert C.clean_stale_tmp(tmp_path) == [".tmp-step_0000030", ".tmp-step_0000040"]
    assert sorted(p.name for p in root.iterdir()) == [
        ".tmp-other", "step_0000010", "step_0000020.damaged-missing"]
    assert C.clean_stale_tmp(tmp_path / "none") == []


# ---- row 5: precision recipe, BF16 switch, provenance of every start

def test_another_recipe_is_refused_and_every_start_config_is_kept(base_run, tmp_path,
                                                                  corpus_cache):
    run = shutil.copytree(base_run, tmp_path / "run")
    first = (run / "config.yaml").read_text()
    bf16 = ["+recipe=bf16_tiny" if a == "+recipe=nvfp4_tiny" else a for a in COMMON]
    before = tree_hash(run / "checkpoints")
    rc, out = launch(run, corpus_cache, *bf16)
    assert rc != 0 and _exit2(out), out[-3000:]
    assert (f"checkpoint {run / 'checkpoints' / STEP20} was trained with precision recipe=nvfp4 "
            "bf16_blocks=[] backend=auto, this run asks for recipe=bf16 bf16_blocks=[] "
            "backend=auto") in out, out[-3000:]
    assert "train.allow_precision_change=true" in out
    assert tree_hash(run / "checkpoints") == before
    assert (run / "config.yaml").read_text() == first  # the run's own config is not overwritten
    starts = sorted((run / "configs").glob("start_*.yaml"))
    assert len(starts) == 2 and starts[0].read_text() == first
    assert "recipe: bf16" in starts[1].read_text()

    # the BF16 switch schedule is the way to change precision mid-run: not a recipe change
    shutil.move(run / "checkpoints" / STEP20, tmp_path / "set_aside")  # resume from step 10
    rc, out = launch(run, corpus_cache, *COMMON, "precision.switch_to_bf16.at_step=15")
    assert rc == 0, out[-3000:]
    assert f"resumed from {run / 'checkpoints' / STEP10} at step 10" in out
    assert "[precision] step 15: switching all GEMMs to BF16" in out
    assert len(list((run / "configs").glob("start_*.yaml"))) == 3


def test_allow_precision_change_knob(base_run, tmp_path, corpus_cache):
    run = shutil.copytree(base_run, tmp_path / "run")
    shutil.rmtree(run / "checkpoints" / STEP20)
    bf16 = ["+recipe=bf16_tiny" if a == "+recipe=nvfp4_tiny" else a for a in COMMON]
    rc, out = launch(run, corpus_cache, *bf16, "train.allow_precision_change=true")
    assert rc == 0, out[-3000:]
    assert "warning: train.allow_precision_change=true" in out and "at step 10" in out


def test_precision_check(tmp_path):
    model = {"hidden_size": 64}
    nvfp4 = C.precision_meta({"recipe": "nvfp4", "backend": "auto"}, [])
    (tmp_path / "meta.json").write_text(json.dumps({"model": model, "precision": nvfp4}))
    C.check_compatible(tmp_path, {"model": model, "precision": nvfp4})
    for other, text in ((C.precision_meta({"recipe": "nvfp4", "backend": "auto"}, [1, 0]),
                         "bf16_blocks=[0, 1] backend=auto"),
                        (C.precision_meta({"recipe": "nvfp4", "backend": "emulated"}, []),
                         "bf16_blocks=[] backend=emulated")):
        with pytest.raises(ValueError, match=re.escape(f"this run asks for recipe=nvfp4 {text}")):
            C.check_compatible(tmp_path, {"model": model, "precision": other})
        seen = []
        C.check_compatible(tmp_path, {"model": model, "precision": other},
                           allow_precision_change=True, log=seen.append)
        assert "allow_precision_change=true" in seen[0] and text in seen[0]
    # a checkpoint saved before meta.json recorded the precision: loaded, with a warning
    (tmp_path / "meta.json").write_text(json.dumps({"model": model}))
    seen = []
    C.check_compatible(tmp_path, {"model": model, "precision": nvfp4}, log=seen.append)
    assert "records no precision settings" in seen[0]


def test_record_start_config(tmp_path):
    a = C.record_start_config(tmp_path, "first: 1\n")
    b = C.record_start_config(tmp_path, "second: 2\n")
    assert (tmp_path / "config.yaml").read_text() == "first: 1\n"
    assert a != b and a.read_text() == "first: 1\n" and b.read_text() == "second: 2\n"
    assert a.parent == b.parent == tmp_path / "configs"
