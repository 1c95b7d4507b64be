"""What data parallelism costs per training step: the bytes each rank hands to all_sum and the seconds it waits, for
the LoRA of a named model shape, measured with 2 ranks on localhost (ring backend), and the predicted cost for N
machines on 1 / 10 / 40 Gb/s links from those measurements.

The engine's pattern per step (mesp_mlx/distributed.py): one float64 all_sum of (loss sum, token count), one of the
stop flag, and one all_sum per block of that block's LoRA gradient (fp32, flattened).

    .venv/bin/python tools/bench_distributed.py --shape qwen2.5-0.5b --steps 10
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tools" / "out"
# (blocks, hidden, ffn, kv width): LoRA rank r on q, k, v, o, gate, up, down
SHAPES = {"qwen2.5-0.5b": (24, 896, 4864, 128), "qwen2.5-1.5b": (28, 1536, 8960, 256),
          "smollm2-135m": (30, 576, 1536, 192), "gemma3-1b": (26, 1152, 6912, 256)}


def lora_params_per_block(hidden: int, ffn: int, kv: int, r: int) -> int:
    shapes = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, ffn), (hidden, ffn),
              (ffn, hidden)]  # (in, out) of q, k, v, o, gate, up, down
    return sum(r * (i + o) for i, o in shapes)


def rank_main(args) -> None:
    import mlx.core as mx

    from mesp_mlx.distributed import Ranks

    ranks = Ranks.from_environment()
    blocks, hidden, ffn, kv = SHAPES[args.shape]
    per_block = lora_params_per_block(hidden, ffn, kv, args.rank)
    grads = [{"g": mx.random.normal((per_block,))} for _ in range(blocks)]
    ones = [{"g": mx.ones((1,))} for _ in range(blocks)]
    mx.eval(grads, ones)

    def step(trees) -> tuple[float, int]:
        ranks.reset_counters()
        t = time.perf_counter()
        ranks.sum_scalars([1.0, 2.0])
        ranks.any(False)
        for g in trees:
            ranks.sum_tree(g)
        return time.perf_counter() - t, ranks.bytes_sent

    full, tiny = [], []
    for s in range(args.steps + 1):  # interleaved, so that both see the same machine; the first pair warms up
        f, t = step(grads), step(ones)  # (seconds, bytes) each
        if s:
            full.append(f)
            tiny.append(t)
    if ranks.rank == 0:
        med = lambda xs: sorted(x for x in xs)[len(xs) // 2]  # noqa: E731
        calls = blocks + 2
        print(json.dumps({"shape": args.shape, "rank": args.rank, "world": ranks.size, "blocks": blocks,
                          "lora_params": per_block * blocks, "bytes_per_step": full[0][1],
                          "calls_per_step": calls, "step_s": med([x[0] for x in full]),
                          "call_overhead_s": med([x[0] for x in tiny]) / calls}))


def predict(m: dict, n: int, gbps: float) -> float:
    """Ring all-reduce: every rank sends and receives 2 (n-1)/n of the payload; every call costs (n-1) times the
    per-call overhead measured between 2 ranks on localhost (a lower bound on a real network's latency)."""
    transfer = 2 * (n - 1) / n * m["bytes_per_step"] * 8 / (gbps * 1e9)
    return transfer + m["calls_per_step"] * (n - 1) * m["call_overhead_s"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen2.5-0.5b", choices=list(SHAPES))
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--_rank-main", dest="rank_main", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rank_main:
        rank_main(args)
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    from mesp_mlx.distributed import localhost_hostfile

    hostfile = localhost_hostfile(OUT / "hosts.json", 2)
    procs = [subprocess.Popen([sys.executable, __file__, "--shape", args.shape, "--rank", str(args.rank), "--steps",
                               str(args.steps), "--_rank-main"], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile),
                                   "PYTHONPATH": str(ROOT)}) for r in range(2)]
    outs = [proc.communicate(timeout=600)[0] for proc in procs]
    m = json.loads(outs[0].strip().splitlines()[-1])
    (OUT / f"distributed_{args.shape}.json").write_text(json.dumps(m, indent=2))
    mb = m["bytes_per_step"] / 1e6
    print(f"{args.shape}, LoRA r {args.rank} on 7 projections x {m['blocks']} blocks: {m['lora_params'] / 1e6:.2f} M "
          f"params; per step each rank hands all_sum {mb:.2f} MB in {m['calls_per_step']} calls")
    print(f"measured, 2 ranks on localhost: {m['step_s'] * 1e3:.1f} ms per step (median of {args.steps}); the same "
          f"calls with one element each: {m['call_overhead_s'] * 1e6:.0f} us per call")
    print("predicted all_sum time per step = 2 (N-1)/N x bytes x 8 / link + calls x (N-1) x per-call overhead:")
    print("| N | 1 Gb/s | 10 Gb/s | 40 Gb/s |\n|---|---|---|---|")
    for n in (2, 4, 8):
        print(f"| {n} | " + " | ".join(f"{predict(m, n, g) * 1e3:.0f} ms" for g in (1, 10, 40)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
