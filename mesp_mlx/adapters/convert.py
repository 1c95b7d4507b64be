"""Adapter conversion between Hugging Face PEFT LoRA and mlx-lm LoRA (both directions), format detected from the files.

    PEFT  : adapter_model.safetensors  base_model.model.<module>.lora_A.weight [r, in], .lora_B.weight [out, r]
            adapter_config.json        r, lora_alpha, target_modules, rank_pattern, alpha_pattern, use_rslora, ...
    mlx-lm: adapters.safetensors       <module>.lora_a [in, r], <module>.lora_b [r, out]
            adapter_config.json        fine_tune_type, num_layers, lora_parameters {rank, scale, dropout, keys}

Both compute y = x W0^T + s (x A_mlx) B_mlx with A_mlx = A_peft^T, B_mlx = B_peft^T; PEFT's s = lora_alpha / r (rsLoRA:
lora_alpha / sqrt(r)), per module when rank_pattern / alpha_pattern say so. mlx-lm has one rank and one scale for all
modules, so a PEFT adapter with several is made uniform without changing what it computes: A and B are zero-padded to
the largest rank ((x A) B gains only exact zero terms) and a module whose scale differs has s_m / s folded into its B.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import mlx.core as mx
from mlx import nn

from ..arguments import folder_problem
from ..io import (
    CHECKSUM_KEY,
    CorruptFile,
    atomic_folder,
    atomic_write_json,
    load_tensors,
    save_tensors,
    tensor_digest,
)
from ..lock import FolderLock
from ..models.load import ModelLoadError, load_model
from .formats import refuse_foreign

PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
MLX_WEIGHTS, MLX_CONFIG = "adapters.safetensors", "adapter_config.json"
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_LAYER = re.compile(r"^(?P<prefix>.*\.layers)\.(?P<index>\d+)\.(?P<key>.+)$")


class ConvertError(ValueError):
    pass


def detect_format(src: str | Path) -> str:
    src = Path(src)
    if (src / MLX_WEIGHTS).is_file():
        return "mlx-lm"
    if (src / PEFT_WEIGHTS).is_file():
        return "peft"
    if (src / "adapter_model.bin").is_file():
        raise ConvertError(f"{src}: adapter_model.bin (pickle) is not read; save the PEFT adapter with safetensors")
    raise ConvertError(f"{src}: neither {MLX_WEIGHTS} (mlx-lm) nor {PEFT_WEIGHTS} (PEFT) is there")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConvertError(f"{path} is missing")
    try:
        cfg = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ConvertError(f"{path}: not UTF-8 text (byte at offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    except RecursionError:
        raise ConvertError(f"{path}: JSON nested too deeply") from None
    if not isinstance(cfg, dict):
        raise ConvertError(f"{path}: the top level must be a JSON object")
    return cfg


def _read_tensors(path: Path) -> dict:
    """Every tensor of a safetensors file, read now (MLX checks the header lazily): a damaged file is refused here."""
    try:
        tensors, _ = load_tensors(path)  # verified against its checksum when it has one
    except CorruptFile as e:
        raise ConvertError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - MLX raises RuntimeError / ValueError / UnicodeDecodeError for bad bytes
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConvertError(f"{path}: not a readable safetensors file ({first})") from None
    return tensors


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule: the first pattern p with re.fullmatch('(.*\\.)?(p)', module name) gives the value."""
    for pattern, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?({pattern})", module):
            return value
    return default


def _split_layer(module: str, source: str) -> tuple[int, str]:
    m = _LAYER.match(module)
    if not m:
        raise ConvertError(f"{source}: {module} is not a projection inside a transformer block; mlx-lm's LoRA covers "
                           "block linears only")
    return int(m["index"]), m["key"]


