"""Supernet training: first-order DARTS bilevel epochs, then single-path fine-tuning; checkpoint every epoch.

Every source of randomness after initialisation is re-seeded from (seed, epoch), so a run resumed from
the checkpoint of epoch k continues exactly like an uninterrupted one.
"""
from __future__ import annotations

import logging
import os
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from hwnas.config import MacroConfig, SupernetConfig
from hwnas.data import DataSplits, MultiResolutionData, load_dataset
from hwnas.space.genotype import (MIN_STAGE_DEPTH, N_STAGES, STEPS, WIDTH_CHOICES, Genotype, active_cells,
                                  cell_channels, stage_depths)
from hwnas.space.ops import GENOTYPE_OPS, PRIMITIVES
from hwnas.space.supernet import Supernet, edge_index
from hwnas.jsonio import atomic_write_json, dumps, load_json, parse_json

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1
CHECKPOINT_FILE = "supernet.pt"
CONFIG_FILE = "supernet.json"
GENOTYPE_FILE = "genotype.json"
PARAM_FREE_OPS = ("max_pool_3x3", "avg_pool_3x3", "skip_connect")
SKIP_COLUMN = PRIMITIVES.index("skip_connect")
Progress = Callable[[int, int, dict[str, Any]], None]  # (steps done, total steps, latest metrics)


def resolve_config(cfg: SupernetConfig, data: DataSplits) -> SupernetConfig:
    """`cfg` with the macro's input channels and classes taken from the dataset."""
    if (cfg.macro.in_channels, cfg.macro.classes) != (data.in_channels, data.num_classes):
        log.info(
            "dataset %s has %d channel(s) and %d classes; using them in the macro",
            cfg.data, data.in_channels, data.num_classes,
        )
        cfg = replace(cfg, macro=replace(cfg.macro, in_channels=data.in_channels, classes=data.num_classes))
    return cfg


def load_data(cfg: SupernetConfig, resolution: int | None = None) -> DataSplits:
    """The dataset splits `cfg` trains and evaluates on, at `resolution` (default: the macro's)."""
    return load_dataset(cfg.data, resolution or cfg.macro.resolution, cfg.seed, cfg.valid_fraction, cfg.test_fraction,
                        train_subset=cfg.train_subset)


def load_elastic_data(cfg: SupernetConfig) -> MultiResolutionData:
    """The same splits at every resolution the supernet of `cfg` is trained at, loaded on first use."""
    return MultiResolutionData(cfg.data, cfg.all_resolutions, cfg.seed, cfg.valid_fraction, cfg.test_fraction,
                               cfg.train_subset)


def param_free_count(genotype: Genotype, cell: str = "normal") -> int:
    """Number of parameter-free ops (pools, skip) in one cell of `genotype`."""
    return sum(op in PARAM_FREE_OPS for op, _ in getattr(genotype, cell))


