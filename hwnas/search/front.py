"""A Pareto front of architectures: selection, hypervolume, front.json / front.csv / pareto.png."""
from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hwnas.space.genotype import Genotype
from hwnas.jsonio import atomic_write_json, load_json

SCHEMA_VERSION = 1
OBJECTIVES = ("error", "latency_ms", "params_m")
LEAST_VIOLATING = 5  # members returned when no evaluated architecture meets the budgets


def non_dominated(F: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated rows of F (minimisation), via pymoo's non-dominated sorting."""
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    F = np.asarray(F, dtype=float)
    if len(F) == 0:
        return np.zeros(0, dtype=int)
    return np.asarray(NonDominatedSorting().do(F, only_non_dominated_front=True), dtype=int)


def hypervolume(F: np.ndarray, reference_point: Sequence[float]) -> float:
    """pymoo hypervolume of F after dividing each objective by the reference point (so the box is [0, 1]^3)."""
    from pymoo.indicators.hv import Hypervolume

    ref = np.asarray(reference_point, dtype=float)
    F = np.asarray(F, dtype=float).reshape(-1, len(ref)) / ref
    F = F[np.all(F < 1.0, axis=1)]  # points outside the box add nothing
    if len(F) == 0:
        return 0.0
    return float(Hypervolume(ref_point=np.ones(len(ref))).do(F))


@dataclass(frozen=True)
class FrontMember:
    """One architecture on the front with its objectives and total budget violation (0 = within budget)."""

    genotype: Genotype
    error: float
    latency_ms: float
    params_m: float
    violation: float = 0.0

    @property
    def arch_id(self) -> str:
        """The genotype's stable id."""
        return self.genotype.arch_id

    @property
    def objectives(self) -> np.ndarray:
        """[error, latency_ms, params_m]."""
        return np.array([self.error, self.latency_ms, self.params_m], dtype=float)

    def to_dict(self) -> dict[str, Any]:
        """The member object of front.json."""
        return {"arch_id": self.arch_id, "arch": self.genotype.to_dict(), "error": self.error,
                "latency_ms": self.latency_ms, "params_m": self.params_m, "violation": self.violation}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "FrontMember":
        """Parse a member object; errors name `where` and the field."""
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected an object, got {type(data).__name__}")
        if "arch" not in data:
            raise ValueError(f"{where}: missing field 'arch'")
        try:
            genotype = Genotype.from_dict(data["arch"])
        except ValueError as err:
            raise ValueError(f"{where}.arch: {err}") from None
        values = {}
        for key in (*OBJECTIVES, "violation"):
            value = data.get(key, 0.0 if key == "violation" else None)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"{where}.{key}: expected a finite number, got {value!r}")
            values[key] = float(value)
        if not 0.0 <= values["error"] <= 1.0:
            raise ValueError(f"{where}.error: expected a value in [0, 1], got {values['error']}")
        if "arch_id" in data and data["arch_id"] != genotype.arch_id:
            raise ValueError(f"{where}.arch_id: {data['arch_id']!r} does not match its arch ({genotype.arch_id})")
        return cls(genotype=genotype, **values)


