"""Property-based tests of every reader of user-supplied bytes: generated and mutated inputs each end in success or a
clean error (the kind the CLI turns into one line and exit 2) -- never another exception, never a half-written file.

Bounded by the "default" Hypothesis profile (conftest.py); `python tools/fuzz.py` runs the same properties longer."""

import json
import os
import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, strategies as st  # noqa: E402

from mesp_mlx.adapters.convert import ConvertError, convert  # noqa: E402
from mesp_mlx.data.datasets import DataError, load_splits  # noqa: E402
from mesp_mlx.models.gguf_import import GGUFImportError, import_gguf  # noqa: E402
from mesp_mlx.personalize.stream import read_dialogues  # noqa: E402

# --- mutations of valid inputs ------------------------------------------------------------------------------------------
_EDIT = st.tuples(st.sampled_from(["set", "delete", "insert", "truncate"]), st.floats(0, 1),
                  st.binary(min_size=1, max_size=8))


def mutate(data: bytes, edits) -> bytes:
    b = bytearray(data)
    for kind, where, payload in edits:
        pos = min(int(where * len(b)), max(len(b) - 1, 0))
        if kind == "set" and b:
            b[pos] = payload[0]
        elif kind == "delete":
            del b[pos:pos + len(payload)]
        elif kind == "insert":
            b[pos:pos] = payload
        elif kind == "truncate":
            del b[pos:]
    return bytes(b)


def inputs(valid: bytes):
    """Arbitrary bytes, or a valid input with a few random edits (most of the search stays near valid files)."""
    return st.one_of(st.binary(max_size=300), st.lists(_EDIT, min_size=1, max_size=4).map(lambda e: mutate(valid, e)))


def _temp_files(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob(".*")]


# --- data: mlx-lm jsonl -------------------------------------------------------------------------------------------------
VALID_JSONL = ('{"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}]}\n'
               '{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "caf\u00e9?"}, '
               '{"role": "assistant", "content": "yes"}]}\n').encode()
VALID_TEXT = b'{"text": "To be, or not to be"}\n{"text": "that is the question"}\n'


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(Path(tiny_models["qwen2"]))


@given(data=st.one_of(inputs(VALID_JSONL), inputs(VALID_TEXT)), mask_prompt=st.booleans())
def test_the_data_reader_parses_or_refuses_with_file_line(tokenizer, data, mask_prompt):
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "train.jsonl").write_bytes(data)
        try:
            splits = load_splits(d, tokenizer, mask_prompt)
        except DataError as e:
            assert str(e).startswith(str(Path(d) / "train.jsonl")), e  # names the file (and the line where known)
            assert "\n" not in str(e)
        else:
            assert len(splits["train"]) >= 1


@given(data=st.one_of(inputs(VALID_JSONL), inputs(b'{"prompt": "a question", "completion": "an answer"}\n')),
       need_response=st.booleans())
def test_the_personalization_stream_reader_parses_or_refuses(data, need_response):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "stream.jsonl"
        path.write_bytes(data)
        try:
            dialogues = read_dialogues(path, need_response)
        except DataError as e:
            assert str(e).startswith(str(path)), e
        else:
            assert dialogues and all(d.prompt for d in dialogues)


# --- adapters: mlx-lm and PEFT ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory):
    from test_convert import _mlx_adapter

    root = tmp_path_factory.mktemp("adapters")
    mlx = _mlx_adapter(tiny_models["qwen2"], root / "mlx")
    convert(str(mlx), str(root / "peft"), "peft")
    files = _Files()
    for fmt, names in (("mlx-lm", ("adapters.safetensors", "adapter_config.json")),
                       ("peft", ("adapter_model.safetensors", "adapter_config.json"))):
        folder = root / ("mlx" if fmt == "mlx-lm" else "peft")
        files[fmt] = {n: (folder / n).read_bytes() for n in names}
    return files


class _Files(dict):
    def __repr__(self):  # Hypothesis prints fixtures of failing examples: the bytes would fill the screen
        return "<adapter files>"


