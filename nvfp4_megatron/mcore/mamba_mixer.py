"""A Mamba-2 mixer for Megatron-Core's hybrid model that needs neither mamba_ssm nor Triton.

Megatron-Core 0.19.2's ``megatron.core.ssm.mamba_mixer.MambaMixer`` refuses to build without
``mamba_ssm`` (its gated norm and SSD kernels are imported from there; ``einops`` is required too),
and ``mamba_ssm`` has no CPU build. :class:`LocalMambaMixer` follows ``MambaMixer``'s interface
instead of patching that module: the same constructor (``config, submodules, d_model, d_conv,
expand, ..., chunk_size, layer_number, pg_collection, pp_layer_offset, name``), the same
``forward(hidden_states, inference_context=None, *, packed_seq_params=None) -> (out, out_bias)``,
the same parameter names, shapes, TP attributes and checkpoint layout (``in_proj``,
``conv1d_weight``/``conv1d_bias`` saved as ``conv1d.weight``/``.bias``, ``dt_bias``, ``A_log``,
``D``, ``norm.weight``, ``out_proj``; ``sharded_state_dict`` *is* Megatron's method, borrowed),
so Megatron's ``MambaLayer`` / ``HybridStack`` / ``HybridModel`` build it from a ``ModuleSpec``
and a checkpoint of one is a checkpoint of the other. Why not a module-level injection into
Megatron's mixer: ``ExtendedRMSNorm`` is defined at import time as a subclass of a ``MagicMock``
when mamba_ssm is missing, the training path calls a second fused kernel
(``mamba_split_conv1d_scan_combined``), and the mixer needs ``einops``; replacing four module
globals of a third-party module is more fragile than one class with the documented interface.

What runs (Megatron's ``_ssm_prefill`` path, Mamba-2 arXiv 2405.21060 §7):
``in_proj`` (quantized: the project's ``QuantizedColumnParallelLinear`` from the spec) ->
split ``[z, xBC, dt]`` -> causal depthwise conv1d over the sequence + SiLU -> split
``[x, B, C]`` -> :func:`nvfp4_megatron.ssm.mamba_chunk_scan_combined` (``A = -exp(A_log)``;
``scan_impl="compiled"``: the same function through ``torch.compile``,
``D``, ``dt_bias``, softplus) -> gated RMSNorm ``norm(y, z)`` (``norm_before_gate=False``,
one group per Mamba group) -> ``out_proj`` (quantized row-parallel). The conv, the scan and the
norm stay in high precision (DESIGN.md §2; NVFP4 paper arXiv 2509.25149 keeps only the linear
layers in FP4).

Tensor parallelism: heads and groups are split over TP (``in_proj`` is column-parallel with
its ``[z, x, B, C, dt]`` blocks each split, so the local output is ``[z_r, x_r, B_r, C_r, dt_r]``;
``out_proj`` is row-parallel). With sequence parallelism ``in_proj`` all-gathers the sequence and
``out_proj`` reduce-scatters it, as for the attention and MLP linears. With
``use_cpu_initialization`` every parameter is drawn whole on the CPU and each rank keeps its
per-block slice, so every TP layout starts from the same model (``in_proj`` is redrawn for that:
Megatron's CPU initialisation splits its rows contiguously, which would cut the ``[z|x|B|C|dt]``
blocks differently for each TP size).

Not supported (``ValueError``/``NotImplementedError`` naming it): inference (static or dynamic
batching), packed sequences, context parallelism (Megatron's ``MambaContextParallel`` all-to-all),
``bias=True``, ``conv_bias=False``, ``norm_before_gate=True`` (Megatron refuses them too).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.utils import (ensure_metadata_has_dp_cp_group,
                                             make_sharded_tensors_for_checkpoint)

from nvfp4_megatron.ssm import RMSNormGated, chunk_scan_fn

__all__ = ["LocalMambaMixer", "MambaMixerSubmodules", "TPGatedRMSNorm", "tp_block_slices"]


def tp_block_slices(t: torch.Tensor, sizes: list[int], tp_size: int, tp_rank: int,
                    dim: int = 0) -> torch.Tensor:
    """This TP rank's part of a tensor packed from blocks of ``sizes`` along ``dim``: each block
    is split evenly over ``tp_size`` ranks and the local pieces are packed again in order."""
    parts = torch.split(t, sizes, dim=dim)
    return torch.cat([p.chunk(tp_size, dim=dim)[tp_rank] for p in parts], dim=dim)


class TPGatedRMSNorm(RMSNormGated):
    """The gated RMSNorm with its weight split over TP (axis 0) in distributed checkpoints."""

    tp_group = None

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        state_dict = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state_dict, prefix, {"weight": 0},
                                                   sharded_offsets, tp_group=self.tp_group,
                                                   dp_cp_group=metadata["dp_cp_group"])


def _mark_tp(param: torch.nn.Parameter, partition_sizes: list[int] | None = None) -> None:
    param.tensor_model_parallel = True
    param.partition_dim = 0
    if partition_sizes is not None:
        param.partition_sizes = partition_sizes


class LocalMambaMixer(MegatronModule):
    """Megatron's ``MambaMixer`` interface on plain PyTorch (training forward only)."""

    def __init__(self, config, submodules: MambaMixerSubmodules, d_model: int, d_conv: int = 4,
                 conv_init=None, expand: int = 2, A_init_range=(1, 16), D_has_hdim: bool = False,
                 rmsnorm: bool = True, norm_before_gate: bool = False, dt_min: float = 0.001,
                 dt_max: float = 0.1, dt_init: str = "random", dt_scale: float = 1.0,
                 dt_init_floor: float = 1e-4, bias: bool = False, conv_bias: bool = True,
                 chunk_size: int = 128, layer_number=None, pg_collection=None,
                 pp_layer_offset: int = 0, name: str | None = None, scan_impl: str = "eager"):
        super().__init__(config)
        if pg_collection is None:
            raise ValueError("LocalMambaMixer needs pg_collection (Megatron's MambaLayer "
                             "passes it)")
        if bias or not conv_bias or norm_before_gate:
            raise ValueError(f"LocalMambaMixer: bias={bias}, conv_bias={conv_bias}, "
                             f"norm_before_gate={norm_before_gate}; Megatron's Mamba-2 mixer (and "
                             "this one) supports bias=False, conv_bias=True, "
                             "norm_before_gate=False")
        if config.context_parallel_size != 1:
            raise ValueError(
                f"context_parallel_size={config.context_parallel_size}: the local Mamba mixer has "
                "no context parallelism (Megatron's MambaContextParallel needs mamba_ssm); use "
                "parallel.context_parallel_size=1 for hybrid models on the emulated path")
        if dt_init != "random" or dt_scale != 1.0:
            raise ValueError(f"dt_init={dt_init!r}, dt_scale={dt_scale}: only Megatron's defaults "
                             "('random', 1.0) are implemented")
        if A_init_range[0] <= 0 or A_init_range[1] < A_init_range[0]:
            raise ValueError(f"A_init_range={A_init_range} must be 0 < low <= high")
        self.config = config
        self.d_model, self.d_conv, self.conv_init, self.expand = d_model, d_conv, conv_init, expand
        self.D_has_hdim, self.rmsnorm, self.norm_before_gate = D_has_hdim, rmsnorm, norm_before_gate
        self.chunk_size, self.layer_number = chunk_size, layer_number
        self.scan_impl = scan_impl
        self._scan = chunk_scan_fn(scan_impl)  # eager (the oracle) or torch.compile'd
        self.pp_layer_offset = pp_layer_offset
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        self.d_state = config.mamba_state_dim
        self.headdim = config.mamba_head_dim
        self.ngroups = config.mamba_num_groups
        if config.mamba_num_heads is not None:
            self.nheads = config.mamba_num_heads
            self.d_inner = self.nheads * self.headdim
        else:
            self.d_inner = int(expand * d_model)
            if self.d_inner % self.headdim:
                raise ValueError(f"expand*hidden_size={self.d_inner} is not a multiple of "
                                 f"mamba_head_dim={self.headdim}")
            self.nheads = self.d_inner // self.headdim
        tp = self.tp_group.size()
        rank = self.tp_group.rank()
        for what, n in (("mamba_num_heads", self.nheads), ("mamba_num_groups", self.ngroups)):
            if n % tp:
                raise ValueError(f"{what}={n} must be divisible by tensor_model_parallel_size={tp}")
        if self.nheads % self.ngroups:
            raise ValueError(f"mamba_num_heads={self.nheads} must be a multiple of "
                             f"mamba_num_groups={self.ngroups}")
        # the names Megatron's MambaMixer (and its sharded_state_dict) use
        self.nheads_local_tp = self.nheads // tp
        self.d_inner_local_tp = self.d_inner // tp
        self.ngroups_local_tp = self.ngroups // tp
        gn, gn_local = self.ngroups * self.d_state, self.ngroups_local_tp * self.d_state
        in_proj_sizes = [self.d_inner, self.d_inner, gn, gn, self.nheads]          # z x B C dt
        conv_sizes = [self.d_inner, gn, gn]                                           # x B C

        self.in_proj = build_module(
            submodules.in_proj, self.d_model, sum(in_proj_sizes), config=config,
            init_method=config.init_method, gather_output=False, bias=bias, skip_bias_add=False,
            is_expert=False, tp_comm_buffer_name="fc1", tp_group=self.tp_group,
            name=(name + ".in_proj") if name is not None else None)
        self.in_proj.weight.partition_sizes = [s // tp for s in in_proj_sizes]
        cpu_init = bool(config.use_cpu_initialization)
        if cpu_init and config.perform_initialization:
            # Redraw the whole in_proj and keep this rank's slice of each [z|x|B|C|dt] block (the
            # contiguous split Megatron's CPU initialisation did differs with the TP size).
            master = torch.empty(sum(in_proj_sizes), self.d_model, dtype=torch.float32)
            config.init_method(master)
            with torch.no_grad():
                self.in_proj.weight.copy_(tp_block_slices(
                    master.to(config.params_dtype), in_proj_sizes, tp, rank))

        # conv1d, dt_bias and A_log: drawn whole on the CPU and sliced (use_cpu_initialization),
        # else drawn per rank on the device under the model-parallel RNG, as Megatron does.
        device = None if (cpu_init or not torch.cuda.is_available()) else \
            torch.cuda.current_device()
        conv_dim = sum(conv_sizes)
        n_heads = self.nheads
        if not cpu_init:
            conv_dim, n_heads = conv_dim // tp, self.nheads_local_tp
        conv_w = torch.empty(conv_dim, 1, d_conv, device=device, dtype=config.params_dtype)
        conv_b = torch.empty(conv_dim, device=device, dtype=config.params_dtype)
        with _rng(per_rank=not cpu_init):
            self._init_conv(conv_w, conv_b)
        with _rng(per_rank=not cpu_init):
            dt = torch.exp(torch.rand(n_heads, device=device, dtype=config.params_dtype)
                           * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
                           ).clamp(min=dt_init_floor)
            inv_dt = dt + torch.log(-torch.expm1(-dt))  # inverse of softplus
            A = torch.empty(n_heads, dtype=torch.float32, device=device)
            if config.perform_initialization:
                A.uniform_(*A_init_range)
            else:
                A.fill_(1.0)
            A_log = torch.log(A)  # kept in FP32, as Megatron does
        if cpu_init:
            conv_w = tp_block_slices(conv_w, conv_sizes, tp, rank)
            conv_b = tp_block_slices(conv_b, conv_sizes, tp, rank)
            inv_dt = inv_dt.chunk(tp)[rank]
            A_log = A_log.chunk(tp)[rank]
        local_conv = [s // tp for s in conv_sizes]
        self.conv1d_weight = torch.nn.Parameter(conv_w.contiguous())
        self.conv1d_bias = torch.nn.Parameter(conv_b.contiguous())
        self.dt_bias = torch.nn.Parameter(inv_dt.contiguous())
        self.A_log = torch.nn.Parameter(A_log.contiguous())
        self.D = torch.nn.Parameter(torch.ones(
            self.d_inner_local_tp if D_has_hdim else self.nheads_local_tp, device=device))
        for p, sizes in ((self.conv1d_weight, local_conv), (self.conv1d_bias, local_conv),
                         (self.dt_bias, None), (self.A_log, None), (self.D, None)):
            _mark_tp(p, sizes)
        if rmsnorm:
            self.norm = TPGatedRMSNorm(self.d_inner_local_tp, eps=1e-5,
                                       group_size=self.d_inner_local_tp // self.ngroups_local_tp,
                                       norm_before_gate=False, device=device,
                                       dtype=config.params_dtype)
            _mark_tp(self.norm.weight)
            self.norm.tp_group = self.tp_group
        self.out_proj = build_module(
            submodules.out_proj, self.d_inner, self.d_model, config=config,
            init_method=config.output_layer_init_method, bias=bias, input_is_parallel=True,
            skip_bias_add=True, is_expert=False, tp_comm_buffer_name="fc2",
            tp_group=self.tp_group, name=(name + ".out_proj") if name is not None else None)
        self._shard_hints(tp)

    def _shard_hints(self, tp: int) -> None:
        """Where this rank's ``in_proj`` / ``out_proj`` sizes come from, for the block check of
        the precision policy (``policy.check_weight_blocks``)."""
        di, g, n, h = self.d_inner, self.ngroups, self.d_state, self.nheads
        fix = ("Pick mamba_num_heads / mamba_head_dim / mamba_num_groups / mamba_state_dim (or "
               "the TP size) so that both are multiples, or keep the Mamba blocks in BF16 "
               "(precision.bf16_blocks).")
        self.in_proj.shard_hint = (
            f"Mamba in_proj rows per TP rank = (2 x d_inner {di} + 2 x groups {g} x state {n} + "
            f"heads {h}) / TP {tp} = {(2 * di + 2 * g * n + h) // tp}; columns = hidden_size "
            f"{self.d_model}. {fix}")
        self.out_proj.shard_hint = (
            f"Mamba out_proj columns per TP rank = d_inner {di} (heads {h} x head_dim "
            f"{self.headdim}) / TP {tp} = {di // tp}; rows = hidden_size {self.d_model}. {fix}")

    def _init_conv(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        # Megatron's sequence (nn.Conv1d's default init, then the configured one)
        torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(weight.size(1) * weight.size(2))
        torch.nn.init.uniform_(bias, -bound, bound)
        if self.config.perform_initialization:
            if self.conv_init is not None:
                torch.nn.init.uniform_(weight, -self.conv_init, self.conv_init)
            else:
                torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5))

    # ---- forward (training) ---------------------------------------------------------------

    def forward(self, hidden_states, inference_context=None, *, inference_params=None,
                packed_seq_params=None):
        """``hidden_states`` [s, b, h] (s/TP with sequence parallelism) -> (out, out_bias)."""
        if inference_context is not None or inference_params is not None:
            raise NotImplementedError("LocalMambaMixer runs the training forward only (no "
                                      "inference cache); use Megatron's MambaMixer with mamba_ssm")
        if packed_seq_params is not None:
            raise ValueError("LocalMambaMixer: packed sequences (packed_seq_params) are not "
                             "supported")
        zxBCdt, _ = self.in_proj(hidden_states)
        y = self.ssm(zxBCdt)
        return self.out_proj(y)

    def ssm(self, zxBCdt: torch.Tensor) -> torch.Tensor:
        """[s, b, in_proj_local] -> [s, b, d_inner_local]: conv, SSD scan, gated norm."""
        s, b, _ = zxBCdt.shape
        di, nh, hd = self.d_inner_local_tp, self.nheads_local_tp, self.headdim
        g, n = self.ngroups_local_tp, self.d_state
        z, xBC, dt = torch.split(zxBCdt, [di, di + 2 * g * n, nh], dim=-1)
        xBC = self.causal_conv(xBC)
        x, B, C = torch.split(xBC, [di, g * n, g * n], dim=-1)

        def bl(t, *shape):  # [s, b, ...] -> [b, s, *shape]
            return t.transpose(0, 1).reshape(b, s, *shape)

        y = self._scan(
            bl(x, nh, hd), bl(dt, nh), -torch.exp(self.A_log.float()), bl(B, g, n), bl(C, g, n),
            self.chunk_size,
            D=self.D.float().reshape(nh, hd) if self.D_has_hdim else self.D,
            z=None if self.rmsnorm else bl(z, nh, hd),
            dt_bias=self.dt_bias.float(), dt_softplus=True)
        y = y.reshape(b, s, di).transpose(0, 1).contiguous()
        if self.rmsnorm:
            y = self.norm(y, z.contiguous())
        return y

    def causal_conv(self, xBC: torch.Tensor) -> torch.Tensor:
        """Depthwise causal conv1d over the sequence + SiLU; [s, b, c] -> [s, b, c]."""
        s = xBC.shape[0]
        t = xBC.permute(1, 2, 0)  # [b, c, s]
        t = F.conv1d(t, self.conv1d_weight, self.conv1d_bias, padding=self.d_conv - 1,
                     groups=t.shape[1])[..., :s]
        return F.silu(t).permute(2, 0, 1)

    # ---- Megatron's methods that depend only on the attributes above ----------------------
    sharded_state_dict = MambaMixer.sharded_state_dict
    mamba_state_shapes_per_request = MambaMixer.mamba_state_shapes_per_request


def _rng(*, per_rank: bool):
    """Megatron's model-parallel RNG fork for per-rank draws; the default generator (the same
    stream on every rank) for whole-tensor CPU draws."""
    return get_cuda_rng_tracker().fork() if per_rank else contextlib.nullcontext()
