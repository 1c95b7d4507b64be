"""Every setting is type- and range-checked before anything runs: one line naming the YAML key or the flag, exit 2,
nothing written; mlx-lm keys that cannot change training say so; a parameter that turns NaN is caught by name."""

import pytest

from mesp_mlx.cli import main
from test_train_cli import write_data

YAML_ROWS = [  # (class, YAML text, words the one line must hold)
    ("a learning rate that is a word", "learning_rate: fast\n", ["'learning_rate'", "finite number"]),
    ("a NaN learning rate", "learning_rate: .nan\n", ["'learning_rate'", "finite number"]),
    ("a negative learning rate", "learning_rate: -1e-3\n", ["'learning_rate'", "must be in"]),
    ("a rank that is not an integer", "lora_parameters:\n  rank: 2.5\n", ["'lora_parameters'", "rank must be an int"]),
    ("lora_parameters that is not a mapping", "lora_parameters: 8\n", ["'lora_parameters'", "mapping"]),
    ("a dropout out of range", "lora_parameters:\n  dropout: 1.5\n", ["'lora_parameters'", "dropout"]),
    ("a batch size that is a float", "batch_size: 2.0\n", ["'batch_size'", "integer"]),
    ("a boolean that is a string", "mask_prompt: sure\n", ["'mask_prompt'", "true or false"]),
    ("an unknown optimizer", "optimizer: lion\n", ["'optimizer'", "adam, adamw, sgd, adafactor, muon"]),
    ("an unknown optimizer argument", "optimizer_config:\n  adam:\n    momentum: 0.9\n",
     ["'optimizer_config'", "adam has no argument 'momentum'"]),
    ("an unknown schedule", "lr_schedule:\n  name: wiggle\n  arguments: [1e-3]\n", ["'lr_schedule'", "cosine_decay"]),
    ("schedule arguments that do not fit", "lr_schedule:\n  name: cosine_decay\n  arguments: [1e-3, a]\n",
     ["'lr_schedule'", "arguments"]),
    ("a negative warmup", "lr_schedule:\n  name: cosine_decay\n  arguments: [1e-3, 10]\n  warmup: -2\n",
     ["'lr_schedule'", "warmup"]),
    ("zero accumulation steps", "grad_accumulation_steps: 0\n", ["'grad_accumulation_steps'", ">= 1"]),
    ("full fine-tuning", "fine_tune_type: full\n", ["'fine_tune_type'", "frozen 4-bit"]),
    ("an unknown key", "hf_dataset: {name: x}\n", ["unknown key 'hf_dataset'"]),
    ("MeZO asked to accumulate", "method: mezo\ngrad_accumulation_steps: 2\n", ["'grad_accumulation_steps'", "MeZO"]),
]
FLAG_ROWS = [
    ("a learning rate flag that is a word", ["--learning-rate", "fast"], ["--learning-rate", "invalid float"]),
    ("a NaN learning rate flag", ["--learning-rate", "nan"], ["--learning-rate", "finite number"]),
    ("a negative learning rate flag", ["--learning-rate", "-0.1"], ["--learning-rate", "must be in"]),
    ("zero accumulation steps flag", ["--grad-accumulation-steps", "0"], ["--grad-accumulation-steps", ">= 1"]),
    ("full fine-tuning flag", ["--fine-tune-type", "full"], ["--fine-tune-type", "frozen 4-bit"]),
]


def _check(rc, err, out, words):
    assert rc == 2
    assert err.startswith("mesp-mlx: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert all(w in err for w in words), (words, err)
    assert not out.exists() or not any(out.iterdir())  # nothing written


@pytest.mark.parametrize("name,text,words", YAML_ROWS, ids=[r[0] for r in YAML_ROWS])
def test_bad_yaml_setting(tiny_models, tmp_path, capsys, name, text, words):
    data = write_data(tmp_path / "data")
    yml = tmp_path / "run.yaml"
    yml.write_text(text)
    out = tmp_path / "out"
    rc = main(["train", "-c", str(yml), "--model", str(tiny_models["qwen2"]), "--data", str(data), "--iters", "1",
               "--adapter-path", str(out), "--no-plot"])
    err = capsys.readouterr().err
    _check(rc, err, out, words + ([str(yml)] if "unknown key" not in words[0] else []))


@pytest.mark.parametrize("name,flags,words", FLAG_ROWS, ids=[r[0] for r in FLAG_ROWS])
def test_bad_flag(tiny_models, tmp_path, capsys, name, flags, words):
    data = write_data(tmp_path / "data")
    out = tmp_path / "out"
    rc = main(["train", "--model", str(tiny_models["qwen2"]), "--data", str(data), "--iters", "1",
               "--adapter-path", str(out), "--no-plot", *flags])
    _check(rc, capsys.readouterr().err, out, words)


def test_keys_without_effect_say_so_once(tiny_models, tmp_path, capsys):
    data = write_data(tmp_path / "data")
    yml = tmp_path / "run.yaml"
    yml.write_text("grad_checkpoint: true\nreport_to: wandb\nlearning_rate: 1e-3\n")
    out = tmp_path / "out"
    assert main(["train", "-c", str(yml), "--model", str(tiny_models["qwen2"]), "--data", str(data), "--iters", "1",
                 "--adapter-path", str(out), "--no-plot"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("'grad_checkpoint'") == 1 and "always block-checkpointed" in printed
    assert "nothing leaves the machine" in printed


def test_a_parameter_that_turns_nan_stops_before_saving(tiny_models, tmp_path, capsys):
    """A finite gradient with an infinite learning rate (the schedule overflows at step 2) makes the parameters
    non-finite: caught after the update, naming the step and the block; the adapter saved at step 1 stays."""
    import mlx.core as mx

    data = write_data(tmp_path / "data")
    out = tmp_path / "out"
    assert main(["train", "--model", str(tiny_models["qwen2"]), "--data", str(data), "--iters", "2",
                 "--optimizer", "sgd", "--learning-rate", "1e-3", "--adapter-path", str(out), "--no-plot",
                 "--save-every", "1"]) == 0
    saved = mx.load(str(out / "adapters.safetensors"))
    yml = tmp_path / "big.yaml"
    yml.write_text("optimizer: sgd\nlr_schedule:\n  name: exponential_decay\n  arguments: [1e-3, 1e300]\n")
    rc = main(["train", "-c", str(yml), "--model", str(tiny_models["qwen2"]), "--data", str(data), "--iters", "4",
               "--adapter-path", str(tmp_path / "big"), "--no-plot", "--save-every", "1",
               "--resume-adapter-file", str(out / "adapters.safetensors")])
    printed = capsys.readouterr().out
    assert rc == 3 and "step 2: NaN or inf in the LoRA parameters of block" in printed, printed
    after = mx.load(str(tmp_path / "big" / "adapters.safetensors"))  # step 1's save: finite
    assert all(mx.isfinite(v).all().item() for v in after.values()) and set(after) == set(saved)


def test_mlx_lm_flags_without_effect_are_accepted_with_a_note(tiny_models, tmp_path, capsys):
    data = write_data(tmp_path / "data")
    out = tmp_path / "out"
    assert main(["train", "--model", str(tiny_models["qwen2"]), "--data", str(data), "--iters", "1", "--train",
                 "--grad-checkpoint", "--adapter-path", str(out), "--no-plot", "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert "--grad-checkpoint (mlx-lm) has no effect here" in printed and "--train (mlx-lm)" in printed
    assert main(["train", "--model", str(tiny_models["qwen2"]), "--data", str(data), "--seed", str(2**32)]) == 2
