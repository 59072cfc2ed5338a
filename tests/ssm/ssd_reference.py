"""Reference forms for the Mamba-2 tests, written independently of the package (float64)."""

import torch


def sequential_scan(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None,
                    dt_softplus=False, dt_limit=(0.0, float("inf"))):
    """The recurrence, step by step, in float64 (differentiable)."""
    x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
    b, L, h, p = x.shape
    g, n = B.shape[2:]
    rep = h // g
    if dt_bias is not None:
        dt = dt + dt_bias.double()
    if dt_softplus:
        dt = torch.where(dt <= 20.0, torch.log1p(torch.exp(dt)), dt)
    dt = dt.clamp(dt_limit[0], dt_limit[1])
    Bh = B.repeat_interleave(rep, dim=2)  # [b, L, h, n]: head k reads group k // rep
    Ch = C.repeat_interleave(rep, dim=2)
    state = (torch.zeros(b, h, p, n, dtype=torch.float64) if initial_states is None
             else initial_states.double())
    ys = []
    for t in range(L):
        decay = torch.exp(dt[:, t] * A)                                     # [b, h]
        inp = (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]  # [b, h, p, n]
        state = decay[..., None, None] * state + inp
        y = (state * Ch[:, t, :, None, :]).sum(-1)                          # [b, h, p]
        if D is not None:
            d = D.double()
            y = y + x[:, t] * (d[:, None] if d.dim() == 1 else d)
        if z is not None:
            zt = z[:, t].double()
            y = y * zt * torch.sigmoid(zt)
        ys.append(y)
    return torch.stack(ys, dim=1), state


def mamba_mixer_reference(h, *, in_proj_w, conv_w, conv_b, dt_bias, A_log, D, norm_w, out_proj_w,
                          nheads, headdim, ngroups, dstate, eps=1e-5):
    """Megatron's Mamba-2 mixer (training forward, TP1, rmsnorm, norm_before_gate=False) written
    out in float64 from its definition: ``in_proj`` -> ``[z | x B C | dt]`` -> causal depthwise
    conv + SiLU (explicit sum over taps) -> ``[x | B | C]`` -> the sequential scan
    (softplus(dt + dt_bias), A = -exp(A_log), D skip) -> rmsnorm per group of ``y * silu(z)`` ->
    ``out_proj``. ``h``: [s, b, d]; returns [s, b, d]."""
    h = h.double()
    s, b, _ = h.shape
    di, gn = nheads * headdim, ngroups * dstate
    zxbcdt = h @ in_proj_w.double().T
    z, xbc, dt = zxbcdt[..., :di], zxbcdt[..., di:2 * di + 2 * gn], zxbcdt[..., 2 * di + 2 * gn:]
    k = conv_w.shape[-1]
    w = conv_w.double()[:, 0, :]                       # [channels, k]
    conv = conv_b.double().expand(s, b, -1).clone()
    for tap in range(k):                                # output t reads input t - (k-1) + tap
        shift = k - 1 - tap
        if shift >= s:
            continue
        shifted = torch.zeros_like(xbc)
        shifted[shift:] = xbc[:s - shift]
        conv = conv + shifted * w[:, tap]
    xbc = conv * torch.sigmoid(conv)
    x, B, C = xbc[..., :di], xbc[..., di:di + gn], xbc[..., di + gn:]

    def bl(t, *shape):
        return t.transpose(0, 1).reshape(b, s, *shape)

    y, _ = sequential_scan(bl(x, nheads, headdim), bl(dt, nheads), -torch.exp(A_log.double()),
                           bl(B, ngroups, dstate), bl(C, ngroups, dstate), D=D.double(),
                           dt_bias=dt_bias.double(), dt_softplus=True)
    y = y.reshape(b, s, di).transpose(0, 1)
    zz = z.double()
    v = y * zz * torch.sigmoid(zz)
    grp = v.reshape(s, b, ngroups, di // ngroups)
    v = (grp / torch.sqrt(grp.square().mean(-1, keepdim=True) + eps)).reshape(s, b, di)
    v = v * norm_w.double()
    return v @ out_proj_w.double().T
