"""Every recipe is a valid run configuration; the paper recipes run end to end (hub model swapped for a local one)."""

import json
from pathlib import Path

import pytest

from mesp_mlx.cli import main
from mesp_mlx.run.config import build_config
from mesp_mlx.run.metrics import MetricsLog

RECIPES = sorted(Path(__file__).resolve().parent.parent.joinpath("recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_is_a_valid_config(recipe):
    cfg = build_config(str(recipe), {})
    cfg.validate()
    if recipe.stem.startswith("qwen2.5"):
        size, method = recipe.stem.split("-")[1:]
        assert cfg.model == f"mlx-community/Qwen2.5-{size.upper()}-Instruct-4bit" and cfg.method == method
        assert (cfg.optimizer, cfg.learning_rate, cfg.batch_size, cfg.max_seq_length) == ("sgd", 1e-4, 1, 257)
        assert cfg.lora_parameters["rank"] == 8 and len(cfg.lora_parameters["keys"]) == 7


def test_shakespeare_data_and_a_paper_recipe_run(tiny_models, tmp_path):
    data = tmp_path / "shakespeare"
    assert main(["make-data", "--corpus", "shakespeare", "--plays", "hamlet,macbeth", "--out", str(data)]) == 0
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    assert len(rows) > 100 and all(set(r) == {"text"} and len(r["text"]) >= 1000 for r in rows)
    assert "Hamlet: " in " ".join(r["text"] for r in rows)
    out = tmp_path / "run"
    assert main(["train", "-c", str(RECIPES[0].parent / "qwen2.5-0.5b-mesp.yaml"), "--model", str(tiny_models["qwen2"]),
                 "--data", str(data), "--iters", "2", "--max-seq-length", "65", "--adapter-path", str(out),
                 "--no-plot"]) == 0
    records = MetricsLog.read(out / "metrics.jsonl")
    assert len(records) == 2 and records[0]["seq_len"] == 64
    assert json.loads((out / "adapter_config.json").read_text())["method"] == "mesp"
