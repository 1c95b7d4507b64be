"""Every described family, tiny and 4-bit: the engine's loss and every LoRA gradient under MeBP's rule, MeSP's hand
rule and MeSP's generic rule equal whole-model autodiff of mlx-lm's own model with mlx-lm's LoRA (fp32, rel <= 1e-5),
on sequences longer than the sliding window; one SGD step equals `python -m mlx_lm lora`'s from the same adapter."""

import os
import subprocess
import sys
import warnings

import mlx.core as mx
import mlx.nn as nn
import pytest
import yaml
from mlx_lm.tuner.lora import LoRALinear

from conftest import assert_same_adapter, flat, masked_ce, max_rel_err, randomize_lora
from mesp_mlx.engine import Batch, BlockEngine, WeightStreamer
from mesp_mlx.adapters.lora import apply_lora, save_adapters
from mesp_mlx.methods.mesp import to_mesp_lora
from mesp_mlx.methods import MeBP, MeSP
from mesp_mlx.methods.mesp import unsupported_reason
from mesp_mlx.models import ModelParts, cast_float_params, family_lora_parameters, load_model, set_compute_path
from mesp_mlx.models.families.tiny import TINY_FAMILIES, WINDOW, tiny_config
from mesp_mlx.models.synthetic import write_random_model

TOL = 1e-5
T = 21  # > WINDOW: the sliding-window masks are real window masks, not the plain causal mask


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    # weights of std 0.05 (~0.4 / sqrt(hidden 64)): at the default 0.02 the LoRA branch dwarfed the frozen path and
    # fp32 autodiff of mlx-lm's own model disagreed with itself by up to 2.4e-5 (gemma3_text; the whole batch against
    # the sum of its rows, the same math) on an AVX-512 machine, above the 1e-5 bound; at 0.05, <= 3.8e-6 everywhere
    return {f: write_random_model(root / f, tiny_config(f), bits=4, group_size=32, seed=i, weight_std=0.05)
            for i, f in enumerate(TINY_FAMILIES)}


def _prepared(path, stream=False):
    lm = load_model(str(path))
    model = lm.model
    set_compute_path(model, "dequant")
    cast_float_params(model, "float32")
    streamer = WeightStreamer(lm.path, model, model.layers) if stream else None
    apply_lora(model, -1, family_lora_parameters(model, {"rank": 4, "scale": 20.0, "dropout": 0.0}))
    randomize_lora(model)
    if streamer:
        streamer.release_all()
    return model, streamer


def _batch(vocab=384, seed=1):
    mx.random.seed(seed)
    tokens = mx.random.randint(0, vocab, (2, T + 1))
    return Batch.from_mlx_lm(tokens, mx.array([[3, T + 1], [0, 15]]))  # prompt masking and padding


def _engine(model, method, streamer=None, lanes=1):
    parts = ModelParts(model, streamer=streamer)
    stats, grads = BlockEngine(parts, method, None, streamer=streamer, vocab_chunk=100,
                               lanes=lanes).step(_batch(), apply_update=False)
    out = {}
    for i, g in grads.items():
        out.update({f"{parts.family.layers_path}.{i}.{k}": v for k, v in flat(g).items()})  # model.layers, ...
    return stats.loss, out


RULES = {"mebp": lambda: MeBP(), "mesp-hand": lambda: MeSP(), "mesp-generic": lambda: MeSP(hand_rules=False)}


@pytest.mark.parametrize("lanes", [1, 2])
@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_engine_equals_mlx_lm_autodiff(family_models, family, rule, lanes):
    model, _ = _prepared(family_models[family])
    assert type(model.layers[0].self_attn.o_proj) is LoRALinear
    loss_ref, ref = nn.value_and_grad(model, masked_ce)(model, _batch())  # mlx-lm's model, mlx-lm's LoRALinear
    ref = flat(ref)
    if rule != "mebp":
        to_mesp_lora(model)
    if rule == "mesp-hand":
        assert unsupported_reason(model.layers[0]) is None, family
    with warnings.catch_warnings():
        warnings.simplefilter("error" if rule == "mesp-hand" else "ignore")  # the hand rule itself, no fallback
        loss, grads = _engine(model, RULES[rule](), lanes=lanes)  # lanes 2: one row per thread (engine/lanes.py)
    assert abs(loss - loss_ref.item()) <= TOL * abs(loss_ref.item())
    assert set(grads) == set(ref) and ref
    for k in ref:
        assert max_rel_err(grads[k], ref[k]) <= TOL, k


