"""Model loading (GGUF import of the real SmolLM2, quantize-on-load) and data validation with file:line errors."""

import json
import os
from pathlib import Path

import mlx.core as mx
import pytest

from mesp_mlx.cli import main
from mesp_mlx.data.datasets import BatchIterator, DataError, load_splits, read_jsonl
from mesp_mlx.models import ModelLoadError, compute, load_model, resolve_model
from mesp_mlx.models.gguf_import import GGUFImportError, import_gguf, unpermute_rows
from mesp_mlx.models.synthetic import model_config, write_random_model

KEYS = {"text": "text", "prompt": "prompt", "completion": "completion", "chat": "messages"}


def test_unpermute_inverts_llama_cpp_permutation():
    n_heads, head_dim, d_in = 3, 8, 5
    w = mx.arange(n_heads * head_dim * d_in).reshape(n_heads * head_dim, d_in)
    # llama.cpp's convert: reshape(n_head, 2, hd/2, ...).swapaxes(1, 2)
    permuted = w.reshape(n_heads, 2, head_dim // 2, d_in).swapaxes(1, 2).reshape(w.shape)
    assert mx.array_equal(unpermute_rows(permuted, n_heads), w).item()


@pytest.mark.slow
def test_gguf_import_of_real_smollm2_generates_paris(smollm2):
    from mlx_lm import generate, load

    cfg = json.loads((smollm2 / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 4 and cfg["quantization"]["group_size"] == 32
    assert cfg["quantization"]["model.embed_tokens"] == {"group_size": 32, "bits": 8}
    model, tok = load(str(smollm2))  # plain mlx-lm, no mesp_mlx code involved
    out = generate(model, tok, "The capital of France is", max_tokens=8, verbose=False)
    assert "Paris" in out
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("scales_dtype", [mx.float32, mx.float16])
def test_fast_dequantize_is_bit_identical_to_mlx(bits, group_size, scales_dtype, monkeypatch):
    """The CPU unpacking the dequant compute path uses must give mx.dequantize's exact values (GGUF: fp16 scales)."""
    mx.random.seed(bits * 1000 + group_size)
    w, scales, biases = mx.quantize(3 * mx.random.normal((96, 256)), group_size=group_size, bits=bits)
    scales, biases = scales.astype(scales_dtype), biases.astype(scales_dtype)
    ref = mx.dequantize(w, scales.astype(mx.float32), biases.astype(mx.float32), group_size=group_size, bits=bits)
    mx.eval(ref)
    monkeypatch.setattr(mx, "dequantize", None)  # the unpacking must not fall back to it
    with mx.stream(mx.cpu):
        got = compute.dequantize(w, scales, biases, group_size, bits)
        rows = compute.dequantize(w[7:40], scales[7:40], biases[7:40], group_size, bits)  # row slices (lean matmuls)
    assert got.dtype == mx.float32 and mx.array_equal(got, ref).item()
    assert mx.array_equal(rows, ref[7:40]).item()


def test_gguf_errors(tmp_path):
    with pytest.raises(GGUFImportError, match="not found"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x00\x00garbage")
    with pytest.raises(GGUFImportError):
        import_gguf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_quantize_on_load_quantizes_embeddings_and_caches(tmp_path):
    folder = write_random_model(tmp_path / "fp32", model_config("qwen2", 64, 2, 128, 4, 2, 256), bits=None)
    resolved = resolve_model(str(folder), bits=4, group_size=32)
    assert resolved != folder and resolve_model(str(folder), bits=4, group_size=32) == resolved
    lm = load_model(str(folder), bits=4, group_size=32)
    assert "scales" in lm.model.model.embed_tokens and lm.model.model.embed_tokens.bits == 4
    assert lm.model.layers[0].mlp.up_proj.bits == 4


def test_model_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no such folder"):
        resolve_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json is missing"):
        resolve_model(str(tmp_path / "empty"))
    (tmp_path / "weird").mkdir()
    (tmp_path / "weird" / "config.json").write_text('{"model_type": "mamba"}')
    with pytest.raises(ModelLoadError, match="not supported"):
        resolve_model(str(tmp_path / "weird"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"model_type": ')
    with pytest.raises(ModelLoadError, match="malformed JSON"):
        resolve_model(str(tmp_path / "broken"))


@pytest.mark.parametrize("lines,message", [
    (['{"text": "ok"}', '{"text": "ok"'], "train.jsonl:2: malformed JSON"),
    (['{"text": "ok"}', '[1, 2]'], "train.jsonl:2: each line must be a JSON object"),
    (['{"foo": "bar"}'], "train.jsonl:1: unknown format"),
    (['{"text": "a"}', '{"prompt": "p", "completion": "c"}'], "train.jsonl:2: completions record in a text file"),
    (['{"messages": [{"role": "user"}]}'], "train.jsonl:1: message 0 needs 'role' and 'content'"),
    (['{"messages": [{"role": "robot", "content": "x"}]}'], "train.jsonl:1: message 0 has unknown role"),
    (['{"prompt": 3, "completion": "c"}'], "train.jsonl:1: completions format needs string fields"),
    ([''], "empty"),
])
def test_malformed_data_is_refused_with_file_and_line(tmp_path, lines, message):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace("[", r"\[")):
        read_jsonl(path, KEYS)


def test_data_formats_masking_and_truncation(tiny_models, tmp_path, capsys):
    lm = load_model(str(tiny_models["qwen2"]))
    d = tmp_path / "d"
    d.mkdir()
    (d / "train.jsonl").write_text(json.dumps({"prompt": "hello, how are you", "completion": "i am fine"}) + "\n")
    splits = load_splits(d, lm.tokenizer, mask_prompt=True)
    tokens, offset = splits["train"][0]
    assert 0 < offset < len(tokens) and splits["valid"] is None
    it = BatchIterator(splits["train"], 1, max_seq_length=5, seed=0)
    batch, lengths = next(it)
    assert batch.shape == (1, 5) and lengths[0, 1].item() == 5
    assert "truncated" in capsys.readouterr().out
    (d / "train.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(DataError, match="--mask-prompt needs chat or completions"):
        load_splits(d, lm.tokenizer, mask_prompt=True)
    (tmp_path / "no_train").mkdir()
    with pytest.raises(DataError, match="train.jsonl: missing"):
        load_splits(tmp_path / "no_train", lm.tokenizer)
    with pytest.raises(DataError, match="no such folder"):
        load_splits(tmp_path / "absent", lm.tokenizer)


def test_cli_reports_bad_input_without_writing(tiny_models, tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    (d / "train.jsonl").write_text('{"text": "fine"}\n{"text": 1}\n')
    out = tmp_path / "out"
    rc = main(["train", "--model", str(tiny_models["qwen2"]), "--data", str(d), "--adapter-path", str(out)])
    assert rc == 2
    assert "train.jsonl:2" in capsys.readouterr().err
    assert not (out / "adapters.safetensors").exists() and not (out / "adapter_config.json").exists()
    rc = main(["train", "--model", str(tiny_models["qwen2"]), "--data", str(d), "--max-seq-length", "100000",
               "--adapter-path", str(out)])
    assert rc == 2 and "exceeds the model's context" in capsys.readouterr().err
    rc = main(["train", "--model", str(tiny_models["qwen2"]), "--data", str(d), "--adapter-path", str(out),
               "-c", str(tmp_path / "none.yaml")])
    assert rc == 2


def test_doctor_reports_blas_and_speed(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "fp32 GEMM" in out and "BLAS" in out and "mlx-lm" in out
