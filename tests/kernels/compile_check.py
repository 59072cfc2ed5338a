"""Compile every kernel variant for sm_90 (Hopper) without a GPU: catches Triton front-end and
lowering errors on a CPU machine (the interpreter accepts things the compiler rejects)."""

from __future__ import annotations

from nvfp4_megatron.kernels import amax as k_amax
from nvfp4_megatron.kernels import fp8 as k_fp8
from nvfp4_megatron.kernels import mx as k_mx
from nvfp4_megatron.kernels import nvfp4 as k_nvfp4
from nvfp4_megatron.kernels.sm90 import compile_sm90


def variants():
    """(name, fn, pointer/scalar types, constexprs (and the launch's ``num_warps``)) for every kernel
    variant the package launches."""
    out = []
    for rht, both in ((False, False), (True, False), (True, True)):
        for cfg in k_amax.CONFIGS:
            cx = {k: v for k, v in cfg.items() if k != "num_warps"}
            out.append((f"amax rht={rht} both={both} {cfg}", k_amax._amax_kernel,
                        {"x_ptr": "*bf16", "out_ptr": "*i32", "h_ptr": "*fp32"},
                        dict(cx, RHT=rht, BOTH=both, ON_GPU=True)))
    nv_types = {"x_ptr": "*bf16", "h_ptr": "*fp32", "amax_ptr": "*fp32", "rand_ptr": "*fp32",
                "seed_ptr": "*i32", "data_ptr": "*u8", "scale_ptr": "*u8", "gscale_ptr": "*fp32"}
    for tile_r in (1, 16):
        for rht in (False, True):
            for sr, rt in ((False, False), (True, False), (True, True)):
                # the launch's own settings: the measured default of its mode (unit-stride input)
                cfg = k_nvfp4.kernel_config(tile=(tile_r, 16), rht=rht, sr=sr, unit_stride=True)
                nw = cfg.pop("num_warps")
                cfg = dict(cfg, HALF_LOADS=bool(cfg["HALF_LOADS"]) and not rht,
                           COL_FASTEST=bool(cfg["COL_FASTEST"]))
                out.append((f"nvfp4 tile_r={tile_r} rht={rht} sr={sr} rand={rt}", k_nvfp4._nvfp4_kernel,
                            nv_types, dict(cfg, TILE_R=tile_r, RHT=rht, SR=sr, RAND_TENSOR=rt, ON_GPU=True,
                                           num_warps=nw)))
    for elem, (eid, mb, emin, maxv) in k_mx._ELEM.items():
        out.append((f"mx {elem}", k_mx._mx_kernel, {"x_ptr": "*bf16", "data_ptr": "*u8", "scale_ptr": "*u8"},
                    dict(BLOCK_R=32, G=4, BLOCK=32, ELEM=eid, MBITS=mb, EMIN=emin, MAXV=maxv, HW_CVT=True)))
    from nvfp4_megatron.kernels import rope as k_rope

    for dt in ("*bf16", "*fp16"):
        for bw in (False, True):
            out.append((f"rope {dt[1:]} backward={bw}", k_rope._rope_kernel,
                        {"x_ptr": dt, "cos_ptr": dt, "sin_ptr": dt, "out_ptr": dt},
                        dict(HALF=64, BLOCK_H=4, BACKWARD=bw)))
    from nvfp4_megatron.kernels import cross_entropy as k_ce

    for dt in ("*bf16", "*fp32"):
        out.append((f"cross-entropy row max {dt[1:]}", k_ce._row_max_kernel,
                    {"x_ptr": dt, "max_ptr": "*fp32"}, dict(V=131072, BLOCK=k_ce.BLOCK_V)))
        out.append((f"cross-entropy row sum {dt[1:]}", k_ce._row_sum_kernel,
                    {"x_ptr": dt, "max_ptr": "*fp32", "tgt_ptr": "*i64", "sum_ptr": "*fp32", "pred_ptr": "*fp32"},
                    dict(V=131072, BLOCK=k_ce.BLOCK_V, ON_GPU=True)))
        out.append((f"cross-entropy gradient {dt[1:]}", k_ce._grad_kernel,
                    {"x_ptr": dt, "max_ptr": "*fp32", "sum_ptr": "*fp32", "tgt_ptr": "*i64", "g_ptr": "*fp32",
                     "out_ptr": dt}, dict(V=131072, BLOCK=k_ce.BLOCK_V, ON_GPU=True)))
    from nvfp4_megatron.kernels import gemm_alpha as k_ga

    for dt in ("*bf16", "*fp16", "*fp32"):
        out.append((f"alpha pass {dt[1:]}", k_ga._scale_kernel,
                    {"x_ptr": "*fp32", "alpha_ptr": "*fp32", "out_ptr": dt},
                    dict(BLOCK=k_ga.SCALE_BLOCK, ROUND_BITS=False, num_warps=8)))
    for pow2 in (False, True):
        for mb, emin, maxv in ((3, -6, 448.0), (2, -14, 57344.0)):
            out.append((f"fp8 m{mb} pow2={pow2}", k_fp8._fp8_cs_kernel,
                        {"x_ptr": "*bf16", "amax_ptr": "*fp32", "data_ptr": "*u8", "scales_ptr": "*fp32"},
                        dict(BLOCK_R=32, G=8, MBITS=mb, EMIN=emin, MAXV=maxv, POW2=pow2, HW_CVT=True)))
            out.append((f"fp8 cast-transpose m{mb} pow2={pow2}", k_fp8._fp8_cs_t_kernel,
                        {"x_ptr": "*bf16", "amax_ptr": "*fp32", "data_ptr": "*u8",
                         "data_t_ptr": "*u8", "scales_ptr": "*fp32"},
                        dict({k: v for k, v in k_fp8.DEFAULT_T_CONFIG.items() if k != "num_warps"},
                             MBITS=mb, EMIN=emin, MAXV=maxv, POW2=pow2,
                             HW_CVT=True)))
    return out


if __name__ == "__main__":
    import sys

    failed = 0
    for name, fn, types, cx in variants():
        if len(sys.argv) > 1 and sys.argv[1] not in name:
            continue
        try:
            k = compile_sm90(fn, types, cx)
            print("ok  ", name, "regs", k.n_regs if hasattr(k, "n_regs") else "?", "spills", getattr(k, "n_spills", "?"))
        except Exception as e:  # report all, fail at the end
            failed += 1
            print("FAIL", name, type(e).__name__, str(e)[-1500:])
    sys.exit(1 if failed else 0)
