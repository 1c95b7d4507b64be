"""Fold LoRA adapters into the base model and save an mlx-lm model folder, measuring what requantization keeps.

For each LoRA linear: W = W0 + s B^T A^T (mlx-lm layout), then requantized to the base's bits and group size (or
--bits / --group-size), or kept in full precision with --dequantize. Requantizing can wipe a small LoRA delta
(mlx-lm#1172): a 4-bit grid step is often larger than the delta itself. So per layer we measure, with d = s B^T A^T and
d' = dequant(quant(W0 + d)) - W0 the delta that actually survives:
    rel_err = ||d' - d|| / ||d||     (requantization noise relative to the delta)
    kept    = max(0, 1 - rel_err)    (1: all of it, 0: the noise is as large as the delta itself)
and warn when a layer keeps less than --warn-below. (The projection <d', d> / <d, d> is no measure here: when the delta
is far below the grid step, d' is mostly the shift of the requantization grid and the projection is noise.)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_unflatten
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.utils import dequantize_model, load, load_adapters, save

from ..arguments import new_folder_problem
from ..io import CorruptFile, atomic_folder, load_tensors
from ..lock import refuse_in_use
from ..models.compute import QUANT_BITS, QUANT_GROUP_SIZES, dequantized_weight
from ..models.load import resolve_model


class FuseError(ValueError):
    pass


def _fuse_linear(m: LoRALinear, dequantize: bool, bits: int | None, group_size: int | None):
    """-> (fused module, kept, rel_err) for one LoRA linear."""
    lin = m.linear
    quantized = isinstance(lin, nn.QuantizedLinear)
    w0 = dequantized_weight(lin) if quantized else lin.weight.astype(mx.float32)
    delta = m.scale * (m.lora_b.T.astype(mx.float32) @ m.lora_a.T.astype(mx.float32))
    w = w0 + delta
    float_dtype = lin.scales.dtype if quantized else lin.weight.dtype
    out_dims, in_dims = w.shape
    bias = "bias" in lin
    dense = nn.Linear(in_dims, out_dims, bias=bias)
    dense.weight = w.astype(float_dtype)
    if bias:
        dense.bias = lin.bias
    if quantized and not dequantize:
        g, b = group_size or lin.group_size, bits or lin.bits
        if in_dims % g:
            raise FuseError(f"--group-size {g}: a LoRA linear takes {in_dims} inputs, not a multiple of {g}")
        fused = nn.QuantizedLinear.from_linear(dense, g, b, mode=getattr(lin, "mode", "affine"))
        fused.scales = fused.scales.astype(float_dtype)
        if "biases" in fused:
            fused.biases = fused.biases.astype(float_dtype)
        w_kept = dequantized_weight(fused)
    else:
        fused = dense
        w_kept = dense.weight.astype(mx.float32)
    norm2 = mx.sum(delta * delta).item()
    rel_err = math.sqrt(mx.sum((w_kept - w0 - delta) ** 2).item() / norm2) if norm2 > 0 else 0.0
    return fused, max(0.0, 1.0 - rel_err), rel_err


def _check_arguments(save_path: str, bits: int | None, group_size: int | None, warn_below: float) -> None:
    """The flags' values, refused before the model loads (MLX would raise deep inside the requantization)."""
    if bits is not None and bits not in QUANT_BITS:
        raise FuseError(f"--bits {bits}: MLX quantizes with {', '.join(map(str, QUANT_BITS))} bits")
    if group_size is not None and group_size not in QUANT_GROUP_SIZES:
        raise FuseError(f"--group-size {group_size}: MLX quantizes in groups of "
                        f"{', '.join(map(str, QUANT_GROUP_SIZES))}")
    if not 0 <= warn_below <= 1:  # NaN fails too
        raise FuseError(f"--warn-below must be a fraction in [0, 1], not {warn_below}")
    problem = new_folder_problem(save_path)
    if problem:
        raise FuseError(f"--save-path: {problem}")


