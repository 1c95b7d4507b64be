"""Error of LoRA aggregation schemes against the exact example-weighted average of ΔW = s·A·B, on random adapters
shaped like SmolLM2-135M's (d 576, ffn 1536, r 8 on q, k, v, o, gate, up, down; a few blocks), for 2-4 clients:
FlexLoRA (SVD of the exact average, back to rank r), FedIT (A and B averaged apart), and both when the clients
share A (FFA/FedSA-style: the average has rank r and both are exact).

    python tools/federated_aggregation_error.py            # prints a Markdown table
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mesp_mlx.federated.aggregation import aggregate, measured_error  # noqa: E402

SHAPES = {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (576, 192), "self_attn.v_proj": (576, 192),
          "self_attn.o_proj": (576, 576), "mlp.gate_proj": (576, 1536), "mlp.up_proj": (576, 1536),
          "mlp.down_proj": (1536, 576)}


def adapter(rng, blocks=2, rank=8):
    out = {}
    for b in range(blocks):
        for name, (d_in, d_out) in SHAPES.items():
            out[f"model.layers.{b}.{name}.lora_a"] = (0.02 * rng.normal(size=(d_in, rank))).astype(np.float32)
            out[f"model.layers.{b}.{name}.lora_b"] = (0.02 * rng.normal(size=(rank, d_out))).astype(np.float32)
    return out


def main() -> int:
    rng = np.random.default_rng(0)
    lines = ["| clients | A | FlexLoRA rel. error (reported / measured) | FedIT rel. error |", "|---|---|---|---|"]
    for n in (2, 3, 4):
        for shared in (False, True):
            clients = [adapter(rng) for _ in range(n)]
            if shared:
                for c in clients[1:]:
                    c.update({k: v for k, v in clients[0].items() if k.endswith("lora_a")})
            counts = list(rng.integers(10, 100, size=n))
            flex, rep = aggregate(clients, counts, 20.0)
            fedit, rep_fedit = aggregate(clients, counts, 20.0, scheme="fedit")
            lines.append(f"| {n} | {'shared' if shared else 'own'} | {rep['rel_error']:.4f} / "
                         f"{measured_error(flex, clients, counts, 20.0):.4f} | {rep_fedit['rel_error']:.4f} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