# --- reading ----------------------------------------------------------------------------------------------------------
def read_peft(src: Path) -> tuple[dict, dict, dict]:
    """-> ({module: (A_mlx [in, r], B_mlx [r, out])}, {module: scale}, config)."""
    cfg = _read_json(src / PEFT_CONFIG)
    if cfg.get("peft_type", "LORA").upper() != "LORA":
        raise ConvertError(f"{src / PEFT_CONFIG}: peft_type {cfg.get('peft_type')!r} is not LoRA")
    if cfg.get("use_dora"):
        raise ConvertError(f"{src / PEFT_CONFIG}: DoRA adapters are not converted (magnitude vectors differ)")
    if cfg.get("fan_in_fan_out"):
        raise ConvertError(f"{src / PEFT_CONFIG}: fan_in_fan_out (Conv1D models such as GPT-2) is not supported")
    weights = _read_tensors(src / PEFT_WEIGHTS)
    pairs: dict = {}
    for key, value in weights.items():
        m = _PEFT_KEY.match(key)
        if not m:
            raise ConvertError(f"{src / PEFT_WEIGHTS}: tensor {key} is not a LoRA A/B matrix (embedding LoRA, biases, "
                               "DoRA magnitudes and modules_to_save are not converted)")
        pairs.setdefault(m["module"], {})[m["ab"]] = value
    modules, scales = {}, {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ConvertError(f"{src / PEFT_WEIGHTS}: {module} has lora_{next(iter(ab))} but not its partner")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ConvertError(f"{src / PEFT_WEIGHTS}: {module}.lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                               "are not a rank-r pair [r, in], [out, r]")
        r = a.shape[0]
        expected_r = _pattern_value(cfg.get("rank_pattern"), module, cfg.get("r", r))
        if expected_r != r:
            raise ConvertError(f"{src / PEFT_WEIGHTS}: {module}.lora_A has rank {r} but the config says {expected_r}")
        alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", r))
        scales[module] = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
        _split_layer(module, str(src / PEFT_WEIGHTS))
        modules[module] = (a.T, b.T)
    if not modules:
        raise ConvertError(f"{src / PEFT_WEIGHTS} holds no LoRA tensors")
    return modules, scales, cfg


def read_mlx(src: Path) -> tuple[dict, dict, dict]:
    cfg = _read_json(src / MLX_CONFIG)
    kind = cfg.get("fine_tune_type", "lora")
    if kind != "lora":
        raise ConvertError(f"{src / MLX_CONFIG}: fine_tune_type {kind!r}: only LoRA adapters convert to PEFT")
    params = cfg.get("lora_parameters", {})
    scale = float(params.get("scale", 20.0))
    weights = _read_tensors(src / MLX_WEIGHTS)
    pairs: dict = {}
    for key, value in weights.items():
        module, _, leaf = key.rpartition(".")
        if leaf not in ("lora_a", "lora_b"):
            raise ConvertError(f"{src / MLX_WEIGHTS}: tensor {key} is not a LoRA matrix")
        pairs.setdefault(module, {})[leaf] = value
    modules = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"lora_a", "lora_b"}:
            raise ConvertError(f"{src / MLX_WEIGHTS}: {module} lacks one of lora_a / lora_b")
        _split_layer(module, str(src / MLX_WEIGHTS))
        modules[module] = (ab["lora_a"], ab["lora_b"])
    return modules, {m: scale for m in modules}, cfg


# --- checking against a model -----------------------------------------------------------------------------------------
def model_linear_shapes(model_path: str) -> tuple[dict, int]:
    """{module path: (in, out)} of every linear of the model (read lazily, nothing computed) and its block count."""

    model = load_model(model_path, lazy=True).model
    shapes = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.QuantizedLinear):
            shapes[name] = (m.weight.shape[1] * 32 // m.bits, m.weight.shape[0])
        elif isinstance(m, nn.Linear):
            shapes[name] = (m.weight.shape[1], m.weight.shape[0])
    return shapes, len(model.layers)


def check_fits(modules: dict, shapes: dict, source: str) -> None:
    """Refuse an adapter whose matrices do not fit the model, naming the first tensor that does not."""
    for module, (a, b) in modules.items():
        if module not in shapes:
            raise ConvertError(f"{source}: {module} has no linear of that name in the model")
        d_in, d_out = shapes[module]
        if a.shape[0] != d_in or b.shape[1] != d_out:
            raise ConvertError(f"{source}: {module} maps {a.shape[0]} -> {b.shape[1]} features but the model's "
                               f"{module} maps {d_in} -> {d_out}: this adapter is for another model")


# --- writing ----------------------------------------------------------------------------------------------------------
def _save(path: Path, tensors: dict) -> None:
    save_tensors(path, tensors, {"format": "mlx"}, what="the converted adapter")


def _write_adapter(out: Path, weights_name: str, tensors: dict, config_name: str, config: dict) -> None:
    """A new folder appears whole or not at all; in an existing folder (locked by convert) each file is replaced
    atomically."""
    if not out.exists():
        def fill(folder: Path) -> None:
            mx.save_safetensors(str(folder / weights_name), tensors,
                                metadata={"format": "mlx", CHECKSUM_KEY: tensor_digest(tensors)})
            (folder / config_name).write_text(json.dumps(config, indent=4), encoding="utf-8")

        atomic_folder(out, fill, "the converted adapter")
        return
    _save(out / weights_name, tensors)
    atomic_write_json(out / config_name, config, what="the converted adapter's config")


def _num_layers(modules: dict, n_blocks: int | None) -> int:
    lowest = min(_split_layer(m, "")[0] for m in modules)
    return n_blocks - lowest if n_blocks else -1


def to_mlx(modules: dict, scales: dict, out: Path, n_blocks: int | None, dropout: float, dtype, extra: dict) -> dict:
    """Write mlx-lm adapters: uniform rank (zero padding) and one scale (ratios folded into B). Returns a report."""
    rank = max(a.shape[1] for a, _ in modules.values())
    scale = Counter(scales.values()).most_common(1)[0][0]
    tensors, padded, folded = {}, [], []
    for module, (a, b) in modules.items():
        r = a.shape[1]
        if r < rank:  # (x [A | 0]) [B ; 0] = (x A) B exactly
            a = mx.concatenate([a, mx.zeros((a.shape[0], rank - r), a.dtype)], axis=1)
            b = mx.concatenate([b, mx.zeros((rank - r, b.shape[1]), b.dtype)], axis=0)
            padded.append(module)
        if scales[module] != scale:
            b = (b.astype(mx.float32) * (scales[module] / scale)).astype(b.dtype)
            folded.append(module)
        tensors[f"{module}.lora_a"] = a if dtype is None else a.astype(dtype)
        tensors[f"{module}.lora_b"] = b if dtype is None else b.astype(dtype)
    keys = sorted({_split_layer(m, "")[1] for m in modules})
    config = {"fine_tune_type": "lora", "num_layers": _num_layers(modules, n_blocks),
              "lora_parameters": {"rank": rank, "scale": scale, "dropout": dropout, "keys": keys}, **extra}
    _write_adapter(out, MLX_WEIGHTS, tensors, MLX_CONFIG, config)
    return {"rank": rank, "scale": scale, "padded": padded, "scale_folded": folded, "num_layers": config["num_layers"]}


def to_peft(modules: dict, scales: dict, out: Path, dropout: float, base_model: str | None, dtype) -> dict:
    rank = max(a.shape[1] for a, _ in modules.values())
    scale = Counter(scales.values()).most_common(1)[0][0]
    tensors = {}
    for module, (a, b) in modules.items():
        a_t, b_t = a.T, b.T
        tensors[f"base_model.model.{module}.lora_A.weight"] = a_t if dtype is None else a_t.astype(dtype)
        tensors[f"base_model.model.{module}.lora_B.weight"] = b_t if dtype is None else b_t.astype(dtype)
    targets = sorted({_split_layer(m, "")[1].rsplit(".", 1)[-1] for m in modules})
    layers = sorted({_split_layer(m, "")[0] for m in modules})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": rank,
              "lora_alpha": scale * rank, "target_modules": targets, "layers_to_transform": layers,
              "lora_dropout": dropout, "bias": "none", "use_rslora": False, "use_dora": False,
              "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True}
    _write_adapter(out, PEFT_WEIGHTS, tensors, PEFT_CONFIG, config)
    return {"rank": rank, "lora_alpha": config["lora_alpha"], "target_modules": targets}


def convert(src: str, out: str, to: str, source_format: str | None = None, model: str | None = None,
            dtype: str | None = None) -> dict:
    """Convert the adapter in folder `src` to format `to` ('mlx-lm' or 'peft') in folder `out`."""
    src_p, out_p = Path(src), Path(out)
    problem = folder_problem(out_p)
    if problem:  # refused before anything is read (the write would fail at the end, exit 74)
        raise ConvertError(f"the output folder: {problem}")
    fmt = source_format or detect_format(src_p)
    if fmt == to:
        raise ConvertError(f"{src} is already a {fmt} adapter")

    if out_p.is_dir():  # into an existing folder: its owner's lock, and never over the other format's adapter
        with FolderLock(out_p, flag="output folder"):
            refuse_foreign(out_p, to, "the output folder")
            return _convert_or_refuse(src_p, out_p, to, fmt, model, dtype)
    return _convert_or_refuse(src_p, out_p, to, fmt, model, dtype)  # a new folder appears whole (_write_adapter)


def _convert_or_refuse(src_p: Path, out_p: Path, to: str, fmt: str, model: str | None, dtype: str | None) -> dict:
    try:
        return _convert(src_p, out_p, to, fmt, model, dtype)
    except (ConvertError, ModelLoadError):
        raise
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, ZeroDivisionError, re.error) as e:
        # a config whose values have the wrong types (a rank that is a word, a pattern that is not a mapping, ...)
        raise ConvertError(f"{src_p}: malformed adapter config ({type(e).__name__}: {e})") from None


