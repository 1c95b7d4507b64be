"""A resume proves it continues the same run: inputs compared by content, saved state verified by its checksum (the
previous generation offered when it is damaged), an adapter's own config honoured, a torn metrics log repaired."""

import json
import shutil

import mlx.core as mx
import pytest

from mesp_mlx.cli import main
from mesp_mlx.io import CHECKSUM_KEY, CorruptFile, load_tensors
from mesp_mlx.run.metrics import MetricsLog
from mesp_mlx.run.state import PREVIOUS_STATE_FILE, STATE_FILE
from test_train_cli import CHAT, write_data


def _args(model, data, out, iters=4, *extra):
    return ["train", "--model", str(model), "--data", str(data), "--iters", str(iters), "--batch-size", "1",
            "--save-every", "2", "--optimizer", "adamw", "--learning-rate", "1e-2", "--no-plot",
            "--adapter-path", str(out), *extra]


def _err_line(capsys):
    """The one error line (notes such as the MeSP rule's may precede it)."""
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("mesp-mlx: error:")]
    assert "Traceback" not in err and len(errors) == 1 and err.endswith(errors[0]), err
    return errors[0]


@pytest.fixture
def copied_model(tiny_models, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_models["qwen2"], model)
    return model


@pytest.fixture
def half_run(copied_model, tmp_path):
    """A run stopped after step 2 of 4 (its state saved), the way --resume finds it."""
    data = write_data(tmp_path / "data", records=CHAT * 2)
    out = tmp_path / "out"
    assert main(_args(copied_model, data, out, 2)) == 0
    return copied_model, data, out


def test_resume_accepts_the_same_folders_however_their_paths_are_written(half_run, tmp_path, monkeypatch):
    model, data, out = half_run
    monkeypatch.chdir(tmp_path)
    assert main(_args(f"./{model.name}/", f"./{data.name}//", out, 4, "--resume")) == 0
    assert [r["step"] for r in MetricsLog.read(out / "metrics.jsonl")] == [1, 2, 3, 4]


def test_resume_refuses_a_model_changed_in_place_naming_it(half_run, capsys):
    model, data, out = half_run
    weights = next(model.glob("model*.safetensors"))
    tensors = dict(mx.load(str(weights)))
    name = next(k for k in tensors if k.endswith("norm.weight"))
    tensors[name] = tensors[name] + 1  # same names, shapes and size: only the content differs
    mx.save_safetensors(str(weights), tensors, metadata={"format": "mlx"})
    before = (out / STATE_FILE).read_bytes()
    assert main(_args(model, data, out, 4, "--resume")) == 2
    err = _err_line(capsys)
    assert "the model differs" in err and weights.name in err
    assert (out / STATE_FILE).read_bytes() == before


def test_resume_refuses_data_changed_in_place_naming_the_file(half_run, capsys):
    model, data, out = half_run
    with open(data / "train.jsonl", "a") as f:
        f.write(json.dumps(CHAT[0]) + "\n")
    assert main(_args(model, data, out, 4, "--resume")) == 2
    err = _err_line(capsys)
    assert "the data differs" in err and "train.jsonl" in err


def test_a_damaged_state_is_refused_and_the_previous_one_offered(copied_model, tmp_path, capsys):
    data = write_data(tmp_path / "data", records=CHAT * 2)
    out = tmp_path / "out"
    assert main(_args(copied_model, data, out, 4)) == 0  # saves after step 2 and step 4
    state, previous = out / STATE_FILE, out / PREVIOUS_STATE_FILE
    assert json.loads(load_tensors(previous)[1]["step"]) == 2 and json.loads(load_tensors(state)[1]["step"]) == 4
    raw = bytearray(state.read_bytes())
    raw[-2048:] = bytes(2048)  # 2 KB zeroed inside the tensors: MLX still reads the file
    state.write_bytes(bytes(raw))
    with pytest.raises(CorruptFile):
        load_tensors(state)
    assert main(_args(copied_model, data, out, 6, "--resume")) == 2
    err = _err_line(capsys)
    assert "is damaged" in err and str(state) in err and "after step 2" in err and str(previous) in err
    # the offered way out works: the previous state resumes, to the uninterrupted run's end
    shutil.move(previous, state)
    assert main(_args(copied_model, data, out, 6, "--resume")) == 0
    ref = tmp_path / "ref"
    assert main(_args(copied_model, data, ref, 6)) == 0
    got, want = mx.load(str(out / "adapters.safetensors")), mx.load(str(ref / "adapters.safetensors"))
    assert all(mx.array_equal(got[k], want[k]).item() for k in want)


def test_damaged_adapters_are_refused_by_every_reader(half_run, tmp_path, capsys):
    model, data, out = half_run
    adapters = out / "adapters.safetensors"
    assert CHECKSUM_KEY in load_tensors(adapters)[1]
    raw = bytearray(adapters.read_bytes())
    raw[-512:] = bytes(512)
    adapters.write_bytes(bytes(raw))
    new = tmp_path / "new"
    assert main(_args(model, data, new, 1, "--resume-adapter-file", str(adapters))) == 2
    assert "is damaged" in _err_line(capsys) and not new.exists()
    assert main(["convert", str(out), str(tmp_path / "peft"), "--to", "peft"]) == 2
    assert "is damaged" in _err_line(capsys)
    assert main(["fuse", "--model", str(model), "--adapter-path", str(out), "--save-path", str(tmp_path / "f")]) == 2
    assert "is damaged" in _err_line(capsys) and not (tmp_path / "f").exists()


def test_an_adapter_whose_config_disagrees_is_refused_or_followed(half_run, tmp_path, capsys):
    """An adapter trained at scale 2.0 used to be continued silently at the default scale 20."""
    model, data, out = half_run
    config = json.loads((out / "adapter_config.json").read_text())
    config["lora_parameters"]["scale"] = 2.0
    (out / "adapter_config.json").write_text(json.dumps(config))
    new = tmp_path / "new"
    assert main(_args(model, data, new, 1, "--resume-adapter-file", str(out / "adapters.safetensors"))) == 2
    err = _err_line(capsys)
    assert "scale 2.0 (this run: 20.0)" in err and "--follow-adapter-config" in err and not new.exists()
    assert main(_args(model, data, new, 1, "--resume-adapter-file", str(out / "adapters.safetensors"),
                      "--follow-adapter-config")) == 0
    assert json.loads((new / "adapter_config.json").read_text())["lora_parameters"]["scale"] == 2.0


def test_a_garbled_metrics_line_loses_no_good_line_on_resume(half_run):
    model, data, out = half_run
    metrics = out / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text(lines[0] + "\n" + '{"step": 1, "lo\x00\x00garbage\n' + "\n".join(lines[1:]) + "\n")
    assert main(_args(model, data, out, 4, "--resume")) == 0
    assert [r["step"] for r in MetricsLog.read(metrics)] == [1, 2, 3, 4]
