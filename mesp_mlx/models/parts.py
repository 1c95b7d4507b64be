"""The pieces of an mlx-lm decoder the block-wise engine needs: embedding, blocks, final norm, LM head.

What differs between families (embedding scale, per-layer masks, logits divisor, where the text model sits) comes from
the family's description (families/); the walk embed -> blocks -> final norm -> head is the same for all. The head is
exposed by vocabulary row ranges so the loss never needs the whole [vocab, d] matrix in full precision at once. With a
weight streamer, the embedding and head rows come through its memory maps instead of the (then never evaluated) module
arrays.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.base import create_attention_mask

from .compute import dequantize
from .families import UnsupportedFamily as UnsupportedModel  # noqa: E402  (one error type for every refusal)
from .families import describe
from .families.base import cache_optional


class ModelParts:
    def __init__(self, model: nn.Module, compute_path: str = "dequant", streamer=None, family=None):

        self.family = family or describe(model)  # an explicit description: the support-table sweep
        text = self.family.text_model(model)
        if missing := self.family.missing(text):
            raise UnsupportedModel(f"{type(model).__module__}: no {', '.join(missing)} (unsupported family)")
        self.model = model
        self.text = text
        self.inner = inner = self.family.trunk(text)  # embed_tokens / layers / norm, whatever the family names them
        self.compute_path = compute_path
        self.model_type = self.family.name
        self.embedding = inner.embed_tokens
        self.head = self.family.head(text)
        for block_cls in {type(layer) for layer in inner.layers}:
            cache_optional(block_cls)  # the engine calls block(h, mask)
        self._index = {id(layer): i for i, layer in enumerate(inner.layers)}
        self.windows = [self.family.window(inner.module, i, layer) for i, layer in enumerate(inner.layers)]
        self.logits_divisor = self.family.logits_divisor(text)
        self.embed_rows = streamer.embedding if streamer is not None else None
        self.head_rows = (streamer.head if streamer is not None else None)
        self.dtype = inner.norm.weight.dtype  # activations' dtype (cast_float_params casts the norms)

    @property
    def layers(self) -> list:
        return self.inner.layers

    @property
    def vocab_size(self) -> int:
        return self.head.weight.shape[0]

    def embed(self, inputs: mx.array) -> mx.array:
        if self.embed_rows is None:
            return self.family.scale_embedding(self.text, self.embedding(inputs))
        # only the distinct token rows are read from the memory map and dequantized
        ids, inverse = np.unique(np.array(inputs).reshape(-1), return_inverse=True)
        rows = self._full_precision(self.embed_rows.take(ids), self.embedding, self.dtype)
        h = rows[mx.array(inverse.astype(np.int32))].reshape(*inputs.shape, -1)
        return self.family.scale_embedding(self.text, h)

    def block_mask(self, layer, h: mx.array):
        """The attention mask mlx-lm gives this block for a full (cache-free) sequence: causal, or the family's sliding
        window for this layer (a boolean window mask once the sequence is longer than the window)."""
        window = self.windows[self._index[id(layer)]]
        if window:
            return create_attention_mask(h, None, window_size=window)
        return create_attention_mask(h, None)

    def final_norm(self, h: mx.array) -> mx.array:
        """The final norm, with the head's logits divisor folded in: (x W^T) / s = (x / s) W^T (Granite)."""
        out = self.inner.norm(h)
        return out if self.logits_divisor is None else out / self.logits_divisor

    # --- LM head by vocabulary rows -------------------------------------------------------------------------------
    def _rows(self, start: int, stop: int) -> dict:
        if self.head_rows is not None:
            return self.head_rows.rows(start, stop)
        head = self.head
        out = {"weight": head["weight"][start:stop]}
        for k in ("scales", "biases"):
            if k in head:
                out[k] = head[k][start:stop]
        return out

    def head_rows_at(self, ids: mx.array, dtype) -> mx.array:
        """The head's rows W[ids] ([n, d]) in full precision (the targets' rows of the loss gradient)."""
        np_ids = np.array(ids)
        if self.head_rows is not None:
            rows = self.head_rows.take(np_ids)
        else:
            rows = {k: self.head[k][ids] for k in ("weight", "scales", "biases") if k in self.head}
        return self._full_precision(rows, self.head, dtype)

    def head_chunk(self, start: int, stop: int, dtype) -> tuple[tuple, tuple | None]:
        """Vocabulary rows start:stop of the head as frozen_matmul operands (base, quant): read once, and on the
        dequant path dequantized once, so the loss's logits (x W^T) and its gradient (g W) share them."""
        rows = self._rows(start, stop)
        if "scales" not in rows:
            return (rows["weight"].astype(dtype),), None
        if self.compute_path == "fused":
            head = self.head
            return ((rows["weight"], rows["scales"], rows.get("biases")),
                    (head.group_size, head.bits, getattr(head, "mode", "affine"), True))
        return (self._full_precision(rows, self.head, dtype),), None

    @staticmethod
    def _full_precision(rows: dict, module, dtype) -> mx.array:
        if "scales" not in rows:
            return rows["weight"].astype(dtype)
        return dequantize(rows["weight"], rows["scales"], rows.get("biases"), module.group_size, module.bits,
                          getattr(module, "mode", "affine"), dtype)
