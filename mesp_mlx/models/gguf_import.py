"""Import a Llama-family GGUF (Q4_0 / Q4_1 / Q8_0 / F16 / F32 tensors) into an mlx-lm model folder, without requantizing.

`mx.load` reads GGUF Q4_x/Q8_0 tensors as MLX packed affine weights with group size 32 (weight, scales, biases), so the
import is a renaming: GGUF tensor names -> Hugging Face/mlx-lm names, per-layer quantization settings in config.json
(the token embedding of SmolLM2 is Q8_0 while the blocks are Q4_1), llama.cpp's q/k row permutation undone, and the
tokenizer + chat template rebuilt from the GGUF metadata as a `tokenizers` tokenizer.json.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
)

from ..arguments import new_folder_problem
from ..io import atomic_folder
from ..lock import refuse_in_use
from .gguf_header import GGUFHeaderError, check_gguf

SUPPORTED_ARCHS = ("llama",)

_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


class GGUFImportError(ValueError):
    pass


def _scalar(meta, key, default=None):
    if key not in meta:
        if default is None:
            raise GGUFImportError(f"GGUF metadata lacks {key!r}")
        return default
    v = meta[key]
    return v.item() if isinstance(v, mx.array) else v


def hf_name(gguf_name: str) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        layer, base, suffix = parts[1], parts[2], ".".join(parts[3:])
        if base not in _BLOCK_NAMES:
            raise GGUFImportError(f"unknown GGUF tensor {gguf_name!r}")
        return f"model.layers.{layer}.{_BLOCK_NAMES[base]}.{suffix}"
    base, suffix = parts[0], ".".join(parts[1:])
    if base not in _TOP_NAMES:
        raise GGUFImportError(f"unknown GGUF tensor {gguf_name!r}")
    return f"{_TOP_NAMES[base]}.{suffix}"


def unpermute_rows(w: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's q/k permutation (rows (h, i, j) of HF were written as (h, j, i), i in {0,1}, j < head_dim/2).

    Works on packed weights, scales and biases alike: the permutation moves whole rows.
    """
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _quant_of(weights: dict, prefix: str) -> dict | None:
    """Infer bits/group size of a packed GGUF tensor from its shapes (32 values per group in GGUF)."""
    if f"{prefix}.scales" not in weights:
        return None
    w, s = weights[f"{prefix}.weight"], weights[f"{prefix}.scales"]
    in_dims = s.shape[-1] * 32
    bits = w.shape[-1] * 32 // in_dims
    return {"group_size": 32, "bits": int(bits)}


def build_tokenizer_files(meta: dict, out: Path) -> None:
    """tokenizer.json + tokenizer_config.json from the GGUF's byte-level BPE vocabulary, merges and chat template."""

    model_kind = _scalar(meta, "tokenizer.ggml.model")
    if model_kind != "gpt2":
        raise GGUFImportError(f"tokenizer type {model_kind!r} is not supported (byte-level BPE 'gpt2' only)")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    types = np.array(meta["tokenizer.ggml.token_type"]) if "tokenizer.ggml.token_type" in meta else None
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    # SmolLM2 / GPT-2 style pre-tokenization: digits split individually, then byte-level with the GPT-2 regex.
    pre = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if _scalar(meta, "tokenizer.ggml.pre", "default") in ("smollm", "starcoder", "refact"):
        pre.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(pre)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # Control tokens (type 3) are special: never split, skipped when decoding with skip_special_tokens.

    special = [tokens[i] for i in range(len(tokens)) if types is not None and int(types[i]) == 3]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.save(str(out / "tokenizer.json"))

    def tok_name(key):
        return tokens[int(_scalar(meta, key))] if key in meta else None

    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok_name("tokenizer.ggml.bos_token_id"),
        "eos_token": tok_name("tokenizer.ggml.eos_token_id"),
        "unk_token": tok_name("tokenizer.ggml.unknown_token_id"),
        "pad_token": tok_name("tokenizer.ggml.padding_token_id"),
        "add_bos_token": bool(_scalar(meta, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_scalar(meta, "llama.context_length", 2048)),
    }
    if "tokenizer.chat_template" in meta:
        cfg["chat_template"] = meta["tokenizer.chat_template"]
    with open(out / "tokenizer_config.json", "w") as f:
        json.dump({k: v for k, v in cfg.items() if v is not None}, f, indent=2)


