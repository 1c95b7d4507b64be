"""Adapter conversion PEFT <-> mlx-lm and fuse, on tiny models."""

import json
import math

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load as mlx_lm_load
from mlx_lm.tuner.lora import LoRALinear

from conftest import randomize_lora
from mesp_mlx.cli import main
from mesp_mlx.adapters.convert import ConvertError, convert
from mesp_mlx.adapters.fuse import fuse
from mesp_mlx.adapters.lora import apply_lora, save_adapters, write_adapter_config
from mesp_mlx.models import load_model

TOKENS = mx.array([[1, 5, 9, 13, 2, 7, 30, 11]])


def _mlx_adapter(model_path, out, std=0.05, scale=20.0, keys=("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"), num_layers=2):
    model = load_model(str(model_path)).model
    apply_lora(model, num_layers, {"rank": 4, "scale": scale, "dropout": 0.0, "keys": list(keys)})
    randomize_lora(model, std=std)
    save_adapters(model, out / "adapters.safetensors")
    write_adapter_config(out, num_layers, {"rank": 4, "scale": scale, "dropout": 0.0, "keys": list(keys)},
                         extra={"model": str(model_path)})
    return out


def _logits(model_path, adapter=None):
    model, _ = mlx_lm_load(str(model_path), adapter_path=str(adapter) if adapter else None)
    return model(TOKENS).astype(mx.float32)


def test_mlx_to_peft_to_mlx_is_bit_identical(tiny_models, tmp_path):
    src = _mlx_adapter(tiny_models["qwen2"], tmp_path / "mlx")
    convert(str(src), str(tmp_path / "peft"), "peft")
    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (peft_cfg["r"], peft_cfg["lora_alpha"]) == (4, 80.0)
    assert peft_cfg["target_modules"] == ["down_proj", "q_proj", "v_proj"] and peft_cfg["layers_to_transform"] == [1, 2]
    peft = mx.load(str(tmp_path / "peft" / "adapter_model.safetensors"))
    a = peft["base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight"]
    b = peft["base_model.model.model.layers.2.self_attn.q_proj.lora_B.weight"]
    assert a.shape == (4, 64) and b.shape == (64, 4)  # [r, in], [out, r]
    down_a = peft["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"]
    assert down_a.shape == (4, 128)
    convert(str(tmp_path / "peft"), str(tmp_path / "back"), "mlx-lm")
    orig, back = mx.load(str(src / "adapters.safetensors")), mx.load(str(tmp_path / "back" / "adapters.safetensors"))
    assert set(orig) == set(back)
    assert all(mx.array_equal(orig[k], back[k]).item() and orig[k].dtype == back[k].dtype for k in orig)
    c1 = json.loads((src / "adapter_config.json").read_text())
    c2 = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert c2["num_layers"] == c1["num_layers"] == 2
    assert {k: c2["lora_parameters"][k] for k in ("rank", "scale", "dropout")} == \
           {k: c1["lora_parameters"][k] for k in ("rank", "scale", "dropout")}
    assert c2["lora_parameters"]["keys"] == ["mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj"]
    assert mx.abs(_logits(tiny_models["qwen2"], tmp_path / "back") - _logits(tiny_models["qwen2"], src)).max() == 0


def _peft_adapter(out, model_path, ranks: dict, alphas: dict, default_r, default_alpha, rslora=False):
    """A PEFT adapter on q_proj / down_proj of blocks 0-2 with per-module ranks and alphas."""
    model = load_model(str(model_path)).model
    mx.random.seed(7)
    tensors, expected = {}, {}
    for i in range(3):
        for mod in ("self_attn.q_proj", "mlp.down_proj"):
            name = f"model.layers.{i}.{mod}"
            lin = model.model.layers[i]
            for part in mod.split("."):
                lin = getattr(lin, part)
            d_out, d_in = lin.weight.shape[0], lin.weight.shape[1] * 32 // lin.bits
            r = ranks.get(name, default_r)
            alpha = alphas.get(mod.split(".")[-1], default_alpha)
            tensors[f"base_model.model.{name}.lora_A.weight"] = 0.1 * mx.random.normal((r, d_in))
            tensors[f"base_model.model.{name}.lora_B.weight"] = 0.1 * mx.random.normal((d_out, r))
            expected[name] = (r, alpha / (math.sqrt(r) if rslora else r))
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "adapter_model.safetensors"), tensors)
    cfg = {"peft_type": "LORA", "r": default_r, "lora_alpha": default_alpha, "target_modules": ["q_proj", "down_proj"],
           "rank_pattern": {k: v for k, v in ranks.items()}, "alpha_pattern": alphas, "use_rslora": rslora,
           "base_model_name_or_path": "Qwen/whatever", "lora_dropout": 0.0, "bias": "none"}
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return tensors, expected