def _check_adapter_config(adapter_path: str) -> None:
    """What mlx-lm's load_adapters reads of adapter_config.json, refused in one line when it is not there."""
    path = Path(adapter_path) / "adapter_config.json"
    if not path.is_file():
        raise FuseError(f"{path} is missing (an mlx-lm adapter folder has adapters.safetensors and its config)")
    try:
        cfg = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FuseError(f"{path}: malformed JSON ({type(e).__name__})") from None
    params = cfg.get("lora_parameters") if isinstance(cfg, dict) else None

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    keys = params.get("keys") if isinstance(params, dict) else None
    if not (isinstance(cfg, dict) and type(cfg.get("num_layers")) is int and isinstance(params, dict)
            and type(params.get("rank")) is int and params["rank"] >= 1 and number(params.get("scale"))
            and number(params.get("dropout")) and (keys is None or isinstance(keys, list)
                                                   and all(isinstance(k, str) for k in keys))):
        raise FuseError(f"{path}: not an mlx-lm LoRA adapter config (num_layers; lora_parameters: rank, scale, "
                        "dropout, keys; a PEFT adapter converts with: mesp-mlx convert --to mlx-lm)")


def fuse(model: str | None, adapter_path: str, save_path: str, dequantize: bool = False, bits: int | None = None,
         group_size: int | None = None, warn_below: float = 0.5, log=print) -> dict:
    _check_arguments(save_path, bits, group_size, warn_below)

    folder = resolve_model(model)
    if not (Path(adapter_path) / "adapters.safetensors").is_file():
        raise FuseError(f"{adapter_path}: no adapters.safetensors (convert a PEFT adapter first: mesp-mlx convert)")
    try:
        load_tensors(Path(adapter_path) / "adapters.safetensors")  # a damaged file is refused, not folded in
    except CorruptFile as e:
        raise FuseError(str(e)) from None
    out = Path(save_path)
    refuse_in_use(out, "--save-path")  # a folder a run is writing into: exit 75, naming the run
    if out.exists() and any(out.iterdir()):
        raise FuseError(f"{out} exists and is not empty; choose another --save-path")
    _check_adapter_config(adapter_path)
    lm, tokenizer, config = load(str(folder), return_config=True)
    try:
        load_adapters(lm, str(adapter_path))
    except ValueError as e:  # mlx-lm: tensors that are not this model's LoRA parameters (one line each)
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        raise FuseError(f"{adapter_path}: not an adapter of {folder} ({lines[1] if len(lines) > 1 else lines[0]}; "
                        f"{max(1, len(lines) - 1)} such tensors)") from None
    lm.eval()
    fused, layers = [], []
    for name, m in lm.named_modules():
        if isinstance(m, LoRALinear):
            module, kept, rel_err = _fuse_linear(m, dequantize, bits, group_size)
            fused.append((name, module))
            layers.append({"module": name, "kept": kept, "rel_err": rel_err})
            if (bits or group_size) and not dequantize and isinstance(module, nn.QuantizedLinear):
                config.setdefault("quantization", {})[name] = {"group_size": module.group_size, "bits": module.bits}
    if not fused:
        if any(type(m).__name__ == "DoRALinear" for _, m in lm.named_modules()):
            raise FuseError(f"{adapter_path}: a DoRA adapter: fold it with `python -m mlx_lm fuse` (this fuse folds "
                            "LoRA only)")
        raise FuseError(f"{adapter_path}: no LoRA layer to fuse")
    lm.update_modules(tree_unflatten(fused))
    if dequantize:
        lm = dequantize_model(lm)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    # the folder appears complete or not at all, with the permissions a plain write gives
    atomic_folder(out, lambda tmp: save(tmp, str(folder), lm, tokenizer, config, donate_model=False),
                  "the fused model")
    low = [l for l in layers if l["kept"] < warn_below]
    kept_values = [l["kept"] for l in layers]
    log(f"[mesp-mlx] fused {len(layers)} LoRA linears into {out} "
        f"({'dequantized' if dequantize else 'requantized'}); LoRA delta kept: min {min(kept_values):.3f}, "
        f"mean {sum(kept_values) / len(kept_values):.3f}")
    for l in low[:10]:
        log(f"[mesp-mlx] WARNING: {l['module']}: only {100 * l['kept']:.1f}% of the LoRA delta survives requantization "
            f"(relative error {l['rel_err']:.2f})")
    if low:
        log(f"[mesp-mlx] WARNING: {len(low)} of {len(layers)} layers keep less than {100 * warn_below:.0f}% of their "
            "LoRA delta: fuse with --dequantize, or requantize with more --bits")
    return {"save_path": str(out), "layers": layers, "low": [l["module"] for l in low]}