def import_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, replace: bool = False) -> Path:
    """Convert `gguf_path` into an mlx-lm model folder at `out_dir` (written atomically: temp folder, then rename).
    An existing non-empty `out_dir` is refused, or with replace=True (the model cache's own folders) replaced."""
    out_dir = Path(out_dir)
    problem = new_folder_problem(out_dir)
    if problem:  # refused before the GGUF is read (the write would fail at the end, exit 74)
        raise GGUFImportError(f"the output folder: {problem}")
    refuse_in_use(out_dir, "output folder")  # a folder a run is writing into: exit 75, naming the run
    if out_dir.exists() and not replace and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise GGUFImportError(f"{out_dir} exists and is not an empty folder; choose another output folder")
    try:
        return _import_gguf(Path(gguf_path), out_dir)
    except GGUFImportError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, OverflowError) as e:
        # well-formed GGUF whose metadata and tensors do not make a consistent model (shapes, head counts, tokens)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise GGUFImportError(f"{gguf_path}: not a consistent {SUPPORTED_ARCHS} model ({type(e).__name__}: "
                              f"{first})") from None
    except Exception as e:
        if type(e).__module__.split(".")[0] != "tokenizers" and "tokenizers" not in type(e).__name__.lower():
            raise
        raise GGUFImportError(f"{gguf_path}: its tokenizer cannot be built ({e})") from None


def _import_gguf(gguf_path: Path, out_dir: Path) -> Path:
    if not gguf_path.is_file():
        raise GGUFImportError(f"GGUF file not found: {gguf_path}")
    try:
        check_gguf(gguf_path)  # MLX's reader trusts the file; a damaged one is refused here instead of crashing
    except GGUFHeaderError as e:
        raise GGUFImportError(f"cannot read {gguf_path}: {e}") from None
    except OSError as e:
        raise GGUFImportError(f"cannot read {gguf_path}: {e.strerror or e}") from None
    try:
        weights, meta = mx.load(str(gguf_path), return_metadata=True)
    except Exception as e:  # MLX raises for quant types it cannot read (e.g. Q4_K)
        raise GGUFImportError(f"cannot read {gguf_path}: {e} (supported tensor types: F32, F16, Q4_0, Q4_1, Q8_0)") from e
    arch = _scalar(meta, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise GGUFImportError(f"{gguf_path}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})")

    n_heads = int(_scalar(meta, f"{arch}.attention.head_count"))
    n_kv = int(_scalar(meta, f"{arch}.attention.head_count_kv", n_heads))
    hidden = int(_scalar(meta, f"{arch}.embedding_length"))
    tied = "output.weight" not in weights

    out_weights, quant = {}, {}
    for name, w in weights.items():
        target = hf_name(name)
        if ".attn_q." in name:
            w = unpermute_rows(w, n_heads)
        elif ".attn_k." in name:
            w = unpermute_rows(w, n_kv)
        out_weights[target] = w
    prefixes = {k.rsplit(".", 1)[0] for k in out_weights if k.endswith(".scales")}
    for p in sorted(prefixes):
        quant[p] = _quant_of(out_weights, p)
    if not quant:
        quantization = None
    else:
        # the most common setting is the default; the others are per-layer entries (mlx-lm's config supports both)
        settings = [json.dumps(q, sort_keys=True) for q in quant.values()]
        default = json.loads(max(set(settings), key=settings.count))
        quantization = dict(default)
        for p, q in quant.items():
            if q != default:
                quantization[p] = q

    vocab = len(meta["tokenizer.ggml.tokens"]) if "tokenizer.ggml.tokens" in meta else out_weights["model.embed_tokens.weight"].shape[0]
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": int(_scalar(meta, f"{arch}.block_count")),
        "intermediate_size": int(_scalar(meta, f"{arch}.feed_forward_length")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": int(_scalar(meta, f"{arch}.rope.dimension_count", hidden // n_heads)),
        "rms_norm_eps": float(_scalar(meta, f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_scalar(meta, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_scalar(meta, f"{arch}.context_length", 2048)),
        "vocab_size": int(vocab),
        "tie_word_embeddings": tied,
        "rope_traditional": False,
        "bos_token_id": int(_scalar(meta, "tokenizer.ggml.bos_token_id", 0)),
        "eos_token_id": int(_scalar(meta, "tokenizer.ggml.eos_token_id", 0)),
        "mesp_mlx_source": {"gguf": gguf_path.name, "file_type": int(_scalar(meta, "general.file_type", -1)),
                            "name": str(_scalar(meta, "general.name", "")),
                            "license": str(_scalar(meta, "general.license", ""))},
    }
    if quantization:
        config["quantization"] = quantization
        config["quantization_config"] = quantization

    def fill(tmp: Path) -> None:
        mx.save_safetensors(str(tmp / "model.safetensors"), out_weights, metadata={"format": "mlx"})
        with open(tmp / "config.json", "w") as f:
            json.dump(config, f, indent=2)
        build_tokenizer_files(meta, tmp)

    if out_dir.exists() and any(out_dir.iterdir()):  # replace=True: a stale import in the model cache
        shutil.rmtree(out_dir)
    atomic_folder(out_dir, fill, "the imported model")
    return out_dir
