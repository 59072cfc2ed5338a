"""Transformer Engine on the lent H200 (issue 17 item 5): does TE run, and does its FP8 path
compute what the project's emulation computes?

Run on the H200 after ``assemble_and_build.sh`` installed TE into /tmp/te (it calls this script):

    PYTHONPATH=/tmp/te:/tmp/site:$PWD python3 scripts/te_h200/te_check.py --out $OUT \
        [--layer] [--gpt fp8_cs,fp8_block] [--steps 10] [--gpt-timeout 150] [--deadline EPOCH]

Stages (each prints ``[te-check] <stage>: OK|FAILED ...`` and is also written to
``$OUT/te_check.json``; a failed stage records its traceback and the next stages that do not need
it still run):

1. ``env``: torch, CUDA, GPU, compute capability.
2. ``import``: ``import transformer_engine.pytorch`` (the core library, cuDNN/cuBLAS/NCCL loading
   and the PyTorch extension ``transformer_engine_torch``). Without it every later stage is
   skipped and the script exits 2.
3. ``support``: TE's own ``check_fp8_support()``, ``check_fp8_block_scaling_support()``,
   ``check_mxfp8_support()``, ``check_nvfp4_support()`` (through ``te_adapter.te_support``) and
   the adapter's ``resolve_backend(precision.backend=te)`` for fp8_cs and fp8_block.
4. ``recipe``: ``te_adapter.build_te_recipe`` for fp8_cs and fp8_block against the installed TE
   (every dataclass field explicit), printing the recipe's repr.
5. ``layer`` (``--layer``): one linear layer (T=1024 tokens, K=512 in, N=768 out, BF16) through
   ``te.pytorch.Linear`` under TE's autocast with the adapter's recipe, and through the project's
   ``quantized_linear`` with the same recipe: forward Y, dgrad dX, wgrad dW, with max abs / max
   relative difference and whether bit-identical; and the quantized operands themselves (TE's
   ``Float8CurrentScalingQuantizer`` / ``Float8BlockQuantizer`` vs ``quantize_operand``: FP8
   codes, scales, dequantized values), which should be bit-identical if the formats agree.
   Outputs of the two GEMMs may differ in the last bits (FP32 accumulation order), so the GEMM
   comparison reports numbers, it does not assert.
6. ``gpt`` (``--gpt``): ``torchrun pretrain.py +recipe=bf16_small`` for each listed recipe with
   ``precision.backend=te`` (all recipes first), then ``precision.backend=emulated`` (``--steps``
   steps, same seed and data, ``train.deterministic=false`` for both), each under its own timeout
   and none started past ``--deadline``; each run's output streams to
   ``$OUT/gpt_<recipe>_<backend>.log``; prints the losses side by side.

Exit status: 0 every requested stage passed; 2 TE does not import; 1 another stage failed.
On a machine without TE (this repository's CPU host) it stops at ``import`` with exit 2 and a
one-line reason.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RECIPES = ("fp8_cs", "fp8_block")
T, K, N = 1024, 512, 768   # tokens, in, out: multiples of 128 (block FP8) and 16 (FP8 GEMMs)

RESULTS: dict = {"stages": {}}
OUT: Path | None = None


def say(msg: str) -> None:
    print(f"[te-check] {msg}", flush=True)


def record(stage: str, ok: bool, **info) -> None:
    RESULTS["stages"][stage] = {"ok": ok, **info}
    if OUT is not None:
        (OUT / "te_check.json").write_text(json.dumps(RESULTS, indent=1, default=str))


def run_stage(stage: str, fn, *args):
    t0 = time.time()
    try:
        info = fn(*args) or {}
    except Exception as e:  # a stage's failure is recorded exactly, the next stages still run
        tb = traceback.format_exc()
        say(f"{stage}: FAILED after {time.time() - t0:.1f} s: {type(e).__name__}: {e}")
        print(tb, flush=True)
        record(stage, False, error=f"{type(e).__name__}: {e}", traceback=tb,
               seconds=round(time.time() - t0, 1))
        return None
    say(f"{stage}: OK ({time.time() - t0:.1f} s)")
    record(stage, True, seconds=round(time.time() - t0, 1), **info)
    return info


# ------------------------------------------------------------------------------------ stages

def stage_env() -> dict:
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(),
                    capability=list(torch.cuda.get_device_capability()),
                    cudnn=torch.backends.cudnn.version())
    nvte = {k: v for k, v in os.environ.items() if k.startswith("NVTE_")}
    info["NVTE_env"] = nvte
    for k, v in info.items():
        say(f"  {k}: {v}")
    return info


def stage_import() -> dict:
    from importlib import metadata

    import transformer_engine
    import transformer_engine.pytorch as te  # noqa: F401  (core lib + torch extension)
    import transformer_engine_torch as tex

    info = {"transformer_engine": getattr(transformer_engine, "__version__", None),
            "module_file": transformer_engine.__file__, "tex_file": tex.__file__}
    for dist in ("transformer_engine", "transformer_engine_cu13", "transformer_engine_cu12",
                 "transformer_engine_torch"):
        try:
            info[f"dist:{dist}"] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[f"dist:{dist}"] = None
    for k, v in info.items():
        say(f"  {k}: {v}")
    return info


def stage_support() -> dict:
    from nvfp4_megatron.mcore.backend import probe_device, resolve_backend
    from nvfp4_megatron.mcore.te_adapter import TE_SUPPORT_CHECKS, te_support
    from nvfp4_megatron.quant.registry import build_recipe

    info = {}
    for te_class, fn in TE_SUPPORT_CHECKS.items():
        ok, why = te_support(te_class)
        info[fn] = [ok, why]
        say(f"  {fn}() -> {ok} {why!r}")
    caps = probe_device()
    info["probe_device"] = {"te_available": caps.te_available, "te_error": caps.te_error,
                            "te_version": caps.te_version}
    for name in RECIPES:
        choice = resolve_backend(build_recipe(name, backend="te"), num_layers=8, caps=caps)
        info[f"resolve_backend:{name}"] = choice.describe()
        say(f"  {name}: {choice.describe()}")
    wanted = ("check_fp8_support", "check_fp8_block_scaling_support")
    refused = [f for f in wanted if not info[f][0]]
    if refused:
        raise RuntimeError(f"TE refuses on this GPU: {refused}")
    return info


def _te_recipe(name: str):
    from nvfp4_megatron.mcore.te_adapter import build_te_recipe, describe_te_recipe
    from nvfp4_megatron.quant.registry import build_recipe

    desc = describe_te_recipe(build_recipe(name), num_layers=8)
    return build_te_recipe(desc), desc


def stage_recipe() -> dict:
    info = {}
    for name in RECIPES:
        obj, desc = _te_recipe(name)
        info[name] = " ".join(repr(obj).split())
        say(f"  {name}: {info[name]}")
        say(f"  {name}: Megatron fields {desc['megatron_config']}")
    return info


def _diff(a, b) -> dict:
    import torch

    a, b = a.detach().float(), b.detach().float()
    if a.shape != b.shape:
        return {"shape_a": list(a.shape), "shape_b": list(b.shape), "identical": False}
    d = (a - b).abs()
    denom = b.abs().clamp_min(torch.finfo(torch.float32).tiny)
    return {"identical": bool(torch.equal(a, b)), "max_abs": float(d.max()),
            "max_rel": float((d / denom)[b != 0].max()) if bool((b != 0).any()) else 0.0,
            "max_ref": float(b.abs().max()), "n_diff": int((a != b).sum()), "numel": a.numel()}


def _te_autocast(te, recipe):
    if hasattr(te, "autocast"):                          # TE >= 2.9
        return te.autocast(enabled=True, recipe=recipe)
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe)  # TE 2.8


def _operand_checks(name: str, x, w, dy) -> dict:
    """TE's quantizers vs ``quantize_operand`` on the Fprop/Dgrad rowwise copies."""
    import torch
    import transformer_engine.pytorch as te
    import transformer_engine_torch as tex

    from nvfp4_megatron.quant.linear import quantize_operand
    from nvfp4_megatron.quant.registry import build_recipe

    ops = build_recipe(name).linear.operands()
    te_dtype = {"e4m3": tex.DType.kFloat8E4M3, "e5m2": tex.DType.kFloat8E5M2}
    out = {}
    cases = {"fprop.input": x, "fprop.weight": w, "dgrad.grad_output": dy}
    for role, t in cases.items():
        tq = ops[role]
        if tq.format == "fp8":
            qz = te.Float8CurrentScalingQuantizer(te_dtype[tq.fp8_dtype], device=t.device,
                                                  rowwise=True, columnwise=False)
        else:  # fp8_block: 1x128 (activations/grads) or 128x128 (weights), pow2 scales
            qz = te.Float8BlockQuantizer(te_dtype[tq.fp8_dtype], rowwise=True, columnwise=False,
                                         force_pow_2_scales=tq.pow2_scale,
                                         block_scaling_dim=2 if tq.tile == (128, 128) else 1)
        te_q = qz(t)
        ours = quantize_operand(t, tq, layer_key="te_check", role=role)
        ref = ours.values() * ours.alpha() if ours.alpha() is not None else ours.values()
        r = {"dequantized": _diff(te_q.dequantize(dtype=torch.float32), ref)}
        if tq.format == "fp8":
            r["codes"] = _diff(te_q._data.view(torch.uint8).float(),
                               ours.q.data.view(torch.uint8).float())
            r["scale_inv"] = [float(te_q._scale_inv.reshape(-1)[0]), float(ours.q.scale_inv)]
        out[role] = r
        say(f"  {name} {role} ({tq.describe()}): " + json.dumps(r))
    return out


