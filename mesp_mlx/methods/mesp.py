"""MeSP's backward rule: a hand-derived VJP of a whole Llama / Qwen2 / Qwen3 block (REFERENCE §2).

The block (mlx-lm's TransformerBlock of those families):
    n1 = rms1(x);  q, k, v = proj(n1);  [Qwen3: q, k = q_norm(q), k_norm(k)];  q, k = rope(q), rope(k)
    o  = softmax(scale q k^T + mask) v;  h = x + o_proj(o)
    n2 = rms2(h);  a = silu(gate(n2)) * up(n2);  out = h + down(a)
Backward from g = dL/dout, keeping only what each VJP needs and evaluating stage by stage, so the working set is a few
[T, d] / [T, ffn] tensors, one dequantized matrix at a time and one head-chunk of attention scores:
    MLP : g_a = down^T g;  (g_gate, g_up) = swiglu'(gate, up) g_a;  g_n2 = gate^T g_gate + up^T g_up
          g_h = g + rms2'(h) g_n2
    attn: g_o = o_proj^T g_h;  (dq, dk, dv) = attention'(q, k, v) g_o (probabilities recomputed per head chunk);
          dq, dk = rope^T dq, rope^T dk;  [Qwen3: q_norm'(.), k_norm'(.)];  g_n1 = q^T dq + k^T dk + v^T dv
          g_x = g_h + rms1'(x) g_n1
Every projection's LoRA gradient comes from the same formulas as MeSPLoRALinear (h = xA recomputed unless store_h).
A block this rule does not recognise, or whose recomputed forward disagrees with the module's, goes to MeBP's autodiff
rule with a warning: never silently wrong.
"""

from __future__ import annotations

import warnings

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear

from ..models.compute import DequantLinear, set_compute_path
from ..mesp_dora import DoRAProj
from ..mesp_lora import dropout_active, frozen_input_grad, lean_matmul, lora_branch_grads
from .base import Method
from .mebp import MeBP
from .vjp import attention_backward, attention_forward, rms_norm_backward, rope_backward, swiglu_backward

FAMILIES = ("mlx_lm.models.llama", "mlx_lm.models.qwen2", "mlx_lm.models.qwen3")
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")


def unsupported_reason(block: nn.Module) -> str | None:
    """Why the hand rule cannot take this block (None when it can)."""
    cls = type(block)
    if cls.__module__ not in FAMILIES or cls.__name__ != "TransformerBlock":
        return f"{cls.__module__}.{cls.__name__} is not a Llama/Qwen2/Qwen3 block"
    attn, mlp = block.self_attn, block.mlp
    if type(mlp).__name__ != "MLP" or not all(hasattr(mlp, p) for p in MLP_PROJ):
        return f"{type(mlp).__name__} is not a SwiGLU MLP"
    if not all(hasattr(attn, p) for p in ATTN_PROJ):
        return "attention without q/k/v/o projections"
    norms = [block.input_layernorm, block.post_attention_layernorm] + [getattr(attn, n) for n in ("q_norm", "k_norm")
                                                                      if hasattr(attn, n)]
    if any(type(n) is not nn.RMSNorm for n in norms):
        return "a norm other than RMSNorm"
    lora = {f"{part}.{p}" for part, projs in (("self_attn", ATTN_PROJ), ("mlp", MLP_PROJ)) for p in projs
            if isinstance(getattr(getattr(block, part), p), (LoRALinear, DoRALinear))}
    allowed = {f"{m}.{t}" for m in lora for t in ("lora_a", "lora_b", "m")}
    extra = [k for k, _ in tree_flatten(block.trainable_parameters()) if k not in allowed]
    if extra:
        return f"trainable tensors other than LoRA A/B: {', '.join(extra[:3])}"
    return None


def _frozen_forward(linear: nn.Module, x: mx.array) -> mx.array:
    y = lean_matmul(x, linear, True)
    return y + linear["bias"] if "bias" in linear else y