def _convert(src_p: Path, out_p: Path, to: str, fmt: str, model: str | None, dtype: str | None) -> dict:
    modules, scales, cfg = read_peft(src_p) if fmt == "peft" else read_mlx(src_p)
    for module, (a, b) in modules.items():
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0] or a.shape[1] == 0:
            raise ConvertError(f"{src_p}: {module}: A {tuple(a.shape)} and B {tuple(b.shape)} are not a rank-r pair")
    if not all(isinstance(s, (int, float)) and math.isfinite(s) for s in scales.values()):
        raise ConvertError(f"{src_p}: the LoRA scale (lora_alpha / r, or lora_parameters.scale) is not a finite number")
    base = model or (cfg.get("base_model_name_or_path") if fmt == "peft" else cfg.get("model"))
    n_blocks = None
    if model or (base and (Path(base) / "config.json").is_file()):
        shapes, n_blocks = model_linear_shapes(base)
        check_fits(modules, shapes, str(src_p))
    cast = DTYPES[dtype] if dtype else None
    if to == "mlx-lm":
        extra = {"model": base} if base else {}
        report = to_mlx(modules, scales, out_p, n_blocks, float(cfg.get("lora_dropout", 0.0)), cast, extra)
    else:
        params = cfg.get("lora_parameters", {})
        report = to_peft(modules, scales, out_p, float(params.get("dropout", 0.0)), base, cast)
    report.update({"from": fmt, "to": to, "modules": len(modules)})
    return report
