"""Stand-alone training of many (architecture, seed) runs spread over a Dask cluster.

Each run is independent (its own seed, its own network), so the runs go to Dask workers as they are and
come back as (state_dict, test accuracy); the caller rebuilds the network from the state_dict. The
same code serves a LocalCluster (`workers` > 1) and a running scheduler (`scheduler` address), as the
search's evaluation does.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterator, Sequence

import torch

from hwnas.space.genotype import Genotype
from hwnas.space.network import Network

log = logging.getLogger(__name__)
TrainFn = Callable[[Genotype, Any, int, int], tuple[torch.nn.Module, float]]  # (genotype, splits, epochs, seed)


CONNECT_TIMEOUT_S = 30  # how long a scheduler address is retried before it counts as unreachable


def wants_dask(workers: int, scheduler: str | None) -> bool:
    """Whether these options ask for a Dask cluster (a scheduler address, or more than one worker)."""
    return bool(scheduler) or workers > 1


def _distributed() -> Any:
    """The dask.distributed module, or a ValueError saying how to install it."""
    try:
        import dask.distributed
    except ImportError:
        raise ValueError("--workers / --scheduler need dask.distributed: pip install 'hwnas[dask]'") from None
    return dask.distributed


def check_cluster(workers: int, scheduler: str | None) -> None:
    """Raise ValueError now, before any long work, if the cluster these options ask for cannot be had."""
    if not wants_dask(workers, scheduler):
        return
    _distributed()
    if scheduler:
        with dask_client(workers, scheduler):
            pass


@contextlib.contextmanager
def dask_client(workers: int, scheduler: str | None) -> Iterator[Any]:
    """A dask.distributed Client on `scheduler`, or on a LocalCluster of `workers` one-thread processes."""
    distributed = _distributed()
    cluster = None
    if scheduler:
        try:
            client = distributed.Client(scheduler, timeout=CONNECT_TIMEOUT_S)
        except OSError as err:
            raise ValueError(f"cannot reach the Dask scheduler at {scheduler!r}: {err}") from None
    else:
        cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                           dashboard_address=None)
        client = distributed.Client(cluster)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _run_one(train: TrainFn, genotype: dict, splits: Any, epochs: int, seed: int) -> tuple[dict, float]:
    """One training run on a worker: (the trained network's state_dict, its test accuracy)."""
    net, acc = train(Genotype.from_dict(genotype), splits, epochs, seed)
    return {k: v.detach().cpu() for k, v in net.state_dict().items()}, float(acc)


def train_runs(
    runs: Sequence[tuple[Genotype, int]],
    splits_for: Callable[[Genotype], Any],
    epochs: int,
    train: TrainFn,
    client: Any,
    progress: Callable[[int, int], None] | None = None,
) -> dict[tuple[str, int], tuple[torch.nn.Module, float]]:
    """Train every (genotype, seed) of `runs` on the Dask `client`; (arch_id, seed) -> (network, test accuracy).

    `splits_for(genotype)` is the DataSplits the genotype trains on (its resolution's); each distinct one
    is sent to the workers once.
    """
    from dask.distributed import as_completed

    scattered: dict[int, Any] = {}
    futures = {}
    for genotype, seed in runs:
        splits = splits_for(genotype)
        if id(splits) not in scattered:
            scattered[id(splits)] = client.scatter(splits, broadcast=True)
        future = client.submit(_run_one, train, genotype.to_dict(), scattered[id(splits)], epochs, seed, pure=False)
        futures[future] = (genotype, seed)
    log.info("training %d runs on Dask (%s)", len(futures), client.scheduler.address)
    results: dict[tuple[str, int], tuple[torch.nn.Module, float] | Exception] = {}
    for done, future in enumerate(as_completed(futures), start=1):
        genotype, seed = futures[future]
        try:
            state, acc = future.result()
            net = Network(genotype)
            net.load_state_dict(state)
            results[(genotype.arch_id, seed)] = (net.eval(), acc)
        except Exception as err:  # noqa: BLE001 - the member's export records it, as a local run would
            results[(genotype.arch_id, seed)] = err
        if progress is not None:
            progress(done, len(futures))
    return results


def pretrained(
    genotypes: Sequence[Genotype],
    splits_for: Callable[[Genotype], Any],
    epochs: int,
    seeds: Sequence[int],
    train: TrainFn,
    workers: int,
    scheduler: str | None,
    progress: Callable[[int, int], None] | None = None,
) -> TrainFn:
    """Train every genotype with every seed on Dask now; returns a train function that hands out the results.

    The returned function has `train`'s signature, so the exporter's sequential code uses it unchanged; a
    run that failed on a worker raises its error there, when that member is exported.
    """
    with dask_client(workers, scheduler) as client:
        results = train_runs([(g, s) for g in genotypes for s in seeds], splits_for, epochs, train, client, progress)

    def lookup(genotype: Genotype, splits: Any, run_epochs: int, seed: int) -> tuple[torch.nn.Module, float]:
        found = results.get((genotype.arch_id, seed))
        if found is None or run_epochs != epochs:  # not planned ahead: train here
            return train(genotype, splits, run_epochs, seed)
        if isinstance(found, Exception):
            raise found
        return found

    return lookup