def _check_convert(files: dict, fmt: str, to: str, model=None):
    with tempfile.TemporaryDirectory() as d:
        src, out = Path(d) / "src", Path(d) / "out"
        src.mkdir()
        for name, data in files.items():
            (src / name).write_bytes(data)
        try:
            report = convert(str(src), str(out), to, source_format=fmt, model=model)
        except ConvertError as e:
            assert "\n" not in str(e)
            assert not out.exists() or not any(out.iterdir())  # nothing written
        else:
            assert report["modules"] >= 1 and sorted(p.name for p in out.iterdir()) == sorted(
                ["adapters.safetensors" if to == "mlx-lm" else "adapter_model.safetensors", "adapter_config.json"])
        assert not _temp_files(Path(d))


@given(which=st.sampled_from(["weights", "config"]), edits=st.lists(_EDIT, min_size=1, max_size=4),
       direction=st.sampled_from([("mlx-lm", "peft"), ("peft", "mlx-lm")]))
def test_the_adapter_readers_convert_or_refuse_and_write_nothing_half(adapters, which, edits, direction):
    fmt, to = direction
    files = dict(adapters[fmt])
    name = [n for n in files if n.endswith(".safetensors" if which == "weights" else ".json")][0]
    files[name] = mutate(files[name], edits)
    _check_convert(files, fmt, to)


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats() | st.text(max_size=8),
                           lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids,
                                                                                     max_size=3), max_leaves=6)


@given(key=st.sampled_from(["fine_tune_type", "lora_parameters", "num_layers", "r", "lora_alpha", "peft_type",
                            "rank_pattern", "alpha_pattern", "use_rslora", "lora_dropout", "use_dora",
                            "fan_in_fan_out", "base_model_name_or_path"]),
       value=JSON_VALUES, direction=st.sampled_from([("mlx-lm", "peft"), ("peft", "mlx-lm")]))
def test_adapter_configs_with_any_values_convert_or_refuse(adapters, tiny_models, key, value, direction):
    fmt, to = direction
    files = dict(adapters[fmt])
    cfg = json.loads(files["adapter_config.json"])
    cfg[key] = value
    if key == "lora_parameters" and isinstance(value, dict):
        cfg[key] = {**json.loads(files["adapter_config.json"]).get(key, {}), **value}
    files["adapter_config.json"] = json.dumps(cfg).encode()
    _check_convert(files, fmt, to, model=str(tiny_models["qwen2"]))


# --- GGUF -------------------------------------------------------------------------------------------------------------
def tiny_gguf() -> bytes:
    """A small GGUF v3 (llama metadata, a string and a float array, Q4_1 / F32 / Q8_0 tensors) to mutate."""
    import random
    import struct

    def s(b):
        return struct.pack("<Q", len(b)) + b

    def kv(key, vtype, payload):
        return s(key.encode()) + struct.pack("<I", vtype) + payload

    kvs = [kv("general.architecture", 8, s(b"llama")), kv("llama.attention.head_count", 4, struct.pack("<I", 2)),
           kv("llama.embedding_length", 4, struct.pack("<I", 32)),
           kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 4) + b"".join(s(t) for t in (b"a", b"b", b"<s>", b"</s>"))),
           kv("tokenizer.ggml.scores", 9, struct.pack("<IQ", 6, 4) + struct.pack("<4f", 0, 0, 0, 0))]
    tensors = [("token_embd.weight", [32, 4], 3, 4 * 20), ("blk.0.attn_q.weight", [32, 32], 0, 32 * 32 * 4),
               ("blk.0.attn_k.weight", [32, 2], 8, 2 * 34)]
    info, offset = b"", 0
    for name, dims, ttype, size in tensors:
        info += s(name.encode()) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        info += struct.pack("<IQ", ttype, offset)
        offset += (size + 31) // 32 * 32
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)) + b"".join(kvs) + info
    head += b"\0" * ((32 - len(head) % 32) % 32)
    rng = random.Random(0)
    return head + bytes(rng.randrange(256) for _ in range(offset))


@given(data=inputs(tiny_gguf()))
def test_the_gguf_reader_imports_or_refuses_and_never_crashes(data):
    with tempfile.TemporaryDirectory() as d:
        path, out = Path(d) / "m.gguf", Path(d) / "imported"
        path.write_bytes(data)
        try:
            import_gguf(path, out)
        except GGUFImportError as e:
            assert "\n" not in str(e)
            assert not out.exists()
        assert not _temp_files(Path(d))

