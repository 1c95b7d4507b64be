"""mlx-lm families the engine supports, as small descriptions (base.py), and the checked support table.

Three tiers per mlx-lm `model_type` (docs/model_families.md; tools/family_table.py regenerates it):
    hand rule : a description here with a BlockSpec — MeSP's hand-written block rule (methods/mesp.py)
    generic   : the engine walks it block by block (the default, Llama-like, description reproduces mlx-lm's forward
                exactly, checked by the sweep); MeBP's autodiff rule, with MeSP's LoRA VJP inside under --method mesp
    refused   : with the reason (state across positions, mixture-of-experts, another layout, ...), before anything
                is written
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import mlx.nn as nn
from mlx_lm.utils import MODEL_REMAPPING

from .base import LLAMA_LORA_KEYS, BlockSpec, Family
from .gemma import GEMMA
from .gemma3 import GEMMA3, GEMMA3_TEXT
from .granite import GRANITE
from .llama import LLAMA, QWEN2, QWEN3, SMOLLM3
from .olmo2 import OLMO2
from .phi3 import PHI3
from .walks import WALKS

# described families (a description is not always a hand rule: Gemma 1 is generic with an embedding scale); WALKS
# (walks.py): generic-tier families whose model-level walk needs a description (scales, windows, other names)
HAND = {t: f for f in (LLAMA, QWEN2, QWEN3, SMOLLM3, GEMMA3_TEXT, GEMMA3, PHI3, OLMO2, GRANITE, GEMMA)
        for t in f.model_types}
# the mlx-lm module that defines a block class -> the description of its blocks (smollm3 and mistral use llama's
# blocks; gemma3 folders use gemma3_text's)
BY_BLOCK_MODULE = {"llama": LLAMA, "qwen2": QWEN2, "qwen3": QWEN3, "gemma3_text": GEMMA3_TEXT, "phi3": PHI3,
                   "olmo2": OLMO2, "granite": GRANITE}
TABLE_FILE = Path(__file__).with_name("support.json")


class UnsupportedFamily(ValueError):
    pass


@lru_cache(maxsize=1)
def support_table() -> dict:
    """{model_type: {"tier": hand|generic|refused, "reason": str}} as the last sweep wrote it."""
    if not TABLE_FILE.is_file():
        return {}
    with open(TABLE_FILE) as f:
        return json.load(f)


def _module_name(model_type: str) -> str:
    """mlx-lm's module for a model_type (mistral -> llama, ...)."""

    return MODEL_REMAPPING.get(model_type, model_type)


def tier(model_type: str) -> tuple[str, str]:
    """(tier, reason) of an mlx-lm model_type."""
    if model_type not in HAND and model_type not in support_table():
        model_type = _module_name(model_type)
    if model_type in HAND:
        return ("hand" if HAND[model_type].hand_rule else "generic"), HAND[model_type].notes
    row = support_table().get(model_type)
    if row is None:
        return "refused", "not in the support table (docs/model_families.md); no description and not swept"
    return row["tier"], row.get("reason", "")


def supported_types() -> list[str]:
    return sorted(set(HAND) | {t for t, r in support_table().items() if r["tier"] == "generic"})


def family_for(model_type: str) -> Family:
    """The description of a supported model_type; UnsupportedFamily (with the reason) otherwise."""
    if model_type not in HAND and model_type not in support_table():
        model_type = _module_name(model_type)
    if model_type in HAND:
        return HAND[model_type]
    t, reason = tier(model_type)
    if t != "generic":
        raise UnsupportedFamily(f"architecture {model_type!r} is not supported: {reason}")
    if model_type in WALKS:
        return WALKS[model_type]
    return Family(model_type, (model_type,), hand_rule=False, lora_keys=(), notes="generic tier")


def describe(model: nn.Module) -> Family:
    """The description of a loaded mlx-lm model, by the mlx-lm module that defines it (mistral loads as llama)."""
    return family_for(type(model).__module__.rsplit(".", 1)[-1])


def default_lora_keys(family: Family, block: nn.Module) -> list[str]:
    """The family's LoRA keys; for the generic tier mlx-lm's own default, every linear of the block."""
    if family.lora_keys:
        return list(family.lora_keys)
    return sorted(n for n, m in block.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear)))


def block_spec(block: nn.Module) -> BlockSpec | None:
    """The hand rule's description of an mlx-lm block (None: no hand rule for its class)."""
    cls = type(block)
    module = cls.__module__
    if not module.startswith("mlx_lm.models.") or cls.__name__ != "TransformerBlock":
        return None
    family = BY_BLOCK_MODULE.get(module.rsplit(".", 1)[-1])
    return None if family is None else family.block_spec(block)


def family_lora_parameters(model: nn.Module, lora_parameters: dict | None) -> dict:
    """lora_parameters with the family's default keys when none are given (Phi-3's fused linears, ...)."""
    params = dict(lora_parameters or {})
    if not params.get("keys"):
        params["keys"] = default_lora_keys(describe(model), model.layers[0])
    return params


__all__ = ["BlockSpec", "block_spec", "Family", "HAND", "LLAMA_LORA_KEYS", "UnsupportedFamily", "default_lora_keys", "describe",
           "family_for", "family_lora_parameters", "support_table", "supported_types", "tier", "WALKS"]