def train_supernet(
    cfg: SupernetConfig,
    out_dir: Path,
    resume: bool = False,
    progress: Progress | None = None,
    epoch_callback: Callable[[int, Supernet], None] | None = None,
) -> Path:
    """Train a supernet into `out_dir` (supernet.pt, supernet.json, genotype.json); returns `out_dir`.

    `epoch_callback(epoch, supernet)` runs after each epoch's checkpoint (e.g. to track estimates); it
    must leave the supernet as it found it.
    """
    out_dir = Path(out_dir)
    data = load_data(cfg)
    cfg = resolve_config(cfg, data)
    ckpt_path = out_dir / CHECKPOINT_FILE
    state: dict[str, Any] | None = None
    if ckpt_path.exists():
        if not resume:
            raise ValueError(f"{out_dir} already holds a supernet checkpoint; pass --resume to continue it or choose another --out")
        saved_cfg = _read_meta(out_dir)[0]
        if saved_cfg != cfg:
            diff = [f.name for f in fields(cfg) if getattr(cfg, f.name) != getattr(saved_cfg, f.name)]
            raise ValueError(f"{out_dir / CONFIG_FILE}: the checkpoint was trained with other settings ({', '.join(diff)}); resume with the same flags")
        state = _load_checkpoint(ckpt_path, resumable=True)
    elif resume:
        log.info("nothing to resume in %s; starting a new run", out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    with torch.random.fork_rng():  # seeded initialisation without disturbing the caller's RNG
        torch.manual_seed(cfg.seed)
        supernet = Supernet(cfg.macro)
    total_epochs = cfg.epochs + cfg.sample_epochs
    w_opt = torch.optim.SGD(
        supernet.weight_parameters(), lr=cfg.w_lr, momentum=cfg.w_momentum, weight_decay=cfg.w_weight_decay
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(w_opt, T_max=total_epochs, eta_min=cfg.w_lr_min)
    a_opt = torch.optim.Adam(
        supernet.arch_parameters(), lr=cfg.alpha_lr, betas=(0.5, 0.999), weight_decay=cfg.alpha_weight_decay
    )
    history: list[dict[str, Any]] = []
    alphas_frozen = False
    start_epoch = 0
    if state is not None:
        try:
            supernet.load_state_dict(state["model"])
            w_opt.load_state_dict(state["w_opt"])
            a_opt.load_state_dict(state["a_opt"])
            sched.load_state_dict(state["sched"])
        except (KeyError, RuntimeError, ValueError) as err:
            raise ValueError(f"{ckpt_path}: checkpoint does not fit this configuration ({err})") from None
        history, alphas_frozen, start_epoch = state["history"], state["alphas_frozen"], state["epoch"]
        log.info("resuming %s after epoch %d of %d", out_dir, start_epoch, total_epochs)

    x_train, y_train = data.train.tensors
    x_valid, y_valid = data.valid.tensors
    resolutions = cfg.all_resolutions
    # The same training images at each resolution (identical splits), so a step can switch resolution.
    x_train_at = {r: load_data(cfg, r).train.tensors[0] for r in resolutions} if len(resolutions) > 1 else {}
    steps_per_epoch = -(-len(x_train) // cfg.batch_size)
    total_steps = total_epochs * steps_per_epoch
    space_rng_seed = cfg.seed * 1_000_003
    supernet.train()
    for epoch in range(start_epoch, total_epochs):
        bilevel = epoch < cfg.epochs
        gen = torch.Generator().manual_seed(space_rng_seed + epoch)
        np_rng = np.random.default_rng([cfg.seed, epoch])
        train_perm = torch.randperm(len(x_train), generator=gen)
        valid_perm = torch.randperm(len(x_valid), generator=gen)
        alphas_before = [a.detach().clone() for a in supernet.arch_parameters()]
        sums = {"loss": 0.0, "correct": 0.0, "n": 0, "valid_loss": 0.0, "valid_n": 0}
        for step in range(steps_per_epoch):
            active = None  # every cell; single-path steps of an elastic-depth supernet drop some
            channels = None  # full width; single-path steps of an elastic-width supernet narrow stages
            idx = train_perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            x, y = x_train[idx], y_train[idx]
            if bilevel:
                if not alphas_frozen:
                    start = (step * cfg.batch_size) % len(x_valid)
                    vidx = valid_perm.roll(-start)[: cfg.batch_size]
                    a_opt.zero_grad(set_to_none=True)
                    _requires_grad(supernet.weight_parameters(), False)  # first order: no weight gradients here
                    v_loss = F.cross_entropy(supernet(x_valid[vidx], _guarded(supernet.softmax_weights(), cfg, gen)), y_valid[vidx])
                    v_loss.backward()
                    _requires_grad(supernet.weight_parameters(), True)
                    a_opt.step()
                    sums["valid_loss"] += v_loss.item() * len(vidx)
                    sums["valid_n"] += len(vidx)
                with torch.no_grad():
                    weights = _guarded(tuple(w.detach() for w in supernet.softmax_weights()), cfg, gen)
            else:
                if cfg.sampling == "fair" and step % len(GENOTYPE_OPS) == 0:
                    # FairNAS-style strict fairness: every op of every slot runs once per block of 7 steps.
                    fair_perms = np.stack([np_rng.permutation(len(GENOTYPE_OPS)) for _ in range(4 * STEPS)])
                fair_ops = fair_perms[:, step % len(GENOTYPE_OPS)] if cfg.sampling == "fair" else None
                weights = supernet.genotype_weights(sample_genotype(supernet, cfg.sampling, np_rng, fair_ops))
                if x_train_at:  # drawn after the path, so fixed-resolution runs keep their random sequence
                    x = x_train_at[resolutions[int(np_rng.integers(len(resolutions)))]][idx]
                if cfg.elastic_depth:  # drawn last, for the same reason
                    active = active_cells(cfg.macro, sample_depth(cfg.macro, np_rng))
                if cfg.elastic_width:  # after depth, so supernets without elastic width keep their sequence
                    channels = cell_channels(cfg.macro, sample_width(np_rng))
            paths = [(x, active, channels)]
            if not bilevel and cfg.sandwich:  # the largest and smallest sub-network beside the sampled one
                paths = [*sandwich_paths(cfg, x, idx, x_train_at), *paths]
            w_opt.zero_grad(set_to_none=True)
            teacher = None
            for k, (xp, act, ch) in enumerate(paths):
                logits = supernet(xp, weights, act, ch)
                if teacher is not None:  # in-place distillation: the largest sub-network teaches the others
                    loss = F.kl_div(F.log_softmax(logits, 1), teacher, reduction="batchmean")
                else:
                    loss = F.cross_entropy(logits, y)
                (loss / len(paths)).backward()
                if cfg.distill and len(paths) > 1 and k == 0:
                    teacher = F.softmax(logits.detach(), 1)
            torch.nn.utils.clip_grad_norm_(list(supernet.weight_parameters()), cfg.grad_clip)
            w_opt.step()
            loss = F.cross_entropy(logits.detach(), y)  # the sampled sub-network's (the last path's)
            sums["loss"] += loss.item() * len(y)
            sums["correct"] += float((logits.argmax(1) == y).sum())
            sums["n"] += len(y)
            if progress is not None:
                progress(epoch * steps_per_epoch + step + 1, total_steps, {"epoch": epoch + 1, "loss": loss.item()})
        sched.step()

        genotype = supernet.derive()
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "phase": "bilevel" if bilevel else f"single-path ({cfg.sampling})",
            "train_loss": sums["loss"] / sums["n"],
            "train_acc": sums["correct"] / sums["n"],
            "search_valid_loss": sums["valid_loss"] / sums["valid_n"] if sums["valid_n"] else None,
            "genotype": genotype.arch_id,
            "param_free_normal": param_free_count(genotype),
            "alphas_frozen": alphas_frozen,
        }
        collapsing = param_free_count(genotype) > cfg.max_param_free
        # After the first epoch the alphas have barely left their random initialisation, so a
        # parameter-free-heavy cell then is noise, not collapse: the check starts with epoch 2.
        if bilevel and epoch > 0 and not alphas_frozen and cfg.guard == "early_stop" and collapsing:
            # DARTS+-style early stop: the alphas started to collapse onto parameter-free ops this epoch,
            # so keep the ones from before it and train only the weights from here on.
            with torch.no_grad():
                for a, before in zip(supernet.arch_parameters(), alphas_before):
                    a.copy_(before)
            alphas_frozen = True
            genotype = supernet.derive()
            record.update(alphas_frozen=True, genotype=genotype.arch_id, param_free_normal=param_free_count(genotype))
            log.info("epoch %d: derived normal cell became parameter-free-heavy; alphas frozen", epoch + 1)
        history.append(record)
        log.info("epoch %d/%d %s", epoch + 1, total_epochs, record)
        atomic_write_json(out_dir / GENOTYPE_FILE, genotype.to_dict())
        _save_checkpoint(
            ckpt_path,
            {
                "model": supernet.state_dict(),
                "w_opt": w_opt.state_dict(),
                "a_opt": a_opt.state_dict(),
                "sched": sched.state_dict(),
                "epoch": epoch + 1,
                "alphas_frozen": alphas_frozen,
                "history": dumps(history),
            },
        )
        _write_meta(out_dir, cfg, history, epoch + 1 == total_epochs)
        if epoch_callback is not None:
            epoch_callback(epoch + 1, supernet)
            supernet.train()
    if start_epoch >= total_epochs:
        # A kill between the last checkpoint and its supernet.json leaves the meta one epoch behind: finish it.
        _write_meta(out_dir, cfg, history, True)
        log.info("%s is already complete (%d epochs)", out_dir, total_epochs)
    return out_dir


def sample_genotype(
    supernet: Supernet, sampling: str, rng: np.random.Generator, fair_ops: np.ndarray | None = None
) -> Genotype:
    """One random single path: uniform, or ops and inputs drawn in proportion to the alphas ("alpha"),
    or ("fair") the op indices given in `fair_ops` (16 slots: normal then reduce) with uniform inputs."""
    cells = []
    for c, alphas in enumerate((supernet.alphas_normal, supernet.alphas_reduce)):
        probs = F.softmax(alphas.detach(), dim=-1)[:, 1:].double().numpy()  # (14, 7) without "none"
        pairs = []
        for node in range(STEPS):
            rows = [edge_index(node, j) for j in range(node + 2)]
            if sampling in ("uniform", "fair"):
                inputs = rng.choice(node + 2, size=2, replace=False)
                ops = rng.integers(len(GENOTYPE_OPS), size=2)
                if sampling == "fair":
                    if fair_ops is None:
                        raise ValueError("fair sampling needs fair_ops")
                    base = c * 2 * STEPS + 2 * node
                    ops = fair_ops[base : base + 2]
            else:
                edge_p = probs[rows].max(axis=1)
                inputs = rng.choice(node + 2, size=2, replace=False, p=edge_p / edge_p.sum())
                ops = [rng.choice(len(GENOTYPE_OPS), p=probs[rows[j]] / probs[rows[j]].sum()) for j in inputs]
            pairs += [(GENOTYPE_OPS[int(o)], int(j)) for o, j in zip(ops, inputs)]
        cells.append(tuple(pairs))
    return Genotype(normal=cells[0], reduce=cells[1], macro=supernet.macro)


def sample_depth(macro: MacroConfig, rng: np.random.Generator) -> tuple[int, ...]:
    """Normal cells kept per stage, each stage's count uniform over its range (elastic depth)."""
    return tuple(int(rng.integers(lo, hi + 1)) for lo, hi in zip(MIN_STAGE_DEPTH, stage_depths(macro)))


def sandwich_paths(cfg: SupernetConfig, x: torch.Tensor, idx: torch.Tensor,
                   x_train_at: dict[int, torch.Tensor]) -> list[tuple[torch.Tensor, tuple[bool, ...] | None, tuple[int, ...] | None]]:
    """(input, active cells, channels) of the largest and the smallest sub-network (BigNAS sandwich rule)."""
    res = cfg.all_resolutions
    big_x = x_train_at[res[-1]][idx] if x_train_at else x
    small_x = x_train_at[res[0]][idx] if x_train_at else x
    small_active = active_cells(cfg.macro, MIN_STAGE_DEPTH) if cfg.elastic_depth else None
    small_channels = cell_channels(cfg.macro, (min(WIDTH_CHOICES),) * N_STAGES) if cfg.elastic_width else None
    return [(big_x, None, None), (small_x, small_active, small_channels)]


def sample_width(rng: np.random.Generator) -> tuple[float, ...]:
    """Channel fraction per stage, each uniform over WIDTH_CHOICES (elastic width)."""
    return tuple(WIDTH_CHOICES[int(i)] for i in rng.integers(len(WIDTH_CHOICES), size=N_STAGES))


def _requires_grad(params, flag: bool) -> None:
    for p in params:
        p.requires_grad_(flag)


def _guarded(weights: tuple[torch.Tensor, torch.Tensor], cfg: SupernetConfig, gen: torch.Generator):
    """Apply the skip-dropout guard (P-DARTS style: drop skip connections, rescale) when it is configured."""
    if cfg.guard != "skip_dropout" or cfg.skip_dropout == 0:
        return weights
    out = []
    for w in weights:
        keep = (torch.rand(w.shape[0], generator=gen) >= cfg.skip_dropout).to(w.dtype) / (1 - cfg.skip_dropout)
        scale = torch.ones_like(w)
        scale[:, SKIP_COLUMN] = keep
        out.append(w * scale)
    return out[0], out[1]


def load_supernet(out_dir: Path) -> tuple[Supernet, SupernetConfig]:
    """The trained supernet (eval mode) and its config from `out_dir`; ValueError naming the problem."""
    out_dir = Path(out_dir)
    cfg, meta = _read_meta(out_dir)
    ckpt_path = out_dir / CHECKPOINT_FILE
    if not ckpt_path.is_file():
        raise ValueError(f"{ckpt_path}: no supernet checkpoint (run hwnas train-supernet --out {out_dir})")
    state = _load_checkpoint(ckpt_path)
    supernet = Supernet(cfg.macro)
    try:
        supernet.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as err:
        raise ValueError(f"{ckpt_path}: weights do not fit the supernet of {out_dir / CONFIG_FILE} ({err})") from None
    if not meta.get("complete", False):
        log.warning("%s: training stopped early (%d epochs); `hwnas train-supernet --resume` continues it", out_dir, len(meta.get("history", [])))
    return supernet.eval(), cfg


def _load_checkpoint(path: Path, resumable: bool = False) -> dict[str, Any]:
    """The checkpoint's state; `resumable`: also the optimiser states, epoch and history (history parsed)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or foreign files raise assorted errors from the unpickler/zip reader
        raise ValueError(f"{path}: not a readable supernet checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise ValueError(f"{path}: not a hwnas supernet checkpoint (no 'model' state dict)")
    if not resumable:
        return state
    for key in ("w_opt", "a_opt", "sched"):
        if not isinstance(state.get(key), dict):
            raise ValueError(f"{path}: checkpoint has no {key!r} state to resume from")
    epoch, frozen, history = state.get("epoch"), state.get("alphas_frozen"), state.get("history")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise ValueError(f"{path}: checkpoint 'epoch' must be a non-negative integer, got {epoch!r}")
    if not isinstance(frozen, bool):
        raise ValueError(f"{path}: checkpoint 'alphas_frozen' must be true or false, got {frozen!r}")
    if not isinstance(history, str):
        raise ValueError(f"{path}: checkpoint 'history' must be JSON text")
    history = parse_json(history, f"{path}: history")
    if not isinstance(history, list) or len(history) != epoch:
        raise ValueError(f"{path}: checkpoint history must list one record per finished epoch ({epoch})")
    return {**state, "history": history}


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save to a temporary file, flushed to disk, then rename: an interruption never leaves half a checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_meta(out_dir: Path, cfg: SupernetConfig, history: list[dict[str, Any]], complete: bool) -> None:
    atomic_write_json(
        out_dir / CONFIG_FILE,
        {"schema_version": SCHEMA_VERSION, "config": cfg.to_dict(), "complete": complete, "history": history},
    )


def _read_meta(out_dir: Path) -> tuple[SupernetConfig, dict[str, Any]]:
    path = out_dir / CONFIG_FILE
    meta = load_json(path, f"no such file; is {out_dir} a supernet directory?")
    if not isinstance(meta, dict) or meta.get("schema_version") != SCHEMA_VERSION:
        got = meta.get("schema_version") if isinstance(meta, dict) else None
        raise ValueError(f"{path}: schema_version: expected {SCHEMA_VERSION}, got {got!r}")
    if not isinstance(meta.get("history", []), list) or not isinstance(meta.get("complete", False), bool):
        raise ValueError(f"{path}: 'history' must be a list and 'complete' true or false")
    try:
        return SupernetConfig.from_dict(meta.get("config")), meta
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: config: {err}") from None
