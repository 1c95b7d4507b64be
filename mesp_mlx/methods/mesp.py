"""MeSP's backward rule: a hand-derived VJP of a whole dense decoder block (docs/design.md §2), read from the family's
BlockSpec (models/families/base.py): Llama, Mistral, Qwen2, Qwen3, SmolLM3, Granite, OLMo 2, Phi-3 and Gemma 3.

The block, in the spec's terms (m = residual multiplier, norms RMSNorm with weight w + offset, absent ones identity):
    n1 = pre_attn(x);  q, k, v = proj(n1) [fused: one qkv linear, split];  [q/k norms per head or full width]
    q, k = rope(q), rope(k);  o = softmax(scale q k^T + mask) v;  r1 = o_proj(o);  h = x + m post_attn(r1)
    n2 = pre_mlp(h);  a = act(gate(n2)) * up(n2) [fused: one gate_up linear, halves];  r2 = down(a)
    out = h + m post_mlp(r2)
Backward from g = dL/dout, keeping only what each VJP needs and evaluating stage by stage, so the working set is a few
[T, d] / [T, ffn] tensors, one dequantized matrix at a time and one head-chunk of attention scores:
    MLP : g_r2 = post_mlp'(r2) (m g);  g_a = down^T g_r2;  (g_gate, g_up) = act-gate'(gate, up) g_a;
          g_n2 = gate^T g_gate + up^T g_up;  g_h = g + pre_mlp'(h) g_n2
    attn: g_r1 = post_attn'(r1) (m g_h);  g_o = o_proj^T g_r1;  (dq, dk, dv) = attention'(q, k, v) g_o (probabilities
          recomputed per head chunk);  dq, dk = rope^T dq, rope^T dk;  q/k norm';  g_n1 = q^T dq + k^T dk + v^T dv
          g_x = g_h + pre_attn'(x) g_n1
Every projection's LoRA gradient comes from the same formulas as MeSPLoRALinear (h = xA recomputed unless store_h).
A block without a spec gets the generic rule (MeBP's autodiff of the block, MeSP's LoRA VJP inside), said once per
block class; so does a block whose recomputed forward disagrees with the module's: never silently wrong.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear

from ..engine.checkpoints import MmapSide
from ..models.compute import DequantLinear, set_compute_path
from ..models.families import block_spec
from . import mesp_lora
from .base import Method
from .mebp import MeBP
from .mesp_dora import DoRAProj, MeSPDoRALinear
from .mesp_lora import MeSPLoRALinear, dropout_active, frozen_input_grad, lean_matmul, lora_linear_backward
from .mlp_slices import sliced_mlp_backward
from .mlp_slices import supported as sliced_mlp_supported
from .vjp import attention_backward, attention_forward, gated_backward, gated_forward, rms_norm_backward, rope_backward


def _projections(spec) -> tuple[tuple, tuple]:
    attn = ("qkv_proj",) if spec.fused_qkv else ("q_proj", "k_proj", "v_proj")
    mlp = ("gate_up_proj",) if spec.fused_gate_up else ("gate_proj", "up_proj")
    return attn + ("o_proj",), mlp + ("down_proj",)


def unsupported_reason(block: nn.Module) -> str | None:
    """Why the hand rule cannot take this block (None when it can)."""
    cls = type(block)
    spec = block_spec(block)
    if spec is None:
        return "no hand rule for this block class"
    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    attn_proj, mlp_proj = _projections(spec)
    if attn is None or not all(hasattr(attn, p) for p in attn_proj):
        return "attention without the projections its family's description names"
    if mlp is None or not all(hasattr(mlp, p) for p in mlp_proj):
        return "an MLP without the projections its family's description names"
    norm_names = [spec.pre_attn_norm, spec.post_attn_norm, spec.pre_mlp_norm, spec.post_mlp_norm]
    norms = [getattr(block, n, None) for n in norm_names if n] + \
        ([attn.q_norm, attn.k_norm] if spec.qk_norm else [])
    if any(n is None or "weight" not in n or not hasattr(n, "eps") for n in norms):
        return "a norm the description names is missing or is not an RMSNorm"
    if spec.norm_offset and block[norm_names[0] or norm_names[1]]["weight"].dtype == mx.float16:
        return "float16 Gemma block (mlx-lm clips its residual adds in float16)"
    lora = {f"{part}.{p}" for part, projs in (("self_attn", attn_proj), ("mlp", mlp_proj)) for p in projs
            if isinstance(getattr(getattr(block, part), p), (LoRALinear, DoRALinear))}
    allowed = {f"{m}.{t}" for m in lora for t in ("lora_a", "lora_b", "m")}
    extra = [k for k, _ in tree_flatten(block.trainable_parameters()) if k not in allowed]
    if extra:
        return f"trainable tensors other than LoRA A/B: {', '.join(extra[:3])}"
    return None


class _Proj:
    """One projection's forward, remembering what its backward needs: its input, the dropout mask, optionally h.
    A DoRA projection gets DoRA's context instead (mesp_dora.DoRAProj, the same interface)."""

    def __new__(cls, layer: nn.Module, *args, **kwargs):
        return DoRAProj(layer, *args, **kwargs) if isinstance(layer, DoRALinear) else super().__new__(cls)

    def __init__(self, layer: nn.Module, x: mx.array, store_h: bool, output: bool = True):
        self.layer, self.x = layer, x
        self.mask = self.h = self.y = None
        h = None
        if isinstance(layer, LoRALinear):
            if dropout_active(layer):
                # the same Bernoulli draw as LoRALinear's dropout(x) (same key, same shape): x * mask == dropout(x)
                self.mask = layer.dropout(mx.ones_like(x))
            h = self.lora_h()
            self.h = h if store_h else None
        if output:
            frozen = layer.linear if isinstance(layer, LoRALinear) else layer
            self.y = lean_matmul(x, frozen, True, finish=lambda y, a, b: self.finish(y, a, b, h))

    def lora_h(self) -> mx.array:
        """h = dropout(x) A (the LoRA branch's rank-r intermediate)."""
        x = self.x if self.mask is None else self.x * self.mask
        return x @ self.layer.lora_a

    def finish(self, y: mx.array, a: int, b: int, h: mx.array | None) -> mx.array:
        """Output columns [a, b) from the frozen product's: + bias, + the LoRA branch s (h B[:, a:b]). The forward
        adds them slice by slice of lean_matmul, so a recompute of one slice (mlp_slices.py) has the same bits."""
        layer = self.layer
        frozen = layer.linear if isinstance(layer, LoRALinear) else layer
        if "bias" in frozen:
            y = y + frozen["bias"][a:b]
        if h is not None:
            y = y + (layer.scale * (h @ layer.lora_b[:, a:b])).astype(y.dtype)
        return y

    @classmethod
    def deferred(cls, layer: nn.Module, shape: tuple, dtype) -> "_Proj":
        """A projection whose input is not computed here (the sliced MLP's down: its input a never exists whole):
        only its dropout mask, drawn as the forward draws it (mask = dropout(ones_like(a)))."""
        p = object.__new__(cls)
        p.layer, p.x, p.h, p.y = layer, None, None, None
        p.mask = layer.dropout(mx.ones(shape, dtype)) if isinstance(layer, LoRALinear) and dropout_active(layer) \
            else None
        return p

    def backward(self, g: mx.array, grads: dict, name: str) -> mx.array:
        layer = self.layer
        if not isinstance(layer, LoRALinear):
            return frozen_input_grad(layer, g, lean=True)
        return lora_linear_backward(layer, self.x, self.mask, self.h, g, grads, name)


