"""The documentation's runnable commands (fenced blocks after a `<!-- runnable -->` line in README.md and docs/*.md)
run on a tiny model, so the docs cannot drift from the code. MODEL, DATA and OUT stand for a model folder, a data
folder and an output folder; `.venv/bin/` is this test's environment."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from test_train_cli import CHAT, write_data

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def runnable_commands() -> list[tuple[str, str]]:
    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text(encoding="utf-8")
        for block in re.findall(r"<!-- runnable -->\s*```bash\n(.*?)```", text, flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #", 1)[0].strip()
                if line and not line.startswith("#"):
                    found.append((doc.name, line))
    return found


COMMANDS = runnable_commands()


def test_the_docs_mark_commands_as_runnable():
    docs = {doc for doc, _ in COMMANDS}
    assert {"training.md", "memory.md", "distributed.md"} <= docs, docs


@pytest.fixture(scope="module")
def places(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    return {"MODEL": str(tiny_models["qwen2"]), "DATA": str(write_data(root / "data", records=CHAT * 2)),
            "OUT": str(root / "out")}


def test_runnable_commands_in_the_docs_succeed(places):
    for doc, line in COMMANDS:  # in order: later commands use what earlier ones wrote
        words = []
        for word in shlex.split(line):
            if word.startswith(".venv/bin/"):
                word = str(BIN / word[len(".venv/bin/"):])
            for key, value in places.items():
                word = re.sub(rf"\b{key}\b", value, word)
            words.append(word)
        proc = subprocess.run(words, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 0, f"{doc}: {line}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"


def test_train_help_is_grouped_as_the_docs_are():
    from mesp_mlx.cli import build_parser

    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    titles = [line.split(":")[0] for line in text.splitlines() if line and not line.startswith(" ") and ":" in line]
    assert titles[-10:] == ["model", "data", "LoRA", "method", "grpo", "memory", "speed", "output", "evaluation",
                            "mlx-lm compatibility"]
    for flag in ("--learning-rate", "--batch-size", "--max-seq-length", "--adapter-path", "--grad-accumulation-steps",
                 "--steps-per-eval", "--val-batches", "--save-every", "--num-layers"):  # mlx-lm's names kept
        assert flag in text


def _docs_figures():
    sys.path.insert(0, str(ROOT / "tools"))
    import docs_figures

    return docs_figures


def test_generated_figures_match_their_snapshots():
    """Every generated block in README.md and docs/ is what tools/docs_figures.py renders from its snapshot in
    docs/figures/ (the command's output at a named commit): a figure cannot be edited by hand or drift from it."""
    figures = _docs_figures()
    blocks = [m.group(2) for p in figures.doc_files() for m in figures.MARKER.finditer(p.read_text())]
    assert {"demo", "readme-bench", "bench-family", "personalize", "families"} <= set(blocks), blocks
    assert figures.render_docs(check=True) == []
    for block in blocks:  # each names its command and commit
        measurement = figures.BLOCKS[block][0]
        if measurement is not None:
            meta = figures.meta_of(measurement)
            assert meta["command"] and meta["commit"] and meta["date"], (block, meta)


def test_a_hand_edited_figure_is_caught(tmp_path):
    figures = _docs_figures()
    doc = tmp_path / "doc.md"
    doc.write_text("text\n<!-- figures:families -->\n" + figures.render_families() + "\n<!-- /figures:families -->\n")
    assert figures.render_docs(check=True, paths=[doc]) == []
    doc.write_text(doc.read_text().replace(" more the exact generic tier", " more (edited) the exact generic tier"))
    assert figures.render_docs(check=True, paths=[doc]) == ["doc.md: block families differs from its snapshot"]
    figures.render_docs(check=False, paths=[doc])  # rewriting restores it
    assert figures.render_docs(check=True, paths=[doc]) == []


def test_readme_is_short_and_opens_with_the_two_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.encode()) <= 12 * 1024
    first = "\n".join(text.splitlines()[:40])
    assert "make demo" in first and "make test" in first