def _layer_one(name: str) -> dict:
    import torch
    import transformer_engine.pytorch as te

    from nvfp4_megatron.quant import state as qstate
    from nvfp4_megatron.quant.linear import LinearCall, quantized_linear
    from nvfp4_megatron.quant.registry import build_recipe

    qstate.set_run_seed(1234)
    qstate.set_step(0)
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    x = (torch.randn(T, K, device=dev, generator=g) * 2).to(torch.bfloat16)
    w = (torch.randn(N, K, device=dev, generator=g) * 0.05).to(torch.bfloat16)
    dy = (torch.randn(T, N, device=dev, generator=g) * 1e-3).to(torch.bfloat16)
    te_recipe, _ = _te_recipe(name)

    lin = te.Linear(K, N, bias=False, params_dtype=torch.bfloat16, device=dev)
    with torch.no_grad():
        lin.weight.copy_(w)
    xt = x.clone().requires_grad_(True)
    with _te_autocast(te, te_recipe):
        yt = lin(xt)
    yt.backward(dy)
    te_out = (yt.detach(), xt.grad.detach(), lin.weight.grad.detach())

    xe, we = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ye = quantized_linear(xe, we, None, LinearCall(recipe=build_recipe(name).linear,
                                                   layer_key="te_check"))
    ye.backward(dy)
    em_out = (ye.detach(), xe.grad.detach(), we.grad.detach())

    res = {"shape": {"T": T, "K": K, "N": N}}
    for gemm, a, b in zip(("fprop Y", "dgrad dX", "wgrad dW"), te_out, em_out):
        res[gemm] = _diff(a, b) | {"dtype_te": str(a.dtype), "dtype_emulated": str(b.dtype)}
        say(f"  {name} {gemm} (TE vs emulated): " + json.dumps(res[gemm]))
    try:
        res["operands"] = _operand_checks(name, x, w, dy)
    except Exception as e:  # the quantizer API differs between TE releases: report, go on
        res["operands"] = f"not compared: {type(e).__name__}: {e}"
        say(f"  {name} operands: {res['operands']}")
        traceback.print_exc()
    return res