@dataclass
class _Context:
    """What a block's backward reads from its forward: the projections (inputs, dropout masks, h), q/k/v after rope,
    the attention probabilities (when kept), the residual stream h between attention and MLP, the gate and up."""
    spec: object
    projs: tuple
    q_lin: mx.array | None
    k_lin: mx.array | None
    q: mx.array
    k: mx.array
    v: mx.array
    probs: list | None
    op: object
    h: mx.array
    mlp_projs: tuple
    gate: mx.array
    up: mx.array
    act_state: mx.array | None  # what the gating's backward reuses (GELU-tanh's tanh), see vjp.gated_forward
    dp: object
    out: mx.array | None

    def nbytes(self) -> int:
        """Bytes of the arrays held (each once: q, k and v's projections share their input)."""
        arrays = [self.q_lin, self.k_lin, self.q, self.k, self.v, self.h, self.gate, self.up, self.act_state,
                  *(self.probs or [])]
        for p in (*self.projs, self.op, *self.mlp_projs, self.dp):
            arrays += [getattr(p, name, None) for name in ("x", "y", "h", "mask", "u", "norm")]
        unique = {id(a): a for a in arrays if isinstance(a, mx.array)}
        return sum(a.nbytes for a in unique.values())

    def parts(self) -> tuple:
        return (self.spec, self.projs, self.q_lin, self.k_lin, self.q, self.k, self.v, self.probs, self.op, self.h,
                self.mlp_projs, self.gate, self.up, self.act_state, self.dp)


