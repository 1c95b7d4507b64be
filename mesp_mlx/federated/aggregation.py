"""Aggregating LoRA adapters across clients (pure numpy; no Flower, no MLX).

mlx-lm's LoRA: y = W0 x + s (x A) B with A [in, r] (`...lora_a`) and B [r, out] (`...lora_b`), so a module's update
is ΔW = s A B ([in, out]). The average of the updates Σ w_i s A_i B_i / Σ w_i is what federated averaging should
produce; averaging A and B separately (FedIT) gives s Ā B̄, which differs by the cross terms A_i B_j (i ≠ j).

FlexLoRA (arXiv 2402.11505): average the ΔW exactly (weights = each client's training examples), then factor the
average back to rank r by SVD. The result is the best rank-r approximation of the exact average (Eckart–Young), so
its error is known: ‖ΔW_avg − s A' B'‖_F = sqrt(Σ_{k>r} σ_k²) over the average's singular values σ. It is exact (to
rounding) whenever the average has rank ≤ r — e.g. one client, or clients whose A (or B) span the same subspace.

The SVD never forms the dense ΔW: Σ_i w_i s A_i B_i = P Q with P = [A_1 … A_n] ([in, n r]) and Q = the stacked
w_i s B_i ([n r, out]); with P = Q_p R_p and Qᵀ = Q_q R_q (thin QR), ΔW_avg = Q_p (R_p R_qᵀ) Q_qᵀ and the SVD of the
small (n r × n r) middle gives the exact singular values and vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCHEMES = ("flexlora", "fedit")


class AggregationError(ValueError):
    pass


def modules(weights: dict) -> list[str]:
    """The LoRA modules (name prefixes) of an adapter dict; each must hold exactly lora_a and lora_b."""
    prefixes = set()
    for name in weights:
        if not name.endswith((".lora_a", ".lora_b")):
            raise AggregationError(f"{name} is not a LoRA tensor (…lora_a / …lora_b)")
        prefixes.add(name.rsplit(".", 1)[0])
    for p in prefixes:
        if f"{p}.lora_a" not in weights or f"{p}.lora_b" not in weights:
            raise AggregationError(f"module {p} lacks its lora_a or lora_b")
    return sorted(prefixes)


def delta(weights: dict, prefix: str, scale: float) -> np.ndarray:
    """ΔW = s A B of one module, in float64."""
    return scale * np.asarray(weights[f"{prefix}.lora_a"], np.float64) @ np.asarray(weights[f"{prefix}.lora_b"],
                                                                                     np.float64)


def _check(clients: list[dict], counts: list[float]) -> list[str]:
    if not clients:
        raise AggregationError("no client adapters to aggregate")
    if len(counts) != len(clients) or any(c < 0 for c in counts) or sum(counts) <= 0:
        raise AggregationError(f"example counts {counts} must be one non-negative number per client with a positive sum")
    names = modules(clients[0])
    for i, c in enumerate(clients[1:], 1):
        if modules(c) != names:
            raise AggregationError(f"client {i} sent other LoRA modules than client 0")
        for k, v in c.items():
            if np.shape(v) != np.shape(clients[0][k]):
                raise AggregationError(f"client {i}: {k} has shape {np.shape(v)}, client 0's is "
                                       f"{np.shape(clients[0][k])} (another rank or model?)")
    return names


def exact_average(clients: list[dict], counts: list[float], scale: float) -> dict:
    """{module: Σ w_i ΔW_i / Σ w_i} as dense float64 matrices (the reference every scheme is measured against)."""
    names = _check(clients, counts)
    w = np.asarray(counts, np.float64) / sum(counts)
    return {p: sum(wi * delta(c, p, scale) for wi, c in zip(w, clients)) for p in names}


@dataclass
class ModuleResult:
    a: np.ndarray  # [in, r]
    b: np.ndarray  # [r, out]
    error: float  # ‖exact average − s A B‖_F
    norm: float  # ‖exact average‖_F


def _flexlora_module(a_list, b_list, w, scale, rank) -> ModuleResult:
    p = np.concatenate([np.asarray(a, np.float64) for a in a_list], axis=1)  # [in, n r]
    q = np.concatenate([wi * scale * np.asarray(b, np.float64) for wi, b in zip(w, b_list)], axis=0)  # [n r, out]
    qp, rp = np.linalg.qr(p)
    qq, rq = np.linalg.qr(q.T)
    u, s, vt = np.linalg.svd(rp @ rq.T)
    u, vt = qp @ u, vt @ qq.T  # ΔW_avg = u diag(s) vt, exactly
    k = min(rank, len(s))
    root = np.sqrt(s[:k])
    a = np.zeros((p.shape[0], rank))
    b = np.zeros((rank, q.shape[1]))
    a[:, :k] = u[:, :k] * root
    b[:k] = root[:, None] * vt[:k] / scale
    return ModuleResult(a, b, float(np.sqrt(np.sum(s[k:] ** 2))), float(np.sqrt(np.sum(s ** 2))))


def _fedit_module(a_list, b_list, w, scale) -> ModuleResult:
    a = sum(wi * np.asarray(x, np.float64) for wi, x in zip(w, a_list))
    b = sum(wi * np.asarray(x, np.float64) for wi, x in zip(w, b_list))
    exact = sum(wi * scale * np.asarray(x, np.float64) @ np.asarray(y, np.float64)
                for wi, x, y in zip(w, a_list, b_list))
    return ModuleResult(a, b, float(np.linalg.norm(exact - scale * a @ b)), float(np.linalg.norm(exact)))


def aggregate(clients: list[dict], counts: list[float], scale: float, rank: int | None = None,
              scheme: str = "flexlora") -> tuple[dict, dict]:
    """The global adapter (same names, shapes and dtypes as the clients') and its error report against the exact
    example-weighted average of ΔW: overall relative Frobenius error (all modules together), the worst module's, and
    for FlexLoRA the error predicted by the discarded singular values (computed in float64, before the cast)."""
    if scheme not in SCHEMES:
        raise AggregationError(f"aggregation {scheme!r}: one of {', '.join(SCHEMES)}")
    names = _check(clients, counts)
    w = np.asarray(counts, np.float64) / sum(counts)
    out, err2, norm2, worst = {}, 0.0, 0.0, 0.0
    for p in names:
        a_list = [c[f"{p}.lora_a"] for c in clients]
        b_list = [c[f"{p}.lora_b"] for c in clients]
        r = rank or np.shape(a_list[0])[1]
        res = (_flexlora_module(a_list, b_list, w, scale, r) if scheme == "flexlora"
               else _fedit_module(a_list, b_list, w, scale))
        dtype = np.asarray(a_list[0]).dtype
        out[f"{p}.lora_a"], out[f"{p}.lora_b"] = res.a.astype(dtype), res.b.astype(dtype)
        err2, norm2 = err2 + res.error ** 2, norm2 + res.norm ** 2
        worst = max(worst, res.error / res.norm if res.norm > 0 else 0.0)
    report = {"scheme": scheme, "clients": len(clients), "modules": len(names),
              "rel_error": float(np.sqrt(err2 / norm2)) if norm2 > 0 else 0.0, "worst_module_rel_error": worst}
    return out, report


def measured_error(global_weights: dict, clients: list[dict], counts: list[float], scale: float) -> float:
    """‖exact average of ΔW − ΔW of `global_weights`‖_F / ‖exact average‖_F over all modules, with dense matrices
    (an independent check of what `aggregate` reports, after the cast to the adapters' dtype)."""
    exact = exact_average(clients, counts, scale)
    err2 = sum(float(np.sum((exact[p] - delta(global_weights, p, scale)) ** 2)) for p in exact)
    norm2 = sum(float(np.sum(m ** 2)) for m in exact.values())
    return float(np.sqrt(err2 / norm2)) if norm2 > 0 else 0.0
