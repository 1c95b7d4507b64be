"""The LCSB-or-MeSP advice: the study rows it reads, the row it picks for a run, the equal-minutes arithmetic and the
verdict, and that `mesp-mlx plan` prints it."""

import math

import pytest

from mesp_mlx.run.config import TrainConfig
from mesp_mlx.plan.lcsb_advice import StudyRow, advice_lines, load_study, nearest


def row(lr=1e-4, scale=20.0, fraction=0.25, schedule="cyclic", mesp=(4.0, 3.8, 3.6), lcsb=(4.0, 3.9, 3.7),
        speedup=2.0):
    return StudyRow(lr=lr, scale=scale, optimizer="adamw", fraction=fraction, schedule=schedule, skipped="freeze",
                    steps=[0, 100, 200], mesp=list(mesp), lcsb=list(lcsb), speedup=speedup)


def test_shipped_study_rows_are_measured_pairs():
    rows = load_study()
    assert rows, "mesp_mlx/lcsb_study.json is shipped with the package"
    for r in rows:
        assert r.steps[0] == 0 and r.steps == sorted(r.steps) and len(r.mesp) == len(r.lcsb) == len(r.steps)
        assert r.mesp[0] == pytest.approx(r.lcsb[0], abs=1e-4)  # the same start, the same held-out passages
        assert 0 < r.fraction < 1 and r.speedup > 1 and r.optimizer in ("adam", "adamw")
    assert {r.scale for r in rows} >= {20.0, 2.0, 1.0}  # the scale sweep at lr 1e-4


def test_mesp_curve_interpolates_between_evaluations():
    r = row()
    assert r.mesp_at(0) == 4.0 and r.mesp_at(200) == pytest.approx(3.6)
    assert r.mesp_at(50) == pytest.approx(3.9) and r.mesp_at(150) == pytest.approx(3.7)
    # LCSB's 200 steps at 2x the speed take MeSP's 100 steps of minutes: 3.7 against 3.8
    assert r.equal_minutes_gap(2.0) == pytest.approx((3.7 - 3.8) / 3.8)
    assert r.equal_minutes_gap(1.0) == pytest.approx((3.7 - 3.6) / 3.6)
    assert r.same_steps_gap() == pytest.approx(0.1 / 3.6)


def test_nearest_matches_log_lr_times_scale_and_falls_back_to_cyclic():
    rows = [row(scale=20.0), row(scale=2.0), row(scale=1.0), row(scale=20.0, fraction=0.5)]
    assert nearest(rows, 1e-5, 20.0, 0.25, "cyclic").scale == 2.0  # 2e-4 = 1e-4 x 2
    assert nearest(rows, 3e-4, 10.0, 0.25, "cyclic").scale == 20.0
    assert nearest(rows, 5e-5, 1.0, 0.25, "cyclic").scale == 1.0
    assert nearest(rows, 1e-4, 20.0, 0.25, "importance").schedule == "cyclic"
    assert nearest(rows, 1e-4, 20.0, 0.5, "cyclic").fraction == 0.5
    assert nearest(rows, 1e-4, 20.0, 0.1, "cyclic") is None
    assert nearest(rows, 1e-5, 20.0, 0.5, "cyclic") is None  # the only 1/2 row is 10x hotter: not this setting
    assert nearest(rows, 1e-6, 20.0, 0.25, "cyclic") is None


