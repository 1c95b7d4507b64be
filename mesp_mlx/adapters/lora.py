"""LoRA in mlx-lm's names, shapes and files.

Layers come from mlx-lm's `linear_to_lora_layers` (so `lora_a` [in, r], `lora_b` [r, out], y = W0 x + scale (x A) B),
and adapters are written exactly as `mlx_lm.lora` writes them: `adapters.safetensors` holding the trainable parameters
and `adapter_config.json` with `fine_tune_type`, `num_layers`, `lora_parameters` (+ our run's settings), so
`mlx_lm.generate --adapter-path` and `mlx_lm.fuse` take them as they are.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten, tree_map
from mlx_lm.tuner.utils import linear_to_lora_layers

from ..io import CorruptFile, atomic_write_json, load_tensors, save_tensors
from .formats import CONFIG, folder_format

DEFAULT_KEYS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
SHORT_KEYS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
DEFAULT_LORA = {"rank": 8, "scale": 20.0, "dropout": 0.0, "keys": list(DEFAULT_KEYS)}


class LoRAConfigError(ValueError):
    pass


def normalize_keys(keys) -> list[str]:
    return [SHORT_KEYS.get(k, k) for k in keys]


def apply_lora(model: nn.Module, num_layers: int, lora_parameters: dict, dora: bool = False) -> int:
    """Freeze the base, wrap the chosen linears of the last `num_layers` blocks (-1: all) with mlx-lm's LoRALinear
    (or DoRALinear: dora=True). Returns #trainable params."""

    params = {**DEFAULT_LORA, **(lora_parameters or {})}
    params["keys"] = normalize_keys(params.get("keys") or DEFAULT_KEYS)
    n_blocks = len(model.layers)
    if num_layers == -1:
        num_layers = n_blocks
    if not 0 < num_layers <= n_blocks:
        raise LoRAConfigError(f"num_layers={num_layers}, but the model has {n_blocks} blocks (use -1 for all)")
    if int(params["rank"]) < 1:
        raise LoRAConfigError(f"LoRA rank must be >= 1 (got {params['rank']})")
    block_modules = dict(model.layers[0].named_modules())
    missing = [k for k in params["keys"] if k not in block_modules]
    if missing:
        linears = sorted(n for n, m in block_modules.items() if isinstance(m, (nn.Linear, nn.QuantizedLinear)))
        raise LoRAConfigError(f"LoRA keys {missing} are not in this model's blocks (its linears: {', '.join(linears)})")
    for k in params["keys"]:
        mod = block_modules[k]
        d_out = mod.weight.shape[0]
        d_in = mod.weight.shape[1] * (32 // mod.bits if isinstance(mod, nn.QuantizedLinear) else 1)
        if int(params["rank"]) > min(d_in, d_out):
            raise LoRAConfigError(f"LoRA rank {params['rank']} exceeds {k}'s dimensions ({d_in} -> {d_out})")
    model.freeze()
    linear_to_lora_layers(model, num_layers, params, use_dora=dora)
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def cast_lora(model: nn.Module, dtype=mx.float32) -> None:
    """LoRA parameters are trained in `dtype` (fp32 by default) whatever the base's dtype."""
    model.update(tree_map(lambda x: x.astype(dtype), model.trainable_parameters()))


def adapter_weights(model: nn.Module) -> dict:
    return dict(tree_flatten(model.trainable_parameters()))


def save_adapters(model: nn.Module, adapter_file: str | Path) -> None:
    """Write the trainable parameters atomically (mlx-lm's `adapters.safetensors` layout), their checksum in the
    file's metadata."""
    save_tensors(adapter_file, adapter_weights(model), what="the adapters")


def write_adapter_config(adapter_path: str | Path, num_layers: int, lora_parameters: dict, extra: dict | None = None,
                         fine_tune_type: str = "lora"):
    params = {**DEFAULT_LORA, **(lora_parameters or {})}
    params["keys"] = normalize_keys(params["keys"])
    config = {**(extra or {}), "fine_tune_type": fine_tune_type, "num_layers": num_layers, "lora_parameters": params}
    atomic_write_json(Path(adapter_path) / "adapter_config.json", config, what="the adapter config")


def load_adapter_weights(model: nn.Module, adapter_file: str | Path) -> None:
    """Load an adapters.safetensors into an already LoRA-wrapped model, refusing one made for another model."""
    adapter_file = Path(adapter_file)
    if adapter_file.is_dir():
        adapter_file = adapter_file / "adapters.safetensors"
    if not adapter_file.is_file():
        raise FileNotFoundError(f"adapter file not found: {adapter_file}")
    try:
        weights, _ = load_tensors(adapter_file)
    except CorruptFile as e:
        raise LoRAConfigError(str(e)) from None
    except Exception as e:
        raise LoRAConfigError(f"{adapter_file}: not a readable safetensors file ({e})") from e
    own = adapter_weights(model)
    unknown = sorted(set(weights) - set(own))
    if unknown:
        raise LoRAConfigError(f"{adapter_file}: tensor {unknown[0]} has no place in this model's LoRA layers "
                              f"({len(unknown)} such tensors; another model, rank layout or --num-layers?)")
    for k, v in weights.items():
        if v.shape != own[k].shape:
            raise LoRAConfigError(f"{adapter_file}: tensor {k} has shape {tuple(v.shape)}, this model needs "
                                  f"{tuple(own[k].shape)} (adapter from another model or rank?)")
    model.load_weights([(k, v.astype(own[k].dtype)) for k, v in weights.items()], strict=False)


def read_adapter_config(adapter_path: str | Path) -> dict:
    with open(Path(adapter_path) / "adapter_config.json") as f:
        return json.load(f)


def match_adapter_config(adapter_file: str | Path, lora_parameters: dict, num_layers: int, fine_tune_type: str,
                         n_blocks: int, follow: bool, log=print) -> tuple[dict, int, str]:
    """The LoRA settings a run starting from `adapter_file` uses: the run's own when the adapter's adapter_config.json
    (beside the file) agrees on rank, scale, keys, layer count and type; its config's with follow=True; otherwise
    refused (LoRAConfigError) naming each difference. No config beside the file: the run's settings, unchecked."""
    adapter_file = Path(adapter_file)
    folder = adapter_file if adapter_file.is_dir() else adapter_file.parent
    if folder_format(folder) == "peft":
        raise LoRAConfigError(f"--resume-adapter-file {adapter_file}: a PEFT adapter; convert it first (mesp-mlx "
                              f"convert {folder} <new folder> --to mlx-lm)")
    try:
        theirs = json.loads((folder / CONFIG).read_text(encoding="utf-8-sig"))
        their_params = {**DEFAULT_LORA, **theirs["lora_parameters"]}
        their_params["keys"] = normalize_keys(their_params["keys"])
        their_layers = int(theirs.get("num_layers", n_blocks))
        their_type = str(theirs.get("fine_tune_type", "lora"))
    except FileNotFoundError:
        return lora_parameters, num_layers, fine_tune_type
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LoRAConfigError(f"--resume-adapter-file: {folder / CONFIG} is unreadable ({type(e).__name__}: {e})"
                              ) from None
    ours = {**DEFAULT_LORA, **lora_parameters}
    ours["keys"] = normalize_keys(ours["keys"])
    differences = [f"{name} {theirs_v!r} (this run: {ours_v!r})" for name, theirs_v, ours_v in (
        ("rank", int(their_params["rank"]), int(ours["rank"])),
        ("scale", float(their_params["scale"]), float(ours["scale"])),
        ("keys", sorted(their_params["keys"]), sorted(ours["keys"])),
        ("num_layers", _blocks(their_layers, n_blocks), _blocks(num_layers, n_blocks)),
        ("fine_tune_type", their_type, fine_tune_type)) if theirs_v != ours_v]
    if not differences:
        return lora_parameters, num_layers, fine_tune_type
    if not follow:
        raise LoRAConfigError(f"--resume-adapter-file {adapter_file}: its {CONFIG} says " + "; ".join(differences) +
                              ": set the same lora_parameters / --num-layers, or --follow-adapter-config to take its")
    log(f"[mesp-mlx] note: --follow-adapter-config: LoRA settings from {folder / CONFIG}: " + "; ".join(differences))
    return ({**lora_parameters, **{k: their_params[k] for k in ("rank", "scale", "keys", "dropout")}}, their_layers,
            their_type)


def _blocks(num_layers: int, n_blocks: int) -> int:
    """The blocks that get LoRA: -1 is all; mlx-lm takes a count over the model's blocks as all (its default, 16)."""
    return n_blocks if num_layers == -1 else min(num_layers, n_blocks)
