"""The checked support table: every family listed as supported still matches mlx-lm (tiny model, the sweep's checks),
docs/model_families.md is the rendering of support.json, and unsupported families are refused before anything is
written, with the reason."""

import json
from pathlib import Path

import mlx_lm
import pytest

from mesp_mlx.cli import main
from mesp_mlx.models.families import HAND, TABLE_FILE, support_table, supported_types, tier
from mesp_mlx.support.sweep import check_family, model_modules
from mesp_mlx.support.table import render
from mesp_mlx.models.synthetic import model_config

ROOT = Path(__file__).resolve().parent.parent
TABLE = json.loads(TABLE_FILE.read_text())
SUPPORTED = sorted(k for k, r in TABLE.items() if r["tier"] != "refused")


def test_table_covers_every_mlx_lm_module_and_the_docs_are_current():
    assert set(TABLE) == set(model_modules()), "run tools/family_table.py (mlx-lm's modules changed)"
    assert (ROOT / "docs" / "model_families.md").read_text() == render(TABLE, mlx_lm.__version__)
    for name, family in HAND.items():
        if name in TABLE:
            assert TABLE[name]["tier"] == ("hand" if family.hand_rule else "generic"), name
    assert len(SUPPORTED) >= 9


@pytest.mark.parametrize("name", SUPPORTED)
def test_supported_family_still_matches_mlx_lm(name):
    assert check_family(name) == (TABLE[name]["tier"], TABLE[name]["reason"])


def test_tiers_at_run_time():
    assert tier("mistral")[0] == "hand"  # mlx-lm maps mistral to llama
    assert tier("mamba")[0] == "refused" and "state across positions" in tier("mamba")[1]
    assert tier("no_such_family")[0] == "refused"
    assert "gemma3_text" in supported_types() and "mixtral" not in supported_types()
    assert support_table() == TABLE


def test_an_unsupported_family_is_refused_before_anything_is_written(tmp_path, capsys):
    from mesp_mlx.models.synthetic import write_tokenizer

    folder = tmp_path / "mamba"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**model_config("llama", 64, 1, 128, 4, 2, 384),
                                                    "model_type": "mamba"}))
    (folder / "model.safetensors").write_bytes(b"")
    write_tokenizer(folder, 384)
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"text": "hello"}\n')
    out = tmp_path / "out"
    rc = main(["train", "--model", str(folder), "--data", str(data), "--adapter-path", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "'mamba' is not supported: state across positions" in err and "Traceback" not in err
    assert not (out / "adapters.safetensors").exists() and not (out / "adapter_config.json").exists()