@dataclass
class ParetoFront:
    """The non-dominated architectures of one search, with the run's hypervolume history and config."""

    members: list[FrontMember]
    reference_point: tuple[float, ...]
    history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    feasible: bool = True  # False: no evaluated architecture met the budgets; members are the least violating
    n_evaluations: int = 0

    objectives = OBJECTIVES

    @property
    def hypervolume(self) -> float:
        """Hypervolume of the feasible members at the fixed reference point (0 when none is feasible)."""
        if not self.feasible or not self.members:
            return 0.0
        return hypervolume(np.stack([m.objectives for m in self.members]), self.reference_point)

    @classmethod
    def from_evaluations(cls, genotypes: Sequence[Genotype], F: np.ndarray, violation: np.ndarray,
                         reference_point: Sequence[float], **kwargs: Any) -> "ParetoFront":
        """The front of a set of evaluated architectures: the non-dominated feasible ones, else the least violating."""
        F = np.asarray(F, dtype=float).reshape(-1, len(OBJECTIVES))
        violation = np.asarray(violation, dtype=float).reshape(-1)
        feasible = violation <= 0
        if feasible.any():
            idx = np.flatnonzero(feasible)[non_dominated(F[feasible])]
        else:
            idx = np.argsort(violation, kind="stable")[:LEAST_VIOLATING]
        idx = sorted(idx.tolist(), key=lambda i: (F[i, 0], F[i, 1], F[i, 2], genotypes[i].arch_id))
        members = [FrontMember(genotypes[i], float(F[i, 0]), float(F[i, 1]), float(F[i, 2]), float(max(violation[i], 0.0)))
                   for i in idx]
        return cls(members=members, reference_point=tuple(float(r) for r in reference_point),
                   feasible=bool(feasible.any()), **kwargs)

    # -- files ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The front.json object of DESIGN.md."""
        return {
            "schema_version": SCHEMA_VERSION,
            "objectives": list(OBJECTIVES),
            "reference_point": list(self.reference_point),
            "hypervolume": self.hypervolume,
            "feasible": self.feasible,
            "n_evaluations": self.n_evaluations,
            "members": [m.to_dict() for m in self.members],
            "history": self.history,
            "config": self.config,
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "front") -> "ParetoFront":
        """Parse a front object; errors name `source` and the field."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"{source}: schema_version: expected {SCHEMA_VERSION}, got {data.get('schema_version')!r}")
        if data.get("objectives") != list(OBJECTIVES):
            raise ValueError(f"{source}: objectives: expected {list(OBJECTIVES)}, got {data.get('objectives')!r}")
        ref = data.get("reference_point")
        if (not isinstance(ref, list) or len(ref) != len(OBJECTIVES)
                or not all(isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0 for r in ref)):
            raise ValueError(f"{source}: reference_point: expected {len(OBJECTIVES)} positive numbers, got {ref!r}")
        members = data.get("members")
        if not isinstance(members, list):
            raise ValueError(f"{source}: members: expected a list, got {type(members).__name__}")
        parsed = [FrontMember.from_dict(m, f"{source}: members[{i}]") for i, m in enumerate(members)]
        history = data.get("history", [])
        if not isinstance(history, list):
            raise ValueError(f"{source}: history: expected a list")
        config = data.get("config", {})
        if not isinstance(config, dict):
            raise ValueError(f"{source}: config: expected an object")
        feasible = data.get("feasible", True)
        if not isinstance(feasible, bool):
            raise ValueError(f"{source}: feasible: expected true or false, got {feasible!r}")
        return cls(members=parsed, reference_point=tuple(float(r) for r in ref), history=history, config=config,
                   feasible=feasible, n_evaluations=int(data.get("n_evaluations", 0)))

    def save(self, path: str | Path) -> Path:
        """Write front.json atomically."""
        path = Path(path)
        atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ParetoFront":
        """Read a front.json; errors name the file and the field."""
        data = load_json(path, "no such front file")
        return cls.from_dict(data, source=str(path))

    def save_csv(self, path: str | Path) -> Path:
        """Write front.csv: one row per member, objectives, input resolution, depth, width and the cells as compact JSON."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["arch_id", *OBJECTIVES, "accuracy", "violation", "resolution", "depth", "width", "normal",
                                 "reduce"])
                for m in self.members:
                    d = m.genotype.to_dict()
                    writer.writerow([m.arch_id, f"{m.error:.6f}", f"{m.latency_ms:.6f}", f"{m.params_m:.6f}",
                                     f"{1 - m.error:.6f}", f"{m.violation:.6g}", m.genotype.macro.resolution,
                                     json.dumps(list(m.genotype.stage_depth), separators=(",", ":")),
                                     json.dumps(list(m.genotype.stage_width), separators=(",", ":")),
                                     json.dumps(d["normal"], separators=(",", ":")),
                                     json.dumps(d["reduce"], separators=(",", ":"))])
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path


def _macro_label(genotype: Genotype, members: list[FrontMember]) -> str:
    """"6px", "d1-0-1", "w.5-1-.75" or several, for whichever of resolution, depth and width differs between `members`."""
    parts = []
    if len({m.genotype.macro.resolution for m in members}) > 1:
        parts.append(f"{genotype.macro.resolution}px")
    if len({m.genotype.stage_depth for m in members}) > 1:
        parts.append("d" + "-".join(map(str, genotype.stage_depth)))
    if len({m.genotype.stage_width for m in members}) > 1:
        parts.append("w" + "-".join(f"{w:g}".lstrip("0") for w in genotype.stage_width))
    return " ".join(parts)


def plot_fronts(front: ParetoFront, path: str | Path, baseline: ParetoFront | None = None,
                title: str | None = None) -> Path:
    """pareto.png: validation error vs predicted latency, marker area ~ params; a random-search front beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    series = [(front, "NSGA-II" if front.config.get("algorithm", "nsga2") == "nsga2" else "random search", "tab:blue", "o")]
    if baseline is not None:
        series.append((baseline, "random search (same evaluations)", "tab:orange", "s"))
    all_params = [m.params_m for f, *_ in series for m in f.members] or [1.0]
    p_lo, p_hi = min(all_params), max(all_params)

    def size(params_m: float) -> float:
        # marker area 15..250 spans the params range of what is shown (fronts differ by tens of percent)
        return 15.0 + 235.0 * ((params_m - p_lo) / (p_hi - p_lo) if p_hi > p_lo else 0.5)
    for f, label, color, marker in series:
        if not f.members:
            continue
        pts = sorted(f.members, key=lambda m: m.latency_ms)
        lat = [m.latency_ms for m in pts]
        err = [100 * m.error for m in pts]
        ax.scatter(lat, err, s=[size(m.params_m) for m in pts], c=color, marker=marker, alpha=0.6,
                   edgecolors="k", linewidths=0.5, label=f"{label}: {len(pts)} members, HV {f.hypervolume:.4f}")
        best = np.minimum.accumulate(err)  # the error-latency staircase of the 3-objective front
        ax.step(lat, best, where="post", color=color, alpha=0.5)
        for m, x, y in zip(pts, lat, err):  # elastic macro: say which point has which resolution, depth, width
            label = _macro_label(m.genotype, pts)
            if label:
                ax.annotate(label, (x, y), xytext=(3, 3), textcoords="offset points", fontsize=6, color=color)
    ax.set_xlabel("predicted latency (ms)")
    ax.set_ylabel("estimated validation error (%, shared weights)")
    ax.set_title(title or f"Pareto front (marker area: {p_lo:.3f}-{p_hi:.3f} M parameters)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
