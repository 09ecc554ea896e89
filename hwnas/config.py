"""Frozen configuration dataclasses; CLI flags map onto their fields one to one."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any


def _check_keys(cls: type, data: Any, what: str, require_all: bool = False) -> None:
    """Raise ValueError unless `data` is a dict whose keys are fields of dataclass `cls` (all of them if asked)."""
    if not isinstance(data, dict):
        raise ValueError(f"{what} must be an object, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{what} has unknown keys {sorted(unknown)}; expected {sorted(known)}")
    missing = known - set(data)
    if require_all and missing:
        raise ValueError(f"{what} is missing keys {sorted(missing)}")


def _build(cls: type, data: dict[str, Any], what: str) -> Any:
    """cls(**data) with a wrong-typed value (a string for a number, say) reported as ValueError naming `what`."""
    try:
        return cls(**data)
    except TypeError as err:
        raise ValueError(f"{what}: a value has the wrong type ({err})") from None


# Upper bounds of a macro's fields: far above any network hwnas can train or time, low enough that a damaged
# or hostile file cannot ask for a 10**100-channel network.
MACRO_LIMITS = {"C": 4096, "layers": 200, "in_channels": 4096, "resolution": 4096, "classes": 1_000_000}


@dataclass(frozen=True)
class MacroConfig:
    """The network skeleton a cell genotype is placed in."""

    C: int = 16  # channels of the first cell
    layers: int = 5  # cells; reductions sit at layers//3 and 2*layers//3
    in_channels: int = 1
    resolution: int = 16
    classes: int = 10

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"macro.{f.name} must be a positive integer, got {value!r}")
            if value > MACRO_LIMITS[f.name]:
                raise ValueError(f"macro.{f.name} = {value} is above the limit {MACRO_LIMITS[f.name]}")
        if self.layers < 3:
            raise ValueError(f"macro.layers must be >= 3 so both reduction cells exist, got {self.layers}")

    def to_dict(self) -> dict[str, int]:
        """Plain dict for JSON files."""
        return asdict(self)

    def at_resolution(self, resolution: int) -> "MacroConfig":
        """The same skeleton fed `resolution` x `resolution` inputs (the elastic macro's one free dimension)."""
        return self if resolution == self.resolution else replace(self, resolution=resolution)

    def same_but_resolution(self, other: "MacroConfig") -> bool:
        """True when `other` differs from this macro at most in input resolution."""
        return other.at_resolution(self.resolution) == self

    @classmethod
    def from_dict(cls, data: Any) -> "MacroConfig":
        """Parse a dict, naming unknown or missing keys."""
        _check_keys(cls, data, "macro", require_all=True)
        return _build(cls, data, "macro")

    @classmethod
    def load(cls, path: str | Path) -> "MacroConfig":
        """Read a macro JSON file (`hwnas profile --macro`); errors name the file."""
        from hwnas.jsonio import read_json

        try:
            return cls.from_dict(read_json(path, "macro"))
        except ValueError as err:
            raise ValueError(err if str(path) in str(err) else f"{path}: {err}") from None


DEFAULT_MACRO = MacroConfig()


@dataclass(frozen=True)
class SupernetConfig:
    """Supernet training: DARTS bilevel epochs, then single-path fine-tuning epochs (weights only)."""

    data: str = "digits"
    macro: MacroConfig = DEFAULT_MACRO
    # Elastic input resolution: single-path steps draw one of these (plus macro.resolution) per step, so the
    # search can choose each architecture's resolution. Empty: macro.resolution only.
    resolutions: tuple[int, ...] = ()
    # Elastic depth: single-path steps also drop trailing normal cells of each stage (cell skipping), so the
    # search can choose each architecture's depth.
    elastic_depth: bool = False
    # Elastic width: single-path steps also run each stage at a fraction of its channels (the leading channels
    # of the shared weights), so the search can choose each architecture's width.
    elastic_width: bool = False
    # Sandwich rule (BigNAS): each single-path step also trains the largest and the smallest sub-network (full
    # and minimal width, depth, resolution) on the same batch and cells; `distill` lets the largest one's
    # predictions be the others' targets (in-place distillation).
    sandwich: bool = False
    distill: bool = False
    epochs: int = 2  # bilevel epochs (weights on train, alphas on search-validation)
    sample_epochs: int = 20  # single-path fine-tuning epochs after the bilevel phase
    sampling: str = "uniform"  # single-path sampling: "uniform", "fair" (each op once per 7 steps) or "alpha"
    batch_size: int = 64
    seed: int = 0
    w_lr: float = 0.05
    w_lr_min: float = 1e-3
    w_momentum: float = 0.9
    w_weight_decay: float = 3e-4
    alpha_lr: float = 3e-4
    alpha_weight_decay: float = 1e-3
    grad_clip: float = 5.0
    guard: str = "early_stop"  # collapse guard: "none", "skip_dropout" or "early_stop"
    skip_dropout: float = 0.3  # drop rate of parameter-free ops when guard == "skip_dropout"
    max_param_free: int = 4  # early_stop: freeze alphas once the derived normal cell has more parameter-free ops
    valid_fraction: float = 0.2
    test_fraction: float = 0.2
    train_subset: int = 0  # > 0: a stratified subset of this many training images (CPU budgets); 0: all

    def __post_init__(self) -> None:
        if not isinstance(self.macro, MacroConfig):
            raise ValueError(f"macro must be a MacroConfig, got {type(self.macro).__name__}")
        if not isinstance(self.resolutions, tuple) or not all(
            isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= MACRO_LIMITS["resolution"] for r in self.resolutions
        ):
            raise ValueError(f"resolutions must be a tuple of positive integers, got {self.resolutions!r}")
        if len(self.all_resolutions) > 1 and self.sample_epochs == 0:
            raise ValueError("extra resolutions are trained by single-path steps only; they need sample_epochs > 0")
        if not isinstance(self.elastic_depth, bool):
            raise ValueError(f"elastic_depth must be true or false, got {self.elastic_depth!r}")
        if self.elastic_depth and self.sample_epochs == 0:
            raise ValueError("elastic depth is trained by single-path steps only; it needs sample_epochs > 0")
        if self.distill and not self.sandwich:
            raise ValueError("distill needs sandwich: the largest sub-network of the sandwich is the teacher")
        if not isinstance(self.elastic_width, bool):
            raise ValueError(f"elastic_width must be true or false, got {self.elastic_width!r}")
        if self.elastic_width and self.sample_epochs == 0:
            raise ValueError("elastic width is trained by single-path steps only; it needs sample_epochs > 0")
        for name in ("epochs", "sample_epochs", "max_param_free", "seed", "train_subset"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        if self.epochs + self.sample_epochs < 1:
            raise ValueError("epochs + sample_epochs must be at least 1")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        for name in ("w_lr", "w_lr_min", "alpha_lr", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("w_momentum", "w_weight_decay", "alpha_weight_decay", "skip_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.sampling not in ("uniform", "fair", "alpha"):
            raise ValueError(f"sampling must be 'uniform', 'fair' or 'alpha', got {self.sampling!r}")
        if self.guard not in ("none", "skip_dropout", "early_stop"):
            raise ValueError(f"guard must be 'none', 'skip_dropout' or 'early_stop', got {self.guard!r}")
        if not (0 < self.valid_fraction < 1 and 0 < self.test_fraction < 1 and self.valid_fraction + self.test_fraction < 1):
            raise ValueError("valid_fraction and test_fraction must be in (0, 1) and sum to less than 1")

    @property
    def all_resolutions(self) -> tuple[int, ...]:
        """Every input resolution the supernet is trained at, ascending (macro.resolution included)."""
        return tuple(sorted({self.macro.resolution, *self.resolutions}))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON files (macro nested)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "SupernetConfig":
        """Parse a dict, naming unknown keys."""
        _check_keys(cls, data, "supernet config")
        data = dict(data)
        if "macro" in data:
            data["macro"] = MacroConfig.from_dict(data["macro"])
        if isinstance(data.get("resolutions"), list):  # JSON has no tuples
            data["resolutions"] = tuple(data["resolutions"])
        return _build(cls, data, "supernet config")


SEARCH_ALGORITHMS = ("nsga2", "random")


@dataclass(frozen=True)
class SearchConfig:
    """One architecture search: `hwnas search` flags map onto these fields."""

    pop: int = 40  # population per generation (random search draws the same number per generation)
    gens: int = 30  # generations, the initial population included; evaluations ~= pop * gens
    max_latency_ms: float | None = None  # budget: predicted latency on the profiled device
    max_params_m: float | None = None  # budget: parameters in millions
    algorithm: str = "nsga2"
    seed: int = 0
    workers: int = 0  # > 1: evaluate through a Dask LocalCluster with this many workers
    scheduler: str | None = None  # address of a running Dask scheduler (overrides workers)

    def __post_init__(self) -> None:
        for name in ("pop", "gens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.pop < 4:
            raise ValueError(f"pop must be at least 4 so NSGA-II has parents to select from, got {self.pop}")
        for name in ("max_latency_ms", "max_params_m"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.algorithm not in SEARCH_ALGORITHMS:
            raise ValueError(f"algorithm must be one of {', '.join(SEARCH_ALGORITHMS)}, got {self.algorithm!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.workers, int) or self.workers < 0:
            raise ValueError(f"workers must be a non-negative integer, got {self.workers!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON files."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "SearchConfig":
        """Parse a dict, naming unknown keys."""
        _check_keys(cls, data, "search config")
        return _build(cls, data, "search config")


@dataclass(frozen=True)
class ProfileConfig:
    """`hwnas profile`: which device, how long, how much to measure (flags map 1:1 to fields)."""

    device: str = "this-device"  # profile name; the file defaults to profiles/<device>.json
    threads: int = 1  # onnxruntime intra_op_num_threads
    budget_min: float = 15.0  # stop starting new timing rounds after this many minutes (at least 2 rounds run)
    out: str | None = None
    resume: bool = False
    quick: bool = False  # fewer networks and runs: a profile in ~2 minutes, validation still reported
    macro: MacroConfig = DEFAULT_MACRO
    n_calibration: int = 150  # random networks the calibrated predictor is fitted on
    n_validation: int = 80  # disjoint held-out networks, measured twice (noise ceiling)
    runs: int = 100  # timed runs per session
    warmup: int = 10
    rounds: int = 6  # interleaved fresh-session rounds; validation uses even vs odd rounds as two measurements
    optimization_level: str = "all"
    seed: int = 0
    # Calibration and validation networks of every elastic depth (the first cell of each stage kept or not),
    # so the predictor is fitted and validated on networks that drop cells too.
    elastic_depth: bool = True
    # Likewise networks of every elastic width, and the blocks of every width's channel counts.
    elastic_width: bool = True
    provider: str = "CPUExecutionProvider"  # onnxruntime execution provider
    provider_options: tuple[tuple[str, str], ...] = ()  # sorted (key, value) pairs; a dict is accepted

    def __post_init__(self) -> None:
        opts = self.provider_options.items() if isinstance(self.provider_options, dict) else self.provider_options
        object.__setattr__(self, "provider_options", tuple(sorted((str(k), str(v)) for k, v in opts)))
        if not self.device or any(c in self.device for c in "/\\"):
            raise ValueError(f"device name must be a non-empty file-name-safe string, got {self.device!r}")
        for name in ("threads", "n_calibration", "n_validation", "runs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.rounds < 2:
            raise ValueError(f"rounds must be >= 2 (validation needs two independent measurements), got {self.rounds}")
        if self.budget_min <= 0:
            raise ValueError(f"budget_min must be > 0, got {self.budget_min}")

    def resolved(self) -> "ProfileConfig":
        """Apply --quick: smaller sets and fewer runs (explicitly given sizes are overridden)."""
        if not self.quick:
            return self
        from dataclasses import replace

        return replace(self, n_calibration=40, n_validation=30, runs=50, rounds=4, budget_min=min(self.budget_min, 3.0))

    def measurement_key(self) -> dict[str, Any]:
        """Fields that change what gets measured: a resumed run must agree on all of them."""
        keep = ("threads", "macro", "n_calibration", "n_validation", "runs", "warmup", "rounds", "optimization_level", "seed",
                "elastic_depth", "elastic_width", "provider", "provider_options")
        key = {k: (getattr(self, k).to_dict() if k == "macro" else getattr(self, k)) for k in keep}
        return {**key, "provider_options": dict(self.provider_options)}