def stage_layer() -> dict:
    return {name: _layer_one(name) for name in RECIPES}


# training log lines (training/logger.py): "step      5/10 | tokens 16,384 | loss 8.4521 | ..."
_LOSS = re.compile(r"\bstep\s+(\d+)/\d+\s.*?\bloss\s+([0-9.]+(?:e[-+]?\d+)?|nan|inf)", re.I)


def _gpt_run(name: str, backend: str, steps: int, timeout: int, workdir: Path) -> dict:
    run_dir = workdir / f"{name}_{backend}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(ROOT / "pretrain.py"), "+recipe=bf16_small", f"precision.recipe={name}",
           f"precision.backend={backend}", f"train.train_iters={steps}", "train.warmup_iters=2",
           "train.log_interval=1", f"train.eval_interval={steps}", "train.eval_iters=1",
           "train.save_interval=null", "train.deterministic=false",
           f"run_dir={run_dir}", f"data.cache_dir={workdir / 'data_cache'}",
           "data.default_corpus_max_mb=1.0", "logging.tensorboard=false", "logging.plot=false",
           "logging.print_precision_table=true"]
    say(f"  $ {' '.join(cmd)}")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    log = (OUT or workdir) / f"gpt_{name}_{backend}.log"
    t0 = time.time()
    with open(log, "w") as fh:  # streamed: a run killed by the call's limit still leaves its log
        try:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, env=env,
                                cwd=str(ROOT)).returncode
        except subprocess.TimeoutExpired:
            rc = f"timeout after {timeout} s"
    wall = time.time() - t0
    text = log.read_text(errors="replace")
    losses = {int(m.group(1)): m.group(2) for m in _LOSS.finditer(text)}
    choice = [ln.strip() for ln in text.splitlines() if "backend choice" in ln][:1]
    te_line = [ln.strip() for ln in text.splitlines() if "transformer_engine" in ln
               and "recipe_type" in ln][:1]
    res = {"rc": rc, "wall_s": round(wall, 1), "losses": losses, "backend_choice": choice,
           "te_recipe_line": te_line, "tail": text[-3000:] if rc != 0 else ""}
    say(f"  {name} backend={backend}: rc={rc} wall={wall:.1f} s losses={losses}")
    if rc != 0:
        print(text[-3000:], flush=True)
    return res


