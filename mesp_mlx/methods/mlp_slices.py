"""MeSP's MLP backward slice by slice of the hidden (ffn) axis: every frozen MLP matrix dequantized once.

The gated MLP  a = act(gate) * up,  gate = n2 Wg^T + Lg,  up = n2 Wu^T + Lu,  r2 = a Wd^T + Ld  (L: LoRA branches,
Wd [d, ffn]) is element-wise along the ffn axis between its products, so a slice S of that axis needs only rows S of
Wg and Wu and columns S of Wd. Given g = dL/dr2:
    gate_S = n2 Wg[S]^T + Lg[:, S]                  up_S = n2 Wu[S]^T + Lu[:, S]        (the recompute)
    g_a_S = g Wd[:, S] + (g_hd A_d[S]^T) m_d,S       (g_hd = s g B_d^T: the down LoRA's part of the input gradient)
    a_S, g_gate_S, g_up_S = act-gate forward and backward, element-wise (one sigmoid / tanh for both)
    g_n2 += g_gate_S Wg[S] + g_up_S Wu[S]
One pass over the slices does the recompute and the input gradient, where the whole-tensor rule dequantizes gate and up
twice (recompute, then input gradient) and holds [T, ffn] gate, up, a and their gradients. The LoRA gradients come
from the slices (the formulas of mesp_lora.lora_branch_grads, m the dropout masks):
    down (input a):  h_d = Σ_S (a_S m_d,S) A_d[S];  dB_d = s h_d^T g;  dA_d[S] = (a_S m_d,S)^T g_hd
    gate (input n2): g_hg = Σ_S s g_gate_S B_g[:, S]^T;  dB_g[:, S] = s h_g^T g_gate_S;  dA_g = xd_g^T g_hg;
                     g_n2 += (g_hg A_g^T) m_g                                            (up: the same)
The slices are lean_matmul's row slices of Wg (mesp_lora.lean_slices), so a gate the forward kept (computed by
lean_matmul) is bit for bit the slice-wise recompute: kept and recomputed plans give the same bits.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear

from ..engine import fastmath
from ..models.compute import DequantLinear
from .mesp_lora import dense_cols, dense_rows, lean_slices
from .vjp import _C, _gelu_tanh_arg  # GELU-tanh's constant and tanh argument, the very ops of the whole-tensor rule


def _swiglu_both(sigmoid):
    def fn(gate, up, g):
        # a = silu(gate) up, silu(z) = z s(z): d/dgate = g up s (1 + gate (1 - s)), d/dup = g silu(gate)
        gate, up, g = gate.astype(mx.float32), up.astype(mx.float32), g.astype(mx.float32)
        s = sigmoid(gate)
        silu = gate * s
        return silu * up, g * up * s * (1 + gate * (1 - s)), g * silu

    return mx.compile(fn)


@mx.compile
def _gelu_tanh_rest(gate, up, t, g):
    # a = z/2 (1 + t) up, t = tanh(c (z + 0.044715 z^3)): vjp.py's GELU-tanh gating and its backward, sharing t
    gate, up, t, g = gate.astype(mx.float32), up.astype(mx.float32), t.astype(mx.float32), g.astype(mx.float32)
    half = 0.5 * gate * (1 + t)
    dgelu = 0.5 * (1 + t) + 0.5 * gate * (1 - t * t) * _C * (1 + 3 * 0.044715 * gate * gate)
    return half * up, g * up * dgelu, g * half


_SWIGLU = {True: _swiglu_both(fastmath.sigmoid_chain), False: _swiglu_both(mx.sigmoid)}


def _gelu_tanh_both(gate, up, g):
    return _gelu_tanh_rest(gate, up, mx.tanh(_gelu_tanh_arg(gate)), g)


def gating_with_grads(activation: str, gate, up, g):
    """(a, dL/dgate, dL/dup) of a = act(gate) * up given g = dL/da, in the inputs' dtype, row block by row block."""
    on = fastmath.enabled()
    fn = _SWIGLU[on] if activation == "silu" else _gelu_tanh_both
    outs = fastmath.chunked(fn, gate, up, g) if on else fn(gate, up, g)
    return tuple(o.astype(gate.dtype) for o in outs)


def _frozen(layer: nn.Module) -> nn.Module:
    return layer.linear if isinstance(layer, LoRALinear) else layer


def supported(mlp: nn.Module, names: tuple[str, str, str]) -> bool:
    """Whether the sliced rule takes this MLP: separate gate / up / down projections, each frozen or LoRA (not DoRA),
    computed by just-in-time dequantization or dense (the fused quantized path has no copies to save), and slice
    boundaries that fall on the down matrix's quantization groups."""
    layers = [getattr(mlp, n) for n in names]
    if any(isinstance(l, DoRALinear) for l in layers):
        return False
    frozen = [_frozen(l) for l in layers]
    if any(isinstance(f, nn.QuantizedLinear) and not isinstance(f, DequantLinear) for f in frozen):
        return False
    if any("weight" not in f for f in frozen):
        return False
    gate, up, down = frozen
    if gate["weight"].shape != up["weight"].shape or type(gate) is not type(up):
        return False
    if isinstance(down, nn.QuantizedLinear):
        bounds = [a for a, _ in lean_slices(gate)]
        if any(a % down.group_size for a in bounds):
            return False
    return True


