"""Accuracy estimate of a genotype through the supernet's shared weights, with per-genotype BatchNorm recalibration."""
from __future__ import annotations

import logging
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hwnas.data import DataSplits, splits_at
from hwnas.space.genotype import Genotype
from hwnas.space.supernet import Supernet

log = logging.getLogger(__name__)


class AccuracyEstimator:
    """Validation error (and loss) of genotypes evaluated with the supernet's shared weights, cached by arch_id.

    For each genotype the BatchNorm running statistics are re-estimated on `calib_batches` fixed training
    batches with only that sub-network active (one-hot edge weights; unselected ops are skipped), then the
    search-validation split is classified in eval mode. The supernet's own statistics are restored afterwards.
    `data` is one DataSplits, or a resolution -> DataSplits mapping when genotypes differ in input resolution.
    """

    def __init__(
        self,
        supernet: Supernet,
        data: DataSplits | Mapping[int, DataSplits],
        calib_batches: int = 4,
        batch_size: int = 128,
        recalibrate_bn: bool = True,
        split: str = "valid",
    ) -> None:
        if split not in ("valid", "test"):
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
        if calib_batches < 1 or batch_size < 1:
            raise ValueError("calib_batches and batch_size must be positive")
        first = splits_at(data, next(iter(data))) if isinstance(data, Mapping) else data
        if (first.in_channels, first.num_classes) != (supernet.macro.in_channels, supernet.macro.classes):
            raise ValueError(
                f"dataset ({first.in_channels} channels, {first.num_classes} classes) does not fit "
                f"the supernet macro {supernet.macro}"
            )
        if not isinstance(data, Mapping) and data.resolution != supernet.macro.resolution:
            raise ValueError(f"dataset is at {data.resolution}px but the supernet macro at {supernet.macro.resolution}px; "
                             "pass a resolution -> splits mapping to estimate other resolutions")
        self.supernet = supernet
        self.data = data
        self.calib_batches = calib_batches
        self.batch_size = batch_size
        self.recalibrate_bn = recalibrate_bn
        self.split = split
        self._cache: dict[str, tuple[float, float]] = {}

    def _calibration_images(self, splits: DataSplits) -> torch.Tensor:
        """A fixed training subset (the same samples at every resolution): deterministic, comparable estimates."""
        x_train = splits.train.tensors[0]
        perm = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))
        return x_train[perm[: self.calib_batches * self.batch_size]]

    def error(self, genotypes: Sequence[Genotype]) -> np.ndarray:
        """Validation error in [0, 1] per genotype."""
        return np.array([self._evaluate(g)[0] for g in genotypes])

    def loss(self, genotypes: Sequence[Genotype]) -> np.ndarray:
        """Validation cross-entropy per genotype."""
        return np.array([self._evaluate(g)[1] for g in genotypes])

    def _evaluate(self, genotype: Genotype) -> tuple[float, float]:
        key = genotype.arch_id
        if key not in self._cache:
            self._cache[key] = self._measure(genotype)
        return self._cache[key]

    @torch.no_grad()
    def _measure(self, genotype: Genotype) -> tuple[float, float]:
        net = self.supernet
        device = next(net.parameters()).device
        weights = tuple(w.to(device) for w in net.genotype_weights(genotype))
        splits = splits_at(self.data, genotype.macro.resolution)
        was_training = net.training
        saved = _bn_state(net) if self.recalibrate_bn else None
        try:
            if self.recalibrate_bn:
                _recalibrate(net, weights, genotype, self._calibration_images(splits), self.batch_size, device)
            net.eval()
            x_eval, y_eval = getattr(splits, self.split).tensors
            wrong, loss_sum = 0, 0.0
            for start in range(0, len(x_eval), self.batch_size):
                x = x_eval[start : start + self.batch_size].to(device)
                y = y_eval[start : start + self.batch_size].to(device)
                logits = net(x, weights, genotype.active_cells, genotype.cell_channels)
                loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
                wrong += int((logits.argmax(1) != y).sum())
        finally:
            if saved is not None:
                _restore_bn(saved)
            net.train(was_training)
        return wrong / len(x_eval), loss_sum / len(x_eval)


BNState = list[tuple[nn.modules.batchnorm._BatchNorm, dict[str, torch.Tensor], float | None]]


def _bn_state(net: nn.Module) -> BNState:
    """Copies of every BatchNorm's running statistics and momentum."""
    return [
        (m, {k: v.clone() for k, v in m.state_dict().items()}, m.momentum)
        for m in net.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]


def _restore_bn(saved: BNState) -> None:
    for module, buffers, momentum in saved:
        module.load_state_dict(buffers)
        module.momentum = momentum


def _recalibrate(
    net: Supernet, weights: tuple[torch.Tensor, torch.Tensor], genotype: Genotype, calib: torch.Tensor,
    batch_size: int, device: torch.device,
) -> None:
    """Re-estimate BatchNorm statistics for one sub-network: cumulative average over the calibration batches."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average: every calibration batch counts equally
    net.train()
    for start in range(0, len(calib), batch_size):
        net(calib[start : start + batch_size].to(device), weights, genotype.active_cells, genotype.cell_channels)