def stage_gpt(names: list[str], steps: int, timeout: int, deadline: float | None,
              backends: tuple[str, ...] = ("te", "emulated")) -> dict:
    """TE runs first (the point of the exercise), then the emulated ones for comparison; a run is
    not started when it could not finish before ``deadline`` (recorded as skipped)."""
    workdir = Path(os.environ.get("TE_CHECK_WORKDIR", "/tmp/te_check_runs"))
    workdir.mkdir(parents=True, exist_ok=True)
    res, failed = {}, []
    for backend in backends:
        for name in names:
            key = f"{name}:{backend}"
            left = None if deadline is None else deadline - time.time()
            if left is not None and left < 30:
                res[key] = {"rc": f"skipped: {left:.0f} s left before the deadline"}
                say(f"  {key}: {res[key]['rc']}")
                failed.append(f"{key} skipped")
                continue
            run_timeout = timeout if left is None else int(min(timeout, left))
            res[key] = _gpt_run(name, backend, steps, run_timeout, workdir)
            record("gpt", False, partial=res)  # what ran so far, in case the call is cut off
            if res[key]["rc"] != 0:
                failed.append(f"{key} rc={res[key]['rc']}")
    for name in names:
        te_l = res.get(f"{name}:te", {}).get("losses") or {}
        em_l = res.get(f"{name}:emulated", {}).get("losses") or {}
        for s in sorted(set(te_l) | set(em_l)):
            say(f"  {name} step {s}: te {te_l.get(s)}  emulated {em_l.get(s)}")
    if failed:
        raise RuntimeError(f"pretrain runs failed or skipped: {failed} (logs: gpt_*.log in $OUT)")
    return res


# ------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    global OUT
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for te_check.json, logs")
    ap.add_argument("--layer", action="store_true", help="one-layer TE vs emulated comparison")
    ap.add_argument("--gpt", default="",
                    help="comma list of recipes for pretrain.py (te, then emulated)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--gpt-timeout", type=int, default=150, help="seconds per pretrain run")
    ap.add_argument("--te-only", action="store_true",
                    help="pretrain runs with precision.backend=te only (no emulated comparison)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="epoch seconds: start no pretrain run that could not end by then")
    args = ap.parse_args(argv)
    if args.out:
        OUT = Path(args.out)
        OUT.mkdir(parents=True, exist_ok=True)
    gpt = [r for r in args.gpt.split(",") if r]
    unknown = sorted(set(gpt) - set(RECIPES))
    if unknown:
        ap.error(f"--gpt takes {RECIPES}; got {unknown}")

    run_stage("env", stage_env)
    if run_stage("import", stage_import) is None:
        say("transformer_engine.pytorch does not import here: nothing else can be checked "
            "(see the traceback above and te_check.json)")
        return 2
    ok = run_stage("support", stage_support) is not None
    ok &= run_stage("recipe", stage_recipe) is not None
    if args.layer:
        ok &= run_stage("layer", stage_layer) is not None
    if gpt:
        ok &= run_stage("gpt", stage_gpt, gpt, args.steps, args.gpt_timeout, args.deadline,
                        ("te",) if args.te_only else ("te", "emulated")) is not None
    say("ALL REQUESTED STAGES PASSED" if ok else "SOME STAGES FAILED (te_check.json)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