class _Lora:
    """One projection's LoRA terms for the sliced rule, flattened to rows: xd = x m (m: the dropout mask), m, and
    h = xd A (kept by the forward's record, or recomputed by its own expression: the same bits)."""

    def __init__(self, proj):
        self.proj = proj
        self.layer = proj.layer if isinstance(proj.layer, LoRALinear) else None
        self.h3 = None
        self.g_h, self.dB = None, []  # Σ_S s g_S B[:, S]^T, and dB's column pieces
        if self.layer is None:
            return
        x = proj.x
        self.h3 = proj.h if proj.h is not None else proj.lora_h()
        flat = lambda t: None if t is None else t.reshape(-1, t.shape[-1])  # noqa: E731
        self.xd = flat(x if proj.mask is None else x * proj.mask)
        self.mask, self.h = flat(proj.mask), flat(self.h3)


def sliced_mlp_backward(mlp, names: tuple[str, str, str], activation: str, n2: mx.array, g: mx.array,
                        projs: tuple, down_mask, grads: dict, kept: tuple | None = None) -> mx.array:
    """dL/dn2 of the MLP given g = dL/dr2, writing its LoRA gradients into `grads` under "mlp.<name>.lora_a/b".
    projs: the gate and up projections' records (mesp._Proj, input n2: dropout masks, h when kept); down_mask: the
    down projection's dropout mask (or None); kept: the forward's (gate, up) when the plan kept them, else they are
    recomputed slice by slice."""
    gate_l, up_l, down_l = (getattr(mlp, n) for n in names)
    Wg, Wu, Wd = _frozen(gate_l), _frozen(up_l), _frozen(down_l)
    shape = n2.shape
    N, dt = math.prod(shape[:-1]), n2.dtype
    g2 = g.reshape(N, -1)
    lg, lu = _Lora(projs[0]), _Lora(projs[1])
    md = None if down_mask is None else down_mask.reshape(N, -1)
    down_lora = isinstance(down_l, LoRALinear)
    if down_lora:
        g_hd = down_l.scale * (g2 @ down_l.lora_b.T)  # [N, r]
        h_d, dA_d = None, []
    g_n2 = None
    for a, b in lean_slices(Wg):
        # g_a = g Wd[:, S] first: its dequantized slice is gone before gate's and up's exist
        g_a = g2 @ dense_cols(Wd, a, b, dt)
        if down_lora:
            g_xd = g_hd @ down_l.lora_a[a:b].T
            g_a = g_a + (g_xd if md is None else g_xd * md[:, a:b])
        mx.eval(g_a)
        wg, wu = dense_rows(Wg, a, b, dt), dense_rows(Wu, a, b, dt)
        if kept is None:  # lean_matmul's product for this slice, finished as the forward finishes it
            gate_s, up_s = (l.proj.finish(n2 @ w.T, a, b, l.h3).reshape(N, -1) for l, w in ((lg, wg), (lu, wu)))
        else:
            gate_s, up_s = (t.reshape(N, -1)[:, a:b] for t in kept)
        a_s, g_gate, g_up = gating_with_grads(activation, gate_s, up_s, g_a)
        del gate_s, up_s, g_a
        g_n2 = g_gate @ wg if g_n2 is None else mx.addmm(g_n2, g_gate, wg)
        g_n2 = mx.addmm(g_n2, g_up, wu)
        if down_lora:
            xd = a_s if md is None else a_s * md[:, a:b]
            part = xd @ down_l.lora_a[a:b]
            h_d = part if h_d is None else h_d + part
            dA_d.append(xd.T @ g_hd)
        for l, gs in ((lg, g_gate), (lu, g_up)):
            if l.layer is not None:
                part = l.layer.scale * (gs @ l.layer.lora_b[:, a:b].T)
                l.g_h = part if l.g_h is None else l.g_h + part
                l.dB.append(l.layer.scale * (l.h.T @ gs))
        mx.eval(g_n2, *(t for l in (lg, lu) if l.layer is not None for t in (l.g_h, l.dB[-1])),
                *((h_d, dA_d[-1]) if down_lora else ()))
        del wg, wu, a_s, g_gate, g_up
    prefix = "mlp."
    if down_lora:
        grads[f"{prefix}{names[2]}.lora_a"] = mx.concatenate(dA_d, axis=0).astype(down_l.lora_a.dtype)
        grads[f"{prefix}{names[2]}.lora_b"] = (down_l.scale * (h_d.T @ g2)).astype(down_l.lora_b.dtype)
    for l, name in ((lg, names[0]), (lu, names[1])):
        if l.layer is None:
            continue
        grads[f"{prefix}{name}.lora_a"] = (l.xd.T @ l.g_h).astype(l.layer.lora_a.dtype)
        grads[f"{prefix}{name}.lora_b"] = mx.concatenate(l.dB, axis=1).astype(l.layer.lora_b.dtype)
        g_xd = l.g_h @ l.layer.lora_a.T
        g_n2 = g_n2 + (g_xd if l.mask is None else g_xd * l.mask)
    return g_n2.reshape(shape)