def test_verdicts():
    cfg = TrainConfig(model=None, data="x", method="mesp", optimizer="adamw", learning_rate=1e-4)
    good = row(lcsb=(4.0, 3.85, 3.7))  # at 2x: 3.7 < MeSP's 3.8 after 100 steps
    text = "\n".join(advice_lines(cfg, {1.0: 4.0, 0.25: 2.0}, [good]))
    assert "LCSB is worth it" in text and "2.00x" in text and "-2.6 %" in text
    text = "\n".join(advice_lines(cfg, {1.0: 4.0, 0.25: 3.6}, [good]))  # too little speed-up: MeSP's minutes win
    assert "MeSP is the better use" in text
    bad = row(lcsb=(4.0, 5.0, 6.0))
    text = "\n".join(advice_lines(cfg, {1.0: 4.0, 0.25: 2.0}, [bad]))
    assert "diverged" in text and "MeSP is the better use" in text
    behind = row(lcsb=(4.0, 3.98, 3.97))  # trained, but 10 % behind MeSP: behind, not diverged
    assert not behind.diverged()
    text = "\n".join(advice_lines(cfg, {1.0: 4.0, 0.25: 2.0}, [behind]))
    assert "diverged" not in text and "+10.3 %" in text and "MeSP is the better use" in text
    hot = row(mesp=(4.0, 6.0, 6.5), lcsb=(4.0, 7.0, 8.0))  # MeSP diverged too: no method is the answer
    assert "too hot" in "\n".join(advice_lines(cfg, {1.0: 4.0, 0.25: 2.0}, [hot]))
    sgd = TrainConfig(model=None, data="x", method="mesp", optimizer="sgd", learning_rate=1e-4)
    assert "not measured" in "\n".join(advice_lines(sgd, {1.0: 4.0, 0.25: 2.0}, [good]))
    assert not math.isnan(good.equal_minutes_gap(1e9))


def test_plan_prints_the_advice(tiny_models, tmp_path, capsys):
    from mesp_mlx.cli import main
    from test_train_cli import write_data

    data = write_data(tmp_path / "data")
    assert main(["plan", "--model", str(tiny_models["qwen2"]), "--data", str(data), "--batch-size", "2",
                 "--max-seq-length", "64", "--method", "lcsb", "--lcsb-fraction", "0.5",
                 "--optimizer", "adamw", "--learning-rate", "1e-4"]) == 0
    text = capsys.readouterr().out
    block = text[text.index("LCSB or MeSP"):].splitlines()
    assert [line.split()[:2] for line in block[2:5]] == [["mesp", block[2].split()[1]], ["lcsb", "0.25"],
                                                          ["lcsb", "0.5"]]
    mesp_s = float(block[2].split()[1])
    lcsb_s = [float(line.split()[3]) for line in block[3:5]]
    assert all(s < mesp_s for s in lcsb_s) and lcsb_s[0] <= lcsb_s[1]  # fewer blocks back-propagated: cheaper
    print("\n".join(block))
    assert "verdict" in text


def _study_tool():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "study_gradients.py"
    spec = importlib.util.spec_from_file_location("study_gradients", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_study_tool_names_report_and_rows():
    tool = _study_tool()
    assert tool.parse_run("mesp@2") == ("mesp", {"scale": 2.0})
    assert tool.parse_run("lcsb:importance:momentum:0.5@1") == ("lcsb", {
        "scale": 1.0, "lcsb_schedule": "importance", "lcsb_skipped": "momentum", "lcsb_fraction": 0.5})
    assert tool.parse_run("lcsb") == ("lcsb", {})

    def curve(heldout, s_per_step, scale):
        return {"heldout": {str(k): v for k, v in heldout.items()}, "s_per_step": s_per_step,
                "seconds": [s_per_step * (i + 1) for i in range(max(heldout))], "lr": 1e-4, "scale": scale,
                "optimizer": "adamw", "seq": 256, "rank": 16, "loss": [0.0] * max(heldout)}

    curves = {"mesp@2": curve({0: 4.0, 100: 3.8, 200: 3.6}, 4.0, 2.0),
              "lcsb:cyclic:freeze:0.25@2": curve({0: 4.0, 100: 3.9, 200: 3.7}, 2.0, 2.0),
              "lcsb:cyclic:freeze:0.25@20": curve({0: 4.0, 100: 3.9, 200: 3.7}, 2.0, 20.0)}  # no MeSP at 20
    table = tool.report({"curves": curves})
    line = next(l for l in table.splitlines() if l.startswith("| lcsb:cyclic:freeze:0.25@2 "))
    # 2x faster; 2.8 % above MeSP after 200 steps; in its 400 s MeSP made 100 steps: 3.8, so LCSB is 2.6 % below
    assert "| 3.700 (200) | 2.00 | 2.00x | +2.8 % | 3.800 (-2.6 %) |" in line
    rows = tool.advice_rows(curves, "test")
    assert len(rows) == 1 and rows[0]["scale"] == 2.0 and rows[0]["speedup"] == 2.0
    assert StudyRow(**rows[0]).equal_minutes_gap(2.0) == pytest.approx((3.7 - 3.8) / 3.8)