def _reference_logits(model_path, tensors, expected):
    """PEFT's own semantics, by hand: LoRALinear per module with its own rank and scale."""
    model, _ = mlx_lm_load(str(model_path))
    for name, (r, scale) in expected.items():
        parent = model
        *path, leaf = name.split(".")
        for p in path:
            parent = parent[int(p)] if p.isdigit() else getattr(parent, p)
        lora = LoRALinear.from_base(getattr(parent, leaf), r=r, scale=scale)
        lora.lora_a = tensors[f"base_model.model.{name}.lora_A.weight"].T
        lora.lora_b = tensors[f"base_model.model.{name}.lora_B.weight"].T
        setattr(parent, leaf, lora)
    return model(TOKENS).astype(mx.float32)


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_with_rank_and_alpha_patterns_gives_the_same_logits_in_mlx_lm(tiny_models, tmp_path, rslora):
    path = tiny_models["qwen2"]
    tensors, expected = _peft_adapter(tmp_path / "peft", path, ranks={"model.layers.1.self_attn.q_proj": 2},
                                      alphas={"down_proj": 4.0}, default_r=6, default_alpha=12.0, rslora=rslora)
    report = convert(str(tmp_path / "peft"), str(tmp_path / "mlx"), "mlx-lm", model=str(path))
    assert report["rank"] == 6 and report["padded"] == ["model.layers.1.self_attn.q_proj"]
    assert report["scale_folded"] and report["num_layers"] == 3
    ref = _reference_logits(path, tensors, expected)
    ours = _logits(path, tmp_path / "mlx")  # plain mlx-lm loading the converted adapter
    assert mx.abs(ours - ref).max().item() <= 1e-5
    assert mx.abs(ref - _logits(path)).max().item() > 1e-2  # the adapter really changes the model


def test_adapter_for_another_model_is_refused_naming_the_tensor(tiny_models, tmp_path, capsys):
    _peft_adapter(tmp_path / "peft", tiny_models["qwen2"], {}, {}, 4, 8.0)
    with pytest.raises(ConvertError, match=r"model\.layers\.0\.mlp\.down_proj maps 128 -> 64 .* 160 -> 64"):
        convert(str(tmp_path / "peft"), str(tmp_path / "out"), "mlx-lm", model=str(tiny_models["llama"]))
    assert not (tmp_path / "out").exists()
    assert main(["convert", str(tmp_path / "peft"), str(tmp_path / "out"), "--to", "mlx-lm", "--model",
                 str(tiny_models["llama"])]) == 2
    assert "another model" in capsys.readouterr().err


def test_bad_peft_inputs_are_refused(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    mx.save_safetensors(str(bad / "adapter_model.safetensors"),
                        {"base_model.model.model.embed_tokens.lora_embedding_A": mx.zeros((2, 3))})
    (bad / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    with pytest.raises(ConvertError, match="lora_embedding_A is not a LoRA A/B matrix"):
        convert(str(bad), str(tmp_path / "o"), "mlx-lm")
    (bad / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4, "use_dora": True}))
    with pytest.raises(ConvertError, match="DoRA"):
        convert(str(bad), str(tmp_path / "o"), "mlx-lm")
    with pytest.raises(ConvertError, match="neither"):
        convert(str(tmp_path), str(tmp_path / "o"), "peft")


def test_dtype_cast(tiny_models, tmp_path):
    src = _mlx_adapter(tiny_models["qwen2"], tmp_path / "mlx")
    convert(str(src), str(tmp_path / "peft"), "peft", dtype="bfloat16")
    assert {v.dtype for v in mx.load(str(tmp_path / "peft" / "adapter_model.safetensors")).values()} == {mx.bfloat16}


def test_fuse_dequantized_equals_the_adapter_model(tiny_models, tmp_path):
    path = tiny_models["llama"]
    adapter = _mlx_adapter(path, tmp_path / "a")
    assert main(["fuse", "--model", str(path), "--adapter-path", str(adapter), "--save-path", str(tmp_path / "f"),
                 "--dequantize"]) == 0
    fused = _logits(tmp_path / "f")
    assert mx.abs(fused - _logits(path, adapter)).max().item() <= 1e-4
    cfg = json.loads((tmp_path / "f" / "config.json").read_text())
    assert "quantization" not in cfg


def test_fuse_requantized_reports_the_surviving_delta(tiny_models, tmp_path, capsys):
    path = tiny_models["qwen2"]
    small = _mlx_adapter(path, tmp_path / "small", std=0.01, scale=0.01)
    r = fuse(str(path), str(small), str(tmp_path / "f1"))
    assert r["low"] and max(l["kept"] for l in r["layers"]) < 0.1  # a delta far below the 4-bit grid step is wiped
    assert "fuse with --dequantize" in capsys.readouterr().out
    big = _mlx_adapter(path, tmp_path / "big", std=0.3, scale=20.0)
    r = fuse(str(path), str(big), str(tmp_path / "f2"))
    assert not r["low"] and min(l["kept"] for l in r["layers"]) > 0.85
    model, _ = mlx_lm_load(str(tmp_path / "f2"))  # a loadable, still 4-bit mlx-lm folder
    assert any(k.endswith("scales") for k, _ in tree_flatten(model.parameters()))
    r = fuse(str(path), str(big), str(tmp_path / "f3"), bits=8)
    assert min(l["kept"] for l in r["layers"]) > 0.98
    cfg = json.loads((tmp_path / "f3" / "config.json").read_text())
    assert cfg["quantization"]["model.layers.2.self_attn.q_proj"]["bits"] == 8
    mlx_lm_load(str(tmp_path / "f3"))