class _Proj:
    """One projection's forward, remembering what its backward needs: its input, the dropout mask, optionally h.
    A DoRA projection gets DoRA's context instead (mesp_dora.DoRAProj, the same interface)."""

    def __new__(cls, layer: nn.Module, *args, **kwargs):
        return DoRAProj(layer, *args, **kwargs) if isinstance(layer, DoRALinear) else super().__new__(cls)

    def __init__(self, layer: nn.Module, x: mx.array, store_h: bool, output: bool = True):
        self.layer, self.x = layer, x
        self.mask = self.h = self.y = None
        if output:
            self.y = _frozen_forward(layer.linear if isinstance(layer, LoRALinear) else layer, x)
        if not isinstance(layer, LoRALinear):
            return
        if dropout_active(layer):
            # the same Bernoulli draw as LoRALinear's dropout(x) (same key, same shape): x * mask == dropout(x)
            self.mask = layer.dropout(mx.ones_like(x))
        xd = x if self.mask is None else x * self.mask
        h = xd @ layer.lora_a
        if output:
            self.y = self.y + (layer.scale * (h @ layer.lora_b)).astype(x.dtype)
        self.h = h if store_h else None

    def backward(self, g: mx.array, grads: dict, name: str) -> mx.array:
        layer = self.layer
        if not isinstance(layer, LoRALinear):
            return frozen_input_grad(layer, g, lean=True)
        xd = self.x if self.mask is None else self.x * self.mask
        g_xd, grads[f"{name}.lora_a"], grads[f"{name}.lora_b"] = lora_branch_grads(
            xd, layer.lora_a, layer.lora_b, g, layer.scale, self.h)
        if self.mask is not None:
            g_xd = g_xd * self.mask
        return frozen_input_grad(layer.linear, g, lean=True) + g_xd


