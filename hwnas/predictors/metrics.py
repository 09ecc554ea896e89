"""Accuracy figures of a latency predictor against measurements."""
from __future__ import annotations

import numpy as np


def agreement(pred: np.ndarray, meas: np.ndarray) -> dict[str, float]:
    """MAPE, share within +-5 % / +-10 %, Spearman and Kendall of `pred` against `meas`."""
    from scipy.stats import kendalltau, spearmanr

    pred, meas = np.asarray(pred, dtype=float), np.asarray(meas, dtype=float)
    rel = np.abs(pred / meas - 1.0)
    n = len(meas)
    rank = n >= 3 and np.ptp(pred) > 0 and np.ptp(meas) > 0
    return {
        "n": int(n),
        "mape": float(np.mean(rel) * 100),
        "within_5pct": float(np.mean(rel <= 0.05)),
        "within_10pct": float(np.mean(rel <= 0.10)),
        "spearman": float(spearmanr(pred, meas).statistic) if rank else float("nan"),
        "kendall": float(kendalltau(pred, meas).statistic) if rank else float("nan"),
    }


def noise_ceiling(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """How well two independent measurements of the same models agree (the best a predictor can show)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    rel = np.abs(a / b - 1.0)
    agree = agreement(a, b)
    return {
        "noise_ceiling_within_10pct": float(np.mean(rel <= 0.10)),
        "noise_ceiling_within_5pct": float(np.mean(rel <= 0.05)),
        "noise_median_rel_diff": float(np.median(rel)),
        "noise_spearman": agree["spearman"],
    }
