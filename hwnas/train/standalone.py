"""Stand-alone training of one discrete network from scratch, evaluated on the held-out test split."""
from __future__ import annotations

import threading
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from hwnas.data import DataSplits
from hwnas.space.genotype import Genotype
from hwnas.space.network import Network
from hwnas.train.fast_ops import DEFAULT_MODE, fast_training

Progress = Callable[[int, int, dict[str, Any]], None]  # (steps done, total steps, latest metrics)
_SEEDED_INIT = threading.Lock()


@torch.no_grad()
def evaluate(model: nn.Module, dataset: TensorDataset, batch_size: int = 256) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of `model` on `dataset`, in eval mode."""
    was_training = model.training
    model.eval()
    x_all, y_all = dataset.tensors
    correct, loss_sum = 0, 0.0
    for start in range(0, len(x_all), batch_size):
        logits = model(x_all[start : start + batch_size])
        y = y_all[start : start + batch_size]
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    model.train(was_training)
    return correct / len(x_all), loss_sum / len(x_all)


def train_network(
    genotype: Genotype,
    data: DataSplits,
    epochs: int,
    seed: int = 0,
    progress: Progress | None = None,
    batch_size: int = 64,
    optimizer: str = "sgd",
    lr: float | None = None,
    weight_decay: float = 3e-4,
    grad_clip: float = 5.0,
    mode: str = DEFAULT_MODE,
) -> tuple[Network, float]:
    """Train `genotype`'s network from scratch on the train split (cosine schedule); returns it and its test accuracy.

    `mode` ("fused", "compiled", "channels_last" or "eager", see hwnas.train.fast_ops) only changes how fast the
    steps run, not what they compute; the returned network is the plain nn module either way.
    """
    macro = genotype.macro
    if (macro.in_channels, macro.classes, macro.resolution) != (data.in_channels, data.num_classes, data.resolution):
        raise ValueError(
            f"genotype macro ({macro.in_channels} channels, {macro.classes} classes, {macro.resolution}px) does not "
            f"fit the dataset ({data.in_channels} channels, {data.num_classes} classes, {data.resolution}px)"
        )
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    # Seeded initialisation without disturbing the caller's RNG; the lock keeps it seeded when threads of one
    # process train at once (a Dask worker with several threads): they share torch's global generator.
    with _SEEDED_INIT, torch.random.fork_rng():
        torch.manual_seed(seed)
        net = Network(genotype)
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            net.parameters(), lr=lr or 0.05, momentum=0.9, weight_decay=weight_decay, nesterov=True
        )
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(net.parameters(), lr=lr or 3e-3, weight_decay=max(weight_decay, 1e-2))
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
    x_train, y_train = data.train.tensors
    steps_per_epoch = -(-len(x_train) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    with fast_training(net, mode):
        for epoch in range(epochs):
            perm = torch.randperm(len(x_train), generator=gen)
            for step in range(steps_per_epoch):
                idx = perm[step * batch_size : (step + 1) * batch_size]
                loss = F.cross_entropy(net(x_train[idx]), y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
                opt.step()
                sched.step()
                if progress is not None:
                    progress(epoch * steps_per_epoch + step + 1, epochs * steps_per_epoch,
                             {"epoch": epoch + 1, "loss": loss.item()})
        accuracy, _ = evaluate(net, data.test)
    return net.eval(), accuracy