class MeSP(Method):
    name = "mesp"

    def __init__(self, store_h: bool = False, verify: bool = True):
        self.store_h = store_h  # keep h = xA from the recompute instead of recomputing it (the paper's Table 5)
        self.verify = verify  # check the rule's forward against the module once per block class
        self._verified: dict = {}
        self._fallback = MeBP()
        self._warned: set = set()

    def _use_hand_rule(self, block, h_in, mask) -> bool:
        cls = type(block)
        reason = unsupported_reason(block)
        if reason is None and self.verify and cls not in self._verified:
            self._verified[cls] = self._check_forward(block, h_in, mask)
        reason = reason or self._verified.get(cls)
        if reason is not None and reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"MeSP has no hand-written backward for this block ({reason}); using MeBP's autodiff rule "
                          "for it (same gradients, more memory)", stacklevel=3)
        return reason is None

    def _check_forward(self, block, h_in, mask) -> str | None:
        """Once per block class: the rule's forward must reproduce the module's (guards against a changed mlx-lm).
        Checked on the first few positions, with the module on the fused quantized path, so that the check adds no
        dequantized matrices to the step's memory."""
        t = min(8, h_in.shape[1])
        x = h_in[:, :t]
        small_mask = mask[..., :t, :t] if isinstance(mask, mx.array) else mask
        was_training = block.training
        dequant = [m for _, m in block.named_modules() if isinstance(m, DequantLinear)]
        block.eval()  # no dropout draws here: the recompute that follows must see the forward's random stream
        try:
            ours = self._forward(block, x, small_mask)[-1]
            set_compute_path(block, "fused")
            ref = block(x, small_mask)
            err = (mx.abs(ours - ref).max() / (mx.abs(ref).max() + 1e-30)).item()
        finally:
            for m in dequant:
                m.__class__ = DequantLinear
            block.train(was_training)
        tol = 1e-4 if ref.dtype == mx.float32 else 3e-2  # a structural difference is O(1); rounding is not
        return None if err <= tol else f"its forward differs from the hand rule's by {err:.1e}"

    # --- forward recompute ------------------------------------------------------------------------------------------
    def _forward(self, block, x, mask, output: bool = True):
        """The block's forward from its input x, keeping each projection's context. With output=False (the backward's
        recompute) the last projection is not computed: nothing in the backward needs the block's output."""
        attn, mlp = block.self_attn, block.mlp
        B, L, _ = x.shape
        n1 = block.input_layernorm(x)
        qp, kp, vp = (_Proj(getattr(attn, p), n1, self.store_h) for p in ("q_proj", "k_proj", "v_proj"))
        q = qp.y.reshape(B, L, attn.n_heads, -1)
        k = kp.y.reshape(B, L, attn.n_kv_heads, -1)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q = attn.rope(q.transpose(0, 2, 1, 3))
        k = attn.rope(k.transpose(0, 2, 1, 3))
        v = vp.y.reshape(B, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
        o = attention_forward(q, k, v, attn.scale, mask)
        o = o.transpose(0, 2, 1, 3).reshape(B, L, -1)
        op = _Proj(attn.o_proj, o, self.store_h)
        h = x + op.y
        n2 = block.post_attention_layernorm(h)
        gp, up = _Proj(mlp.gate_proj, n2, self.store_h), _Proj(mlp.up_proj, n2, self.store_h)
        a = nn.silu(gp.y) * up.y
        dp = _Proj(mlp.down_proj, a, self.store_h, output)
        return qp, kp, vp, q, k, v, op, h, gp, up, dp, (h + dp.y if output else None)

    def block_forward(self, block, h, mask):
        """The engine's forward through a block: the rule's own staged forward (lean matmuls, chunked attention)."""
        if not self._use_hand_rule(block, h, mask):
            return block(h, mask)
        return self._forward(block, h, mask)[-1]

    # --- the rule ---------------------------------------------------------------------------------------------------
    def block_backward(self, block, h_in, g_out, mask):
        if not self._use_hand_rule(block, h_in, mask):
            return self._fallback.block_backward(block, h_in, g_out, mask)
        attn, mlp = block.self_attn, block.mlp
        x = h_in
        B, L, _ = x.shape
        grads: dict = {}

        # recompute the forward up to the MLP input, keeping q, k, v (post-rope), o, h, gate, up and the LoRA inputs
        qp, kp, vp, q, k, v, op, h, gp, up, dp, _ = self._forward(block, x, mask, output=False)
        mx.eval(q, k, v, op.x, h, gp.y, up.y, dp.x, *(p.h for p in (qp, kp, vp, op, gp, up, dp) if p.h is not None))

        # MLP
        g_a = dp.backward(g_out, grads, "mlp.down_proj")
        mx.eval(g_a, grads)
        del dp
        g_gate, g_up = swiglu_backward(gp.y, up.y, g_a)
        del g_a
        g_n2 = gp.backward(g_gate, grads, "mlp.gate_proj")
        mx.eval(g_n2, grads)
        g_n2 = g_n2 + up.backward(g_up, grads, "mlp.up_proj")
        del g_gate, g_up, gp, up
        g_h = g_out + rms_norm_backward(block.post_attention_layernorm, h, g_n2)
        mx.eval(g_h, grads)
        del g_n2, h

        # attention
        g_o = op.backward(g_h, grads, "self_attn.o_proj")
        mx.eval(g_o, grads)
        del op
        g_o = g_o.reshape(B, L, attn.n_heads, -1).transpose(0, 2, 1, 3)
        dq, dk, dv = attention_backward(q, k, v, g_o, attn.scale, mask)
        del g_o, q, k, v
        dq = rope_backward(attn.rope, dq).transpose(0, 2, 1, 3)
        dk = rope_backward(attn.rope, dk).transpose(0, 2, 1, 3)
        if hasattr(attn, "q_norm"):
            dq = rms_norm_backward(attn.q_norm, qp.y.reshape(B, L, attn.n_heads, -1), dq)
            dk = rms_norm_backward(attn.k_norm, kp.y.reshape(B, L, attn.n_kv_heads, -1), dk)
        dv = dv.transpose(0, 2, 1, 3)
        g_n1 = qp.backward(dq.reshape(B, L, -1), grads, "self_attn.q_proj")
        mx.eval(g_n1, grads)
        g_n1 = g_n1 + kp.backward(dk.reshape(B, L, -1), grads, "self_attn.k_proj")
        mx.eval(g_n1, grads)
        g_n1 = g_n1 + vp.backward(dv.reshape(B, L, -1), grads, "self_attn.v_proj")
        del dq, dk, dv, qp, kp, vp
        g_x = g_h + rms_norm_backward(block.input_layernorm, x, g_n1)
        return g_x, tree_unflatten(list(grads.items()))
