"""The support-table sweep: every module of `mlx_lm.models`, classified as hand rule / generic / refused (with reason).

For each module: refusals that the source shows (state across positions, mixture-of-experts, multimodal wrappers)
come first; otherwise a tiny random fp32 model is built (the family's own tiny config when described, else a generic
one), and the engine's walk (embed -> blocks(h, mask) -> final norm -> head, by the family's description) must give
mlx-lm's logits, and the engine's loss and LoRA gradients under MeBP's rule and MeSP's (hand or generic) must equal
whole-model autodiff at rel <= 1e-5. Only then is the family supported. tools/family_table.py writes the result to
support.json (read at run time) and docs/model_families.md.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
import time
import warnings

import mlx.core as mx
import mlx.nn as nn
import mlx_lm.models as pkg
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from ..adapters.lora import apply_lora
from ..engine import Batch, BlockEngine
from ..methods import MeBP, MeSP
from ..methods.mesp import to_mesp_lora
from ..models.families import HAND, WALKS, BlockSpec, Family, default_lora_keys
from ..models.families.tiny import tiny_config
from ..models.parts import ModelParts

TOL = 1e-5
SEQ = 12  # longer than the generic tiny config's sliding window (4): a window mask the walk missed shows up
NOT_MODELS = {"base", "cache", "activations", "rope_utils", "switch_layers", "pipeline", "bitlinear_layers",
              "gated_delta", "ssm", "mla", "afm7"}
GENERIC_CONFIG = dict(
    hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, vocab_size=384, rms_norm_eps=1e-6, layer_norm_eps=1e-5, norm_eps=1e-5, layer_norm_epsilon=1e-5,
    rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
    sliding_window=4, partial_rotary_factor=1.0, rope_traditional=False, hidden_act="silu", num_layers=2,
    # multipliers are never 1 here: a model-level scale the default walk does not know must show up as a mismatch
    logits_scaling=2.0, attention_multiplier=0.25, embedding_multiplier=2.0, residual_multiplier=0.5, bias=False,
    use_qk_norm=False, moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2, n_shared_experts=1,
    post_norm=False, qk_norm=False, use_bias=False, use_qkv_bias=False, rope_scaling=None, rotary_emb_base=10000.0,
    rotary_pct=1.0, use_parallel_residual=False, dim_model_base=32, scale_emb=2.0, scale_depth=1.4,
    sliding_window_pattern=2, layer_types=["sliding_attention", "full_attention"],
)


def model_modules() -> list[str]:

    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name not in NOT_MODELS)


def _source_refusal(name: str, module) -> str | None:
    src = inspect.getsource(module)
    if any(s in src for s in ("MambaCache", "ArraysCache", "ssm_update", "gated_delta", "recurrent")):
        return "state across positions (recurrent / state-space / linear attention): h_{i+1} = block(h_i) is not " \
               "the whole story"
    if any(s in src for s in ("SwitchGLU", "SwitchLinear", "SwitchMLP")):
        return "mixture-of-experts blocks (SwitchLinear): not handled by the engine's LoRA / streaming"
    if "vision" in src.lower() and name not in HAND:
        return "multimodal wrapper (vision tower); not described (its text model may be)"
    if "softcap" in src.lower():
        return "logit soft-capping (tanh): the chunked loss / hand rule have no soft cap"
    return None


def _build(name: str):
    module = importlib.import_module(f"mlx_lm.models.{name}")
    config = tiny_config(name) if name in HAND else {**GENERIC_CONFIG, "model_type": name}
    args = module.ModelArgs.from_dict(config)
    model = module.Model(args)  # parameters are lazy until evaluated: the size is checked first
    size = sum(v.size for _, v in tree_flatten(model.parameters()))
    if size > 5_000_000:
        raise ValueError(f"the tiny config is not honoured ({size / 1e6:.0f} M parameters)")
    family = HAND.get(name)
    text = family.text_model(model) if family else model
    if "lm_head" in text and getattr(text, "tie_word_embeddings", None) is False and \
            config.get("tie_word_embeddings", "text_config" not in config and name.startswith("gemma3")) is True:
        text.pop("lm_head")  # what mlx-lm's sanitize does for a checkpoint without lm_head (Gemma 3)
        text.tie_word_embeddings = True
    mx.random.seed(0)
    # norm scales near 1, everything else small (LoRA-like magnitudes keep fp32 rounding far below the tolerance)
    model.update(tree_map_with_path(lambda k, x: 0.05 * mx.random.normal(x.shape) +
                                    (1.0 if x.ndim == 1 and k.endswith("weight") else 0.0), model.parameters()))
    mx.eval(model.parameters())
    return model


def check_family(name: str, model=None) -> tuple[str, str]:
    """(tier, reason) of one mlx-lm module, by the checks in the module docstring."""

    if model is None:
        try:
            module = importlib.import_module(f"mlx_lm.models.{name}")
        except (Exception, SystemExit) as e:  # noqa: BLE001  (a module that cannot import here; olmo exits)
            return "refused", f"mlx-lm's module does not import here ({type(e).__name__})"
        if name not in HAND and (reason := _source_refusal(name, module)):
            return "refused", reason
        try:
            model = _build(name)
        except Exception as e:  # noqa: BLE001
            return "refused", f"no tiny model could be built for the sweep ({type(e).__name__}: {str(e)[:80]})"
    family = HAND.get(name) or WALKS.get(name) or Family(name, (name,), hand_rule=False, lora_keys=())
    text = family.text_model(model)
    if family.missing(text):
        return "refused", "another layout: no model.{embed_tokens, layers, norm} to walk"
    try:
        layer_params = inspect.signature(type(family.trunk(text).layers[0]).__call__).parameters
        if list(layer_params)[1:3] != ["x", "mask"] and len(layer_params) < 3:
            return "refused", "blocks are not called on (h, mask)"
        vocab = family.embedding(text).weight.shape[0]
        mx.random.seed(1)
        tokens = mx.random.randint(0, vocab, (1, SEQ + 1))
        batch = Batch.from_mlx_lm(tokens, mx.array([[0, SEQ + 1]]))
        parts = ModelParts(model, "dequant", None, family)
        h = parts.embed(batch.inputs)
        for layer in parts.layers:
            h = layer(h, parts.block_mask(layer, h))
        walked = parts.final_norm(h) @ parts.head.weight.T if not isinstance(parts.head, nn.Embedding) \
            else parts.head.as_linear(parts.final_norm(h))
        ref = model(batch.inputs)
        err = (mx.abs(walked - ref).max() / (mx.abs(ref).max() + 1e-30)).item()
        if not err <= TOL:
            return "refused", f"its forward is not embed -> blocks(h, mask) -> norm -> head as described (walk " \
                              f"differs by {err:.1e})"
        params = {"rank": 4, "scale": 20.0, "dropout": 0.0, "keys": default_lora_keys(family, model.layers[0])}
        apply_lora(model, -1, params)
        model.update(tree_map(lambda x: 0.05 * mx.random.normal(x.shape), model.trainable_parameters()))

        def loss_fn(m, b):
            logits = m(b.inputs).astype(mx.float32)
            return (nn.losses.cross_entropy(logits, b.targets) * b.mask).sum() / b.mask.sum()

        loss_ref, ref_grads = nn.value_and_grad(model, loss_fn)(model, batch)
        ref_grads = dict(tree_flatten(ref_grads))
        prefix = family.weight_prefix + family.layers_path
        for method in (MeBP(), MeSP()):
            if isinstance(method, MeSP):
                to_mesp_lora(model)
            stats, grads = BlockEngine(ModelParts(model, "dequant", None, family), method, None).step(
                batch, apply_update=False)
            if not abs(stats.loss - loss_ref.item()) <= TOL * abs(loss_ref.item()):
                return "refused", f"the engine's loss differs from mlx-lm's under {method.name}"
            for i, g in grads.items():
                for k, v in tree_flatten(g):
                    r = ref_grads[f"{prefix}.{i}.{k}"]
                    if not (mx.abs(v - r).max() <= TOL * (mx.abs(r).max() + 1e-30)).item():
                        err = (mx.abs(v - r).max() / (mx.abs(r).max() + 1e-30)).item()
                        return "refused", f"a LoRA gradient differs from mlx-lm's autodiff under {method.name} ({k}: {err:.1e})"
    except Exception as e:  # noqa: BLE001
        return "refused", f"the engine cannot walk it ({type(e).__name__}: {str(e)[:80]})"
    if name in HAND:
        return ("hand" if family.hand_rule else "generic"), family.notes
    if name in WALKS:
        return "generic", family.notes
    spec_note = "MeBP's autodiff rule; under --method mesp the same with MeSP's LoRA VJP inside"
    return "generic", spec_note


def sweep(names: list[str] | None = None, verbose: bool = False) -> dict:

    table = {}
    for name in names or model_modules():
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t, reason = check_family(name)
        table[name] = {"tier": t, "reason": reason}
        if verbose:
            print(f"{name}: {t} ({time.perf_counter() - start:.1f} s) {reason}", file=sys.stderr, flush=True)
    return table


__all__ = ["BlockSpec", "check_family", "model_modules", "sweep"]