# generic-tier families whose walk needs a description (families/walks.py) or whose blocks need the cache argument
# (stablelm), 4-bit from disk; the untied heads are the branches the sweep's tied configuration leaves off (no tied
# minicpm folder: mlx-lm's sanitize adds an lm_head the tied model lacks, so mlx-lm cannot load one)
WALKED = [("helium", False), ("olmo3", True), ("stablelm", False), ("cohere", True), ("cohere2", True),
          ("minicpm", False), ("internlm2", False), ("internlm2", True), ("exaone", False), ("exaone", True),
          ("gpt_neox", False)]


@pytest.mark.parametrize("rule", ["mebp", "mesp-generic"])
@pytest.mark.parametrize("family,tied", WALKED)
def test_walked_generic_families_equal_mlx_lm_autodiff(family, tied, rule, tmp_path):
    from mesp_mlx.support.sweep import GENERIC_CONFIG

    config = {**GENERIC_CONFIG, "model_type": family, "tie_word_embeddings": tied, "logit_scale": 0.3}
    path = write_random_model(tmp_path / family, config, bits=4, group_size=32, weight_std=0.05)
    model, _ = _prepared(path)
    assert ModelParts(model).family.name == family
    loss_ref, ref = nn.value_and_grad(model, masked_ce)(model, _batch())
    ref = flat(ref)
    streamer = None
    if rule != "mebp":  # MeSP with the weights streamed from disk (the embedding and head under their own names)
        model, streamer = _prepared(path, stream=True)
        to_mesp_lora(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss, grads = _engine(model, RULES[rule](), streamer)
    assert abs(loss - loss_ref.item()) <= TOL * abs(loss_ref.item())
    assert set(grads) == set(ref) and ref
    for k in ref:
        assert max_rel_err(grads[k], ref[k]) <= TOL, k


def test_window_masks_are_exact_per_layer(family_models):
    """Gemma 3 and Mistral (layer_types) get a real window mask on their sliding layers, causal on the others."""
    for family, sliding in (("gemma3_text", [True, False, True]), ("mistral", [True, False, True])):
        model, _ = _prepared(family_models[family])
        parts = ModelParts(model)
        h = mx.zeros((1, T, 64))
        for layer, is_sliding in zip(parts.layers, sliding):
            mask = parts.block_mask(layer, h)
            if is_sliding:
                assert isinstance(mask, mx.array) and mask[T - 1, T - 1 - WINDOW].item() is False
                assert mask[T - 1, T - WINDOW].item() is True
            else:
                assert mask == "causal"


@pytest.mark.parametrize("family", ["gemma3_text", "phi3", "granite"])
def test_streamed_weights_give_the_same_gradients(family_models, family):
    model, _ = _prepared(family_models[family])
    loss_ref, ref = nn.value_and_grad(model, masked_ce)(model, _batch())
    model, streamer = _prepared(family_models[family], stream=True)
    to_mesp_lora(model)
    loss, grads = _engine(model, MeSP(), streamer, lanes=2)  # blocks read from disk, then split over two threads
    assert abs(loss - loss_ref.item()) <= TOL * abs(loss_ref.item())
    for k, v in flat(ref).items():
        assert max_rel_err(grads[k], v) <= TOL, k


def test_gemma3_folder_trains_its_text_model():
    """A gemma3 (multimodal) model: the engine walks its language_model exactly."""
    from mlx_lm.models import gemma3

    text = tiny_config("gemma3_text")
    args = gemma3.ModelArgs.from_dict({"model_type": "gemma3", "vocab_size": 384, "text_config": text})
    model = gemma3.Model(args)
    model.language_model.pop("lm_head")
    model.language_model.tie_word_embeddings = True
    mx.random.seed(0)
    model.update(nn.utils.tree_map(lambda x: 0.05 * mx.random.normal(x.shape), model.parameters()))
    apply_lora(model, -1, family_lora_parameters(model, {"rank": 4, "scale": 20.0, "dropout": 0.0}))
    randomize_lora(model)
    loss_ref, ref = nn.value_and_grad(model, masked_ce)(model, _batch())
    to_mesp_lora(model)
    parts = ModelParts(model)
    stats, grads = BlockEngine(parts, MeSP(), None).step(_batch(), apply_update=False)
    assert abs(stats.loss - loss_ref.item()) <= TOL * abs(loss_ref.item())
    ref = flat(ref)
    for i, g in grads.items():
        for k, v in flat(g).items():
            assert max_rel_err(v, ref[f"language_model.model.layers.{i}.{k}"]) <= TOL


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_one_sgd_step_matches_mlx_lm_lora(family_models, family, tmp_path):
    """From the same (random, non-zero) adapter, one SGD step of `mesp-mlx train --method mesp` equals
    `python -m mlx_lm lora`'s (rel diff <= 1e-3; 4-bit weights, mlx-lm on its quantized matmul)."""
    from mesp_mlx.cli import main
    from test_train_cli import CHAT, write_data

    data = write_data(tmp_path / "data", records=CHAT[:1])
    model, _ = _prepared(family_models[family])
    keys = family_lora_parameters(model, None)["keys"]
    start = tmp_path / "start.safetensors"
    save_adapters(model, start)
    cfg = tmp_path / "lora.yaml"
    cfg.write_text(yaml.safe_dump({"lora_parameters": {"rank": 4, "scale": 20.0, "dropout": 0.0, "keys": keys}}))
    common = ["--data", str(data), "--iters", "1", "--batch-size", "1", "--learning-rate", "0.5", "--optimizer", "sgd",
              "--num-layers", "3", "--max-seq-length", "512", "--resume-adapter-file", str(start), "-c", str(cfg)]
    theirs = tmp_path / "theirs"
    proc = subprocess.run([sys.executable, "-m", "mlx_lm", "lora", "--train", "--model", str(family_models[family]),
                           "--adapter-path", str(theirs), "--steps-per-eval", "1000", "--val-batches", "1", *common],
                          capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours = tmp_path / "ours"
    assert main(["train", "--model", str(family_models[family]), "--method", "mesp", "--adapter-path", str(ours),
                 "--no-plot", *common]) == 0
    assert_same_adapter(ours / "adapters.safetensors", theirs / "adapters.safetensors", start)


@pytest.mark.parametrize("family", ["gemma3_text", "phi3", "starcoder2"])
def test_plan_train_streamed_resume_convert_fuse(family, family_models, tmp_path, capsys):
    """The CLI around a family: plan, train (streamed weights, mmap checkpoints, sequences past the window), resume
    to the same adapter as one run, convert to PEFT and back, fuse. starcoder2 stands for the generic tier."""
    from mesp_mlx.cli import main
    from mesp_mlx.support.sweep import GENERIC_CONFIG
    from test_train_cli import write_data

    if family in family_models:
        model = family_models[family]
    else:
        model = write_random_model(tmp_path / family, {**GENERIC_CONFIG, "model_type": family},
                                   bits=4, group_size=32)
    data = write_data(tmp_path / "data")
    run = ["--model", str(model), "--data", str(data), "--optimizer", "adamw", "--learning-rate", "1e-3",
           "--max-seq-length", "40", "--stream-weights", "--checkpoint-storage", "mmap", "--no-plot",
           "--steps-per-eval", "0", "--save-every", "2"]
    assert main(["plan", *run, "--budget-mb", "4096"]) == 0
    assert "predicted peak" in capsys.readouterr().out
    one = tmp_path / "one"
    assert main(["train", *run, "--iters", "4", "--adapter-path", str(one), "--budget-mb", "4096"]) == 0  # governed
    two = tmp_path / "two"
    assert main(["train", *run, "--iters", "2", "--adapter-path", str(two)]) == 0
    assert main(["train", *run, "--iters", "4", "--adapter-path", str(two), "--resume"]) == 0
    a, b = mx.load(str(one / "adapters.safetensors")), mx.load(str(two / "adapters.safetensors"))
    assert set(a) == set(b) and all(mx.array_equal(a[k], b[k]).item() for k in a)
    peft, back = tmp_path / "peft", tmp_path / "back"
    assert main(["convert", str(one), str(peft), "--to", "peft", "--model", str(model)]) == 0
    assert main(["convert", str(peft), str(back), "--to", "mlx-lm", "--model", str(model)]) == 0
    c = mx.load(str(back / "adapters.safetensors"))
    assert set(c) == set(a) and all(max_rel_err(c[k], a[k]) <= 1e-6 for k in a)
    assert main(["fuse", "--model", str(model), "--adapter-path", str(one), "--save-path", str(tmp_path / "fused")]) == 0
    assert (tmp_path / "fused" / "config.json").is_file()


def test_gemma_norm_and_gelu_gate_backward_equal_autodiff():
    """The pieces Gemma 3 adds: RMSNorm with weight 1 + w, and act(gate) * up with GELU-tanh."""
    from mlx_lm.models.gemma3_text import RMSNorm

    from mesp_mlx.engine import fastmath
    from mesp_mlx.methods.vjp import gated_backward, gated_forward, rms_norm_backward

    mx.random.seed(7)
    norm = RMSNorm(48, eps=1e-6)
    norm.weight = 0.3 * mx.random.normal((48,))
    x, g = mx.random.normal((2, 5, 48)), mx.random.normal((2, 5, 48))
    _, (ref,) = mx.vjp(norm, [x], [g])
    assert max_rel_err(rms_norm_backward(norm, x, g, offset=1.0), ref) <= TOL
    gate, up, g = (mx.random.normal((3, 7, 40)) * 3 for _ in range(3))
    _, refs = mx.vjp(lambda a, b: nn.gelu_approx(a) * b, [gate, up], [g])
    a, t = gated_forward("gelu_tanh", gate, up)
    if mx.default_device() == mx.cpu:  # the same bits as mlx-lm's MLP (its compiled gelu_approx), whole or in blocks
        assert mx.array_equal(a, nn.gelu_approx(gate) * up)
        old, fastmath.CHUNK = fastmath.CHUNK, 40  # 21 row blocks of one row
        try:
            a_blocks, t_blocks = gated_forward("gelu_tanh", gate, up)
        finally:
            fastmath.CHUNK = old
        assert mx.array_equal(a_blocks, a) and mx.array_equal(t_blocks, t)
    assert max_rel_err(a, nn.gelu_approx(gate) * up) <= 1e-6
    for state in (None, t):  # recomputed, or the forward's tanh reused
        for ours, theirs in zip(gated_backward("gelu_tanh", gate, up, g, state), refs):
            assert max_rel_err(ours, theirs) <= TOL


def test_gemma3_folder_streams_its_text_model(family_models, tmp_path):
    """A gemma3 folder (text model under language_model.): streamed weights and the hand rule give mlx-lm's autodiff."""
    import json
    import shutil

    src = family_models["gemma3_text"]
    folder = tmp_path / "gemma3"
    folder.mkdir()
    for f in src.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, folder / f.name)
    weights = {}
    for f in src.glob("model*.safetensors"):
        weights.update({f"language_model.{k}": v for k, v in mx.load(str(f)).items()})
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    config = json.loads((src / "config.json").read_text())
    quant = {k: config.pop(k) for k in ("quantization", "quantization_config")}
    (folder / "config.json").write_text(json.dumps({"model_type": "gemma3", "vocab_size": config["vocab_size"],
                                                    "text_config": config, **quant}))
    model, _ = _prepared(folder)
    loss_ref, ref = nn.value_and_grad(model, masked_ce)(model, _batch())
    model, streamer = _prepared(folder, stream=True)
    to_mesp_lora(model)
    parts = ModelParts(model, streamer=streamer)
    assert parts.family.name == "gemma3" and parts.windows == [WINDOW, None, WINDOW]
    stats, grads = BlockEngine(parts, MeSP(), None, streamer=streamer).step(_batch(), apply_update=False)
    assert abs(stats.loss - loss_ref.item()) <= TOL * abs(loss_ref.item())
    ref = flat(ref)
    assert len(grads) == 3
    for i, g in grads.items():
        for k, v in flat(g).items():
            assert max_rel_err(v, ref[f"language_model.model.layers.{i}.{k}"]) <= TOL, k
