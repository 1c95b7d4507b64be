"""Acceptance: one mlx-lm YAML (optimizer, cosine schedule with warmup, gradient accumulation, batch 2, 4 distinct
examples, seed 0) run by `mesp-mlx train` and by `python -m mlx_lm lora` from the same non-zero adapter ends with the
same adapter (rel <= 1e-3) and reports the same training loss at every step (mlx-lm prints 3 decimals).

The learning rates keep the run in a stable regime: at Adam lr 1e-2 on this tiny model each step moves the adapter by
~100% and any rounding difference (mlx-lm's CPU quantized_matmul vs our dequantized GEMM) is amplified step by step
(measured: MeBP and MeSP agree with each other to 1e-4 there and both leave mlx-lm by 2e-3 after 2 SGD steps)."""

import json
import os
import re
import subprocess
import sys

import mlx.core as mx
import pytest

from conftest import assert_same_adapter
from mesp_mlx.cli import main
from mesp_mlx.run.metrics import MetricsLog
from test_train_cli import CHAT, write_data

FOURTH = {"messages": [{"role": "user", "content": "name a colour of the sky"},
                       {"role": "assistant", "content": "blue, mostly, on a clear day."}]}
ITERS = 8


def _yaml(path, optimizer, fine_tune_type, lr, steps_per_eval=1000):
    path.write_text(
        f"fine_tune_type: {fine_tune_type}\noptimizer: {optimizer}\nbatch_size: 2\ngrad_accumulation_steps: 2\n"
        f"seed: 0\niters: {ITERS}\nlearning_rate: {lr}\nnum_layers: 3\nmax_seq_length: 512\nsteps_per_report: 1\n"
        f"steps_per_eval: {steps_per_eval}\nval_batches: 1\n"
        f"lr_schedule:\n  name: cosine_decay\n  arguments: [{lr}, {ITERS // 2}]\n  warmup: 1\n  warmup_init: 0.0\n"
        "lora_parameters:\n  rank: 8\n  scale: 20.0\n  dropout: 0.0\n"
        "  keys: [self_attn.q_proj, self_attn.k_proj, self_attn.v_proj, self_attn.o_proj, mlp.gate_proj, "
        "mlp.up_proj, mlp.down_proj]\n")
    return path


def _mlx_lm_losses(stdout: str) -> dict:
    """{iteration: train loss} from mlx_lm.lora's report lines (`  <it>    <loss> ▼ ...`)."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", stdout)  # rich's colours
    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"^\s*(\d+)\s+(\d+\.\d+) [▼▲]", plain, re.M)}


# steps_per_eval 1: an evaluation at every iteration draws a permutation of the validation batches (2 here) from the
# stream the training batches share, so the training order stays mlx-lm's only if the evaluations are the same draws
@pytest.mark.parametrize("optimizer,fine_tune_type,lr,steps_per_eval",
                         [("adam", "lora", 1e-4, 1000), ("sgd", "dora", 5e-2, 1000), ("adam", "lora", 1e-4, 1)])
def test_same_yaml_same_adapter_as_mlx_lm_lora(tiny_models, tmp_path, optimizer, fine_tune_type, lr, steps_per_eval):
    model = str(tiny_models["qwen2"])
    data = write_data(tmp_path / "data", records=CHAT + [FOURTH])
    valid = CHAT[:2] if steps_per_eval > 1 else CHAT + [FOURTH]
    (data / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in valid))
    start = tmp_path / "start"
    assert main(["train", "--model", model, "--data", str(data), "--iters", "2", "--learning-rate", "1e-2",
                 "--fine-tune-type", fine_tune_type, "--adapter-path", str(start), "--no-plot"]) == 0  # non-zero B
    cfg = _yaml(tmp_path / "run.yaml", optimizer, fine_tune_type, lr, steps_per_eval)
    common = ["-c", str(cfg), "--model", model, "--data", str(data),
              "--resume-adapter-file", str(start / "adapters.safetensors")]
    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    proc = subprocess.run([sys.executable, "-m", "mlx_lm", "lora", "--train", "--adapter-path", str(theirs), *common],
                          capture_output=True, text=True, env=dict(os.environ), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert main(["train", "--adapter-path", str(ours), "--no-plot", *common]) == 0

    their_losses = _mlx_lm_losses(proc.stdout)
    records = MetricsLog.read(ours / "metrics.jsonl")
    assert sorted(their_losses) == [r["step"] for r in records] == list(range(1, ITERS + 1))
    for r in records:
        assert abs(round(r["loss"], 3) - their_losses[r["step"]]) <= 1.5e-3, (r["step"], r["loss"], their_losses)
    assert_same_adapter(ours / "adapters.safetensors", theirs / "adapters.safetensors", start / "adapters.safetensors",
                        moved_more_than=1e-2)
    # the learning rate of every step is mlx-lm's schedule (warmup 1, then cosine), one value per optimizer step
    from mlx_lm.tuner.utils import build_schedule

    sched = build_schedule({"name": "cosine_decay", "arguments": [lr, ITERS // 2], "warmup": 1})
    expect = [sched(mx.array((s - 1) // 2, mx.uint64)).item() for s in range(1, ITERS + 1)]
    assert [r["learning_rate"] for r in records] == pytest.approx(expect, rel=1e-6)
