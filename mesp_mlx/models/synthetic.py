"""Random-weight models of real shapes, written as mlx-lm folders block by block (no fp32 whole model ever exists).

Used by the tests (tiny Qwen2 / Qwen3 / Llama) and by tools/ benchmarks (Qwen2.5-{0.5B,1.5B,3B} shapes). Each folder has
config.json, sharded 4-bit safetensors with an index, and a small byte-level BPE tokenizer with a ChatML template.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import _get_classes
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .families import LLAMA, WALKS

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SHAPES = {
    # name: (model_type, hidden, layers, intermediate, heads, kv_heads, vocab)
    "qwen2.5-0.5b": ("qwen2", 896, 24, 4864, 14, 2, 151936),
    "qwen2.5-1.5b": ("qwen2", 1536, 28, 8960, 12, 2, 151936),
    "qwen2.5-3b": ("qwen2", 2048, 36, 11008, 16, 2, 151936),
}

def gemma3_1b_config() -> dict:
    """Gemma 3 1B's shape (mlx-community/gemma-3-1b-it: 26 blocks, d 1152, ffn 6912, 4 heads / 1 KV head of 256,
    vocabulary 262,144, tied head, 512-token windows on 5 of every 6 layers)."""
    return {"model_type": "gemma3_text", "hidden_size": 1152, "num_hidden_layers": 26, "intermediate_size": 6912,
            "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "rms_norm_eps": 1e-6,
            "vocab_size": 262144, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
            "query_pre_attn_scalar": 256, "sliding_window": 512, "sliding_window_pattern": 6,
            "max_position_embeddings": 32768}


_CORPUS = (
    "the quick brown fox jumps over the lazy dog. a small model learns to answer questions about memory, "
    "phones, laptops and training. what is the capital of france? paris is the capital of france. "
    "hello, how are you today? i am fine, thank you. low rank adapters fine tune large language models. "
)


def write_tokenizer(out: Path, vocab_size: int = 512) -> None:
    """A byte-level BPE trained on a fixed corpus (deterministic), ChatML template, <|im_end|> as EOS."""

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    with open(out / "tokenizer_config.json", "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                   "bos_token": None, "chat_template": CHATML, "add_bos_token": False}, f, indent=2)


def model_config(model_type: str, hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int, vocab: int,
                 tie: bool = True, head_dim: int | None = None) -> dict:
    config = {
        "model_type": model_type,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": intermediate,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-6,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tie,
    }
    if model_type == "qwen3":
        config["head_dim"] = head_dim or hidden // heads
    return config


def write_random_model(out: str | os.PathLike, config: dict, bits: int | None = 4, group_size: int = 64,
                       seed: int = 0, tokenizer_vocab: int = 512, scales_dtype=mx.float32, weight_std: float = 0.02) -> Path:
    """Write a random model folder. bits=None leaves it unquantized (fp32)."""

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mx.random.seed(seed)
    model_cls, args_cls = _get_classes(config)
    model = model_cls(args_cls.from_dict(config))  # parameters are lazy: nothing is computed yet

    def randomize(module: nn.Module) -> None:
        new = {}
        for k, v in tree_flatten(module.parameters()):
            if v.ndim == 1 and k.endswith("weight"):  # norm scales near 1
                new[k] = mx.ones(v.shape) + 0.1 * mx.random.normal(v.shape)
            elif v.ndim == 1:
                new[k] = 0.02 * mx.random.normal(v.shape)
            else:
                new[k] = weight_std * mx.random.normal(v.shape)
        module.update(tree_unflatten(list(new.items())))

    def quantize(parent: nn.Module, only: str | None = None) -> None:
        """Quantize the linears/embeddings under `parent` (or just its child `only`: nn.quantize never swaps the
        module it is called on, so a lone embedding or head is quantized through its parent)."""
        if bits is not None:
            nn.quantize(parent, group_size=group_size, bits=bits,
                        class_predicate=lambda p, m: (only is None or p == only) and hasattr(m, "to_quantized")
                        and m.weight.shape[-1] % group_size == 0)

    def cast_scales(params: dict) -> dict:
        return {k: (v.astype(scales_dtype) if k.endswith((".scales", ".biases")) else v) for k, v in params.items()}

    weight_map = {}
    shards = []
    # top-level pieces (embedding, final norm, head) in one shard, then one shard per block
    top = {}
    layout = WALKS.get(config["model_type"], LLAMA)  # where the trunk's pieces and the head sit (EXAONE's names, ...)
    trunk, layers = model[layout.trunk_attr], model[layout.trunk_attr][layout.layers_attr]
    for name in (layout.embed_attr, layout.norm_attr):
        randomize(trunk[name])
        if name == layout.embed_attr:
            quantize(trunk, only=name)
        for k, v in tree_flatten(trunk[name].parameters()):
            top[f"{layout.trunk_attr}.{name}.{k}"] = v
    if layout.head(model) is not layout.embedding(model) and not config.get("tie_word_embeddings", True):
        owner, _, head = layout.head_attr.rpartition(".")  # the head's parent: the model or its trunk (GPT-NeoX)
        parent = model[owner] if owner else model
        randomize(parent[head])
        quantize(parent, only=head)
        for k, v in tree_flatten(parent[head].parameters()):
            top[f"{layout.head_attr}.{k}"] = v
    shards.append(("model-top.safetensors", top))
    for i in range(len(layers)):
        layer = layers[i]
        randomize(layer)
        quantize(layer)
        shard = {f"{layout.layers_path}.{i}.{k}": v for k, v in tree_flatten(layer.parameters())}
        shards.append((f"model-block-{i:03d}.safetensors", shard))
    for fname, shard in shards:
        shard = cast_scales(shard)
        mx.eval(shard)
        mx.save_safetensors(str(out / fname), shard, metadata={"format": "mlx"})
        weight_map.update({k: fname for k in shard})
        shard.clear()
        if fname.startswith("model-block-"):
            i = int(fname[len("model-block-"):-len(".safetensors")])
            layers[i] = None  # free the block's arrays
        mx.clear_cache()
    with open(out / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=1)
    config = dict(config)
    if bits is not None:
        config["quantization"] = {"group_size": group_size, "bits": bits}
        config["quantization_config"] = dict(config["quantization"])
    with open(out / "config.json", "w") as f:
        json.dump(config, f, indent=2)
    write_tokenizer(out, min(tokenizer_vocab, config["vocab_size"]))
    return out