def _compact(ctx: "_Context") -> "_Context":
    """A context to keep until the block's backward, without the three projection inputs that are cheap to recompute
    from what it keeps (the pre-attention and pre-MLP norms' outputs, the gated activation a): about a third less
    memory per kept block (SmolLM2, batch 4, seq 256: 30.6 -> 20.2 MB by `mesp-mlx plan`) for two norms and one
    gating in the backward (which gives the gating's state back with a; a forward keeps no state)."""
    for p in (*ctx.projs, *ctx.mlp_projs, ctx.dp):
        p.x = None
    return ctx


class MeSP(Method):
    name = "mesp"

    def __init__(self, store_h: bool = False, verify: bool = True, hand_rules: bool = True,
                 keep_attention: bool = False):
        self.keep_attention = keep_attention  # kept blocks also keep their attention probabilities
        self._kept: dict = {}  # (id(block), lane) -> _Context of this step's forward, for blocks the plan keeps
        self.store_h = store_h  # keep h = xA from the recompute instead of recomputing it (the paper's Table 5)
        self.hand_rules = hand_rules  # False: every block gets the generic rule (autodiff, MeSP's LoRA VJP inside)
        self.verify = verify  # check the rule's forward against the module once per block class
        self._verified: dict = {}
        self._fallback = MeBP()
        self._warned: set = set()
        # with mmap'd checkpoints: each block's post-MLP norm input r2, kept beside them (engine/checkpoints.MmapSide),
        # so that a block with that norm (Gemma 3) takes the sliced MLP backward too (it needs g_r2 = norm'(r2) first)
        self._side = None

    def set_side_storage(self, kind: str, directory: str | None = None) -> None:

        if self._side is not None:
            self._side.close()
        self._side = MmapSide(directory) if kind == "mmap" else None

    def _use_hand_rule(self, block, h_in, mask) -> bool:
        cls = type(block)
        reason = unsupported_reason(block) if self.hand_rules else "hand rules switched off"
        if reason is None and self.verify and cls not in self._verified:
            self._verified[cls] = self._check_forward(block, h_in, mask)
        reason = reason or self._verified.get(cls)
        name = f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"
        if reason is not None and reason not in self._warned:  # said once per block class (and reason)
            self._warned.add(reason)
            warnings.warn(f"MeSP: {name} blocks get the generic rule ({reason}): using MeBP's autodiff rule with "
                          "MeSP's LoRA VJP inside (same gradients, more memory)", stacklevel=3)
        elif reason is None and cls not in self._warned:
            self._warned.add(cls)
            print(f"[mesp-mlx] MeSP: {name} blocks get the hand-written rule", file=sys.stderr)
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
            ours = self._forward(block, x, small_mask).out
            set_compute_path(block, "fused")
            ref = block(x, small_mask)
            err = (mx.abs(ours - ref).max() / (mx.abs(ref).max() + 1e-30)).item()
        finally:
            for m in dequant:
                m.__class__ = DequantLinear
            block.train(was_training)
        tol = 1e-4 if ref.dtype == mx.float32 else 3e-2  # a structural difference is O(1); rounding is not
        return None if err <= tol else f"its forward differs from the hand rule's by {err:.1e}"

    # --- forward (and its recompute) -------------------------------------------------------------------------------
    def _forward(self, block, x, mask, output: bool = True, keep_probs: bool = False,
                 sliced_mlp: bool = False, mid: tuple | None = None) -> "_Context":
        """The block's forward from its input x, keeping each projection's context. With output=False (the backward's
        recompute) the last projection is computed only when a post-MLP norm needs its output. keep_probs: the
        attention probabilities are kept too (the backward then does not recompute them). sliced_mlp (a recompute
        for mlp_slices.py): the MLP stops at its input n2 and its dropout draws; the sliced backward recomputes the
        rest slice by slice. mid: the forward's attention output o and residual h (from the side store), used instead
        of recomputing the attention (its backward then computes the probabilities itself)."""
        spec = block_spec(block)
        attn, mlp = block.self_attn, block.mlp
        B, L, _ = x.shape
        H, Hkv = attn.n_heads, attn.n_kv_heads
        n1 = self._norm(block, spec.pre_attn_norm, x)
        if spec.fused_qkv:
            qkv = _Proj(attn.qkv_proj, n1, self.store_h)
            dq_, dk_ = H * attn.head_dim, Hkv * attn.head_dim
            q_lin, k_lin, v_lin = mx.split(qkv.y, [dq_, dq_ + dk_], axis=-1)
            projs = (qkv,)
        else:
            projs = tuple(_Proj(getattr(attn, p), n1, self.store_h) for p in ("q_proj", "k_proj", "v_proj"))
            q_lin, k_lin, v_lin = (p.y for p in projs)
        if spec.qk_norm == "full":
            q, k = attn.q_norm(q_lin), attn.k_norm(k_lin)
            q, k = q.reshape(B, L, H, -1), k.reshape(B, L, Hkv, -1)
        else:
            q, k = q_lin.reshape(B, L, H, -1), k_lin.reshape(B, L, Hkv, -1)
            if spec.qk_norm == "head":
                q, k = attn.q_norm(q), attn.k_norm(k)
        q = attn.rope(q.transpose(0, 2, 1, 3))
        k = attn.rope(k.transpose(0, 2, 1, 3))
        v = v_lin.reshape(B, L, Hkv, -1).transpose(0, 2, 1, 3)
        if mid is None:
            o = attention_forward(q, k, v, attn.scale, mask, keep_probs=keep_probs)
            o, probs = o if keep_probs else (o, None)
            o = o.transpose(0, 2, 1, 3).reshape(B, L, -1)
            op = _Proj(attn.o_proj, o, self.store_h)
            h = x + self._residual(spec, self._norm(block, spec.post_attn_norm, op.y))
        else:  # the same dropout draw for o_proj; its output only where a post-attention norm's backward needs it
            (o, h), probs = mid, None
            op = _Proj(attn.o_proj, o, self.store_h, output=spec.post_attn_norm is not None)
        n2 = self._norm(block, spec.pre_mlp_norm, h)
        if sliced_mlp:
            mlp_projs = (_Proj(mlp.gate_proj, n2, self.store_h, output=False),
                         _Proj(mlp.up_proj, n2, self.store_h, output=False))
            gate_w = (mlp.gate_proj.linear if isinstance(mlp.gate_proj, LoRALinear) else mlp.gate_proj)["weight"]
            ffn = gate_w.shape[0]
            dp = _Proj.deferred(mlp.down_proj, (*n2.shape[:-1], ffn), n2.dtype)  # its dropout draw, in order
            for p in mlp_projs:
                p.y = None
            if not spec.qk_norm:
                q_lin = k_lin = None
            if spec.post_attn_norm is None:
                op.y = None
            return _Context(spec, projs, q_lin, k_lin, q, k, v, probs, op, h, mlp_projs, None, None, None, dp, None)
        if spec.fused_gate_up:
            gu = _Proj(mlp.gate_up_proj, n2, self.store_h)
            gate, up = mx.split(gu.y, 2, axis=-1)
            mlp_projs = (gu,)
        else:
            mlp_projs = (_Proj(mlp.gate_proj, n2, self.store_h), _Proj(mlp.up_proj, n2, self.store_h))
            gate, up = (p.y for p in mlp_projs)
        a, act_state = gated_forward(spec.activation, gate, up)
        if output:
            act_state = None  # only the backward's recompute keeps it (a kept context gets it back from _rehydrate)
        dp = _Proj(mlp.down_proj, a, self.store_h, output or spec.post_mlp_norm is not None)
        out = None
        if output:
            out = h + self._residual(spec, self._norm(block, spec.post_mlp_norm, dp.y))
        # what the backward reads; outputs it does not need are dropped (q_lin, k_lin only feed q/k norms)
        for p in (*projs, *mlp_projs):
            p.y = None
        if spec.post_attn_norm is None:
            op.y = None
        if spec.post_mlp_norm is None:
            dp.y = None
        if not spec.qk_norm:
            q_lin = k_lin = None
        return _Context(spec, projs, q_lin, k_lin, q, k, v, probs, op, h, mlp_projs, gate, up, act_state, dp, out)

    @staticmethod
    def _norm(block, name, t):
        return t if name is None else getattr(block, name)(t)

    @staticmethod
    def _residual(spec, r):
        return r if spec.residual_multiplier == 1.0 else r * spec.residual_multiplier

    def _norm_backward(self, block, spec, name, x, g):
        return g if name is None else rms_norm_backward(getattr(block, name), x, g, spec.norm_offset)

    def prepare(self, block, h, mask) -> None:
        self._use_hand_rule(block, h, mask)

    def block_forward(self, block, h, mask, keep: bool = False, lane: int = 0):
        """The engine's forward through a block: the rule's own staged forward (lean matmuls, chunked attention).
        keep: hold the block's context (and, with keep_attention, its attention probabilities) for its backward
        in this step, which then skips the recompute: the same tensors, so the same gradients bit for bit."""
        if not self._use_hand_rule(block, h, mask):
            return block(h, mask)
        ctx = self._forward(block, h, mask, keep_probs=keep and self.keep_attention)
        out, ctx.out = ctx.out, None
        spec = ctx.spec
        if keep:  # the kept context holds all the backward reads
            self._kept[(id(block), lane)] = _compact(ctx)
        elif self._side is not None:  # what the backward's recompute then reads instead of recomputing the attention
            self._side.put((id(block), lane, "o"), ctx.op.x)
            self._side.put((id(block), lane, "h"), ctx.h)
            if spec.post_mlp_norm is not None and self._sliced_mlp(block, spec):
                self._side.put((id(block), lane), ctx.dp.y)
        return out

    def release_kept(self) -> None:
        self._kept.clear()
        if self._side is not None:
            self._side.invalidate()

    def _rehydrate(self, block, ctx: "_Context", x: mx.array, need_a: bool = True) -> None:
        """Give a compact kept context back the projections' inputs it dropped, recomputed by the forward's own calls
        on the same tensors (so the same bits): n1 = pre_attn(x), n2 = pre_mlp(h), a = act(gate) * up (and the
        gating's state) unless the sliced MLP backward, which recomputes a slice by slice, takes the block."""
        spec = ctx.spec
        n1 = self._norm(block, spec.pre_attn_norm, x)
        n2 = self._norm(block, spec.pre_mlp_norm, ctx.h)
        for p in ctx.projs:
            p.x = n1
        for p in ctx.mlp_projs:
            p.x = n2
        if need_a:
            ctx.dp.x, ctx.act_state = gated_forward(spec.activation, ctx.gate, ctx.up)

    # --- the rule ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _sliced_mlp(block, spec) -> bool:
        """Whether the MLP's backward can run slice by slice of the ffn axis (mlp_slices.py): separate gate and up,
        LoRA or frozen projections on the dequantizing or dense path. Under a norm after the MLP it also needs that
        norm's input from the side store (its backward needs the whole output first), see block_backward."""
        return not spec.fused_gate_up and sliced_mlp_supported(block.mlp, ("gate_proj", "up_proj", "down_proj"))

    @staticmethod
    def _mlp_backward(spec, dp, g_r, gate, up, act_state, mlp_projs, grads) -> mx.array:
        """dL/dn2 from the whole tensors: down's input gradient, the gating's backward, gate's and up's."""
        g_a = dp.backward(g_r, grads, "mlp.down_proj")
        mx.eval(g_a, grads)
        g_gate, g_up = gated_backward(spec.activation, gate, up, g_a, act_state)
        del g_a
        if spec.fused_gate_up:
            return mlp_projs[0].backward(mx.concatenate([g_gate, g_up], axis=-1), grads, "mlp.gate_up_proj")
        g_n2 = mlp_projs[0].backward(g_gate, grads, "mlp.gate_proj")
        mx.eval(g_n2, grads)
        return g_n2 + mlp_projs[1].backward(g_up, grads, "mlp.up_proj")

    def block_backward(self, block, h_in, g_out, mask, lane: int = 0):
        if not self._use_hand_rule(block, h_in, mask):
            return self._fallback.block_backward(block, h_in, g_out, mask)
        attn = block.self_attn
        x = h_in
        B, L, _ = x.shape
        H, Hkv = attn.n_heads, attn.n_kv_heads
        grads: dict = {}

        # the forward's context if the plan kept it, else recomputed up to the MLP (the down projection's output only
        # under a post-MLP norm)
        spec = block_spec(block)
        sliced = self._sliced_mlp(block, spec)
        ctx = self._kept.pop((id(block), lane), None)
        r2 = None  # a post-MLP norm's input (the sliced rule needs it before any slice): only with mmap'd checkpoints,
        # whatever the plan keeps, so that every plan takes the same rule
        if sliced and spec.post_mlp_norm is not None:
            if self._side is not None:
                r2 = ctx.dp.y if ctx is not None else self._side.get((id(block), lane))
            sliced = r2 is not None
        if ctx is not None:
            self._rehydrate(block, ctx, x, need_a=not sliced)
        else:
            # with mmap'd checkpoints the forward's attention output and residual come from beside them, so the
            # attention is not recomputed (its backward computes the probabilities once); otherwise the recompute's
            # probabilities are kept for the attention's backward (instead of computed a third time) when they are no
            # bigger than one lean weight slice. The same values every way.
            side = self._side
            mid = None if side is None else (side.get((id(block), lane, "o")), side.get((id(block), lane, "h")))
            mid = None if mid is None or any(t is None for t in mid) else mid
            probs_bytes = B * H * L * L * x.dtype.size
            ctx = self._forward(block, x, mask, output=False, sliced_mlp=sliced, mid=mid,
                                keep_probs=mid is None and probs_bytes <= mesp_lora.LEAN_CHUNK)
            kept = [ctx.q, ctx.k, ctx.v, ctx.op.x, ctx.op.y, ctx.h, ctx.gate, ctx.up, ctx.act_state, ctx.dp.x, ctx.dp.y,
                    ctx.dp.mask, ctx.mlp_projs[0].x, *(p.mask for p in ctx.mlp_projs)]
            mx.eval(*(t for t in kept if t is not None),
                    *(p.h for p in (*ctx.projs, ctx.op, *ctx.mlp_projs, ctx.dp) if p.h is not None))
        spec, projs, q_lin, k_lin, q, k, v, probs, op, h, mlp_projs, gate, up, act_state, dp = ctx.parts()
        del ctx

        # MLP: out = h + m post_mlp(down(a))
        g_r = self._residual(spec, g_out)
        if sliced:  # the recompute and the input gradient in one pass over ffn slices (mlp_slices.py)
            if spec.post_mlp_norm is not None:
                g_r = self._norm_backward(block, spec, spec.post_mlp_norm, r2, g_r)
                del r2
            g_n2 = sliced_mlp_backward(block.mlp, ("gate_proj", "up_proj", "down_proj"), spec.activation,
                                       mlp_projs[0].x, g_r, mlp_projs, dp.mask, grads,
                                       None if gate is None else (gate, up))
        else:
            if spec.post_mlp_norm is not None:
                g_r = self._norm_backward(block, spec, spec.post_mlp_norm, dp.y, g_r)
            g_n2 = self._mlp_backward(spec, dp, g_r, gate, up, act_state, mlp_projs, grads)
        del dp, g_r, gate, up, act_state, mlp_projs
        g_h = g_out + self._norm_backward(block, spec, spec.pre_mlp_norm, h, g_n2)
        mx.eval(g_h, grads)
        del g_n2, h

        # attention: h = x + m post_attn(o_proj(o))
        g_r = self._residual(spec, g_h)
        if spec.post_attn_norm is not None:
            g_r = self._norm_backward(block, spec, spec.post_attn_norm, op.y, g_r)
        g_o = op.backward(g_r, grads, "self_attn.o_proj")
        mx.eval(g_o, grads)
        del op, g_r
        g_o = g_o.reshape(B, L, H, -1).transpose(0, 2, 1, 3)
        dq, dk, dv = attention_backward(q, k, v, g_o, attn.scale, mask, probs=probs)
        del g_o, q, k, v, probs
        dq = rope_backward(attn.rope, dq).transpose(0, 2, 1, 3)  # [B, L, H, D]
        dk = rope_backward(attn.rope, dk).transpose(0, 2, 1, 3)
        if spec.qk_norm == "head":
            dq = rms_norm_backward(attn.q_norm, q_lin.reshape(B, L, H, -1), dq, spec.norm_offset)
            dk = rms_norm_backward(attn.k_norm, k_lin.reshape(B, L, Hkv, -1), dk, spec.norm_offset)
        dq, dk, dv = dq.reshape(B, L, -1), dk.reshape(B, L, -1), dv.transpose(0, 2, 1, 3).reshape(B, L, -1)
        if spec.qk_norm == "full":
            dq = rms_norm_backward(attn.q_norm, q_lin, dq, spec.norm_offset)
            dk = rms_norm_backward(attn.k_norm, k_lin, dk, spec.norm_offset)
        if spec.fused_qkv:
            g_n1 = projs[0].backward(mx.concatenate([dq, dk, dv], axis=-1), grads, "self_attn.qkv_proj")
        else:
            g_n1 = projs[0].backward(dq, grads, "self_attn.q_proj")
            mx.eval(g_n1, grads)
            g_n1 = g_n1 + projs[1].backward(dk, grads, "self_attn.k_proj")
            mx.eval(g_n1, grads)
            g_n1 = g_n1 + projs[2].backward(dv, grads, "self_attn.v_proj")
        del dq, dk, dv, projs
        g_x = g_h + self._norm_backward(block, spec, spec.pre_attn_norm, x, g_n1)
        return g_x, tree_unflatten(list(grads.items()))


def to_mesp_lora(model: nn.Module) -> int:
    """Switch every mlx-lm LoRALinear (and DoRALinear) in `model` to MeSP's backward in place (same parameters).
    Returns the count."""
    count = 0

    def visit(_, module):
        nonlocal count
        if type(module) is LoRALinear:
            module.__class__ = MeSPLoRALinear
            count += 1
        elif type(module) is DoRALinear:
            module.__class__ = MeSPDoRALinear
            count += 1

    model.apply_to_modules(visit)
    return count
