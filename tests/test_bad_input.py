"""The bad-input matrix of `mesp-mlx train`: each row exits 2 with a clear message and writes nothing."""

import json
import struct

from mesp_mlx.cli import main
from test_train_cli import write_data


def _gguf_with_q5_k(path):
    """A minimal GGUF v3 file whose one tensor is Q5_K (type 13), a quantization MLX cannot read."""
    def s(b):
        return struct.pack("<Q", len(b)) + b

    kv = s(b"general.architecture") + struct.pack("<I", 8) + s(b"llama")
    info = s(b"token_embd.weight") + struct.pack("<IQIQ", 1, 256, 13, 0)
    head = b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + kv + info
    head += b"\0" * ((32 - len(head) % 32) % 32)
    path.write_bytes(head + b"\x01" * 176)
    return path


def _rows(tmp_path, tiny):
    good = write_data(tmp_path / "good")
    (tmp_path / "malformed.d").mkdir()
    (tmp_path / "malformed.d" / "train.jsonl").write_text('{"text": "fine"}\n{"text": "cut\n')
    (tmp_path / "empty.d").mkdir()
    (tmp_path / "empty.d" / "train.jsonl").write_text("\n")
    (tmp_path / "schema.d").mkdir()
    (tmp_path / "schema.d" / "train.jsonl").write_text('{"text": "a"}\n{"question": "q", "answer": "a"}\n')
    (tmp_path / "nocfg").mkdir()
    (tmp_path / "badcfg").mkdir()
    (tmp_path / "badcfg" / "config.json").write_text('{"model_type": "llama", ')
    (tmp_path / "mamba").mkdir()
    (tmp_path / "mamba" / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    m = str(tiny)
    return [
        ("missing model folder", ["--model", str(tmp_path / "absent"), "--data", str(good)], "no such folder"),
        ("model folder without config", ["--model", str(tmp_path / "nocfg"), "--data", str(good)],
         "config.json is missing"),
        ("malformed model config", ["--model", str(tmp_path / "badcfg"), "--data", str(good)], "malformed JSON"),
        ("unknown architecture", ["--model", str(tmp_path / "mamba"), "--data", str(good)], "not supported"),
        ("GGUF of an unsupported quant type", ["--model", str(_gguf_with_q5_k(tmp_path / "q5k.gguf")),
                                               "--data", str(good)], "supported tensor types"),
        ("malformed jsonl", ["--model", m, "--data", str(tmp_path / "malformed.d")], "train.jsonl:2: malformed JSON"),
        ("empty jsonl", ["--model", m, "--data", str(tmp_path / "empty.d")], "empty"),
        ("wrong-schema jsonl", ["--model", m, "--data", str(tmp_path / "schema.d")], "train.jsonl:2:"),
        ("sequence longer than the context", ["--model", m, "--data", str(good), "--max-seq-length", "100000"],
         "exceeds the model's context"),
        ("rank that does not fit", ["--model", m, "--data", str(good), "-c", str(_yaml(tmp_path, "rank: 0"))],
         "rank must be >= 1"),
        ("keys that do not fit", ["--model", m, "--data", str(good), "-c",
                                  str(_yaml(tmp_path, "keys: [self_attn.qkv_proj]"))], "not in this model's blocks"),
        ("unknown device profile", ["--model", m, "--data", str(good), "--device-profile", "nokia-3310"],
         "unknown device profile 'nokia-3310' (known: paper-1gb"),
        ("non-positive budget", ["--model", m, "--data", str(good), "--budget-mb", "0"], "must be positive"),
        ("unwritable adapter path", ["--model", m, "--data", str(good), "--adapter-path", str(blocker / "out")],
         "cannot write to"),
    ]


def _yaml(tmp_path, line):
    path = tmp_path / f"lora{abs(hash(line))}.yaml"
    path.write_text(f"lora_parameters:\n  {line}\n")
    return path


def test_bad_input_matrix(tiny_models, tmp_path, capsys):
    for name, args, message in _rows(tmp_path, tiny_models["qwen2"]):
        out = tmp_path / f"out-{name.replace(' ', '_')}"
        if "--adapter-path" not in args:
            args = [*args, "--adapter-path", str(out)]
        rc = main(["train", *args, "--iters", "2", "--no-plot"])
        err = capsys.readouterr().err
        assert rc == 2, name
        assert err.startswith("mesp-mlx: error: ") and message in err, (name, err)
        assert not out.exists() or not any(out.iterdir()), name  # nothing written


def test_adapter_of_another_model_is_refused_before_anything_is_written(tiny_models, tmp_path, capsys):
    data = write_data(tmp_path / "d")
    assert main(["train", "--model", str(tiny_models["llama"]), "--data", str(data), "--iters", "1",
                 "--adapter-path", str(tmp_path / "llama"), "--no-plot"]) == 0
    out = tmp_path / "qwen"
    rc = main(["train", "--model", str(tiny_models["qwen2"]), "--data", str(data), "--iters", "1", "--no-plot",
               "--adapter-path", str(out), "--resume-adapter-file", str(tmp_path / "llama" / "adapters.safetensors")])
    assert rc == 2 and "model.layers." in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
