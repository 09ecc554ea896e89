"""DARTS cell search space: ops, genotypes, discrete network and supernet."""
from hwnas.space.genotype import Genotype, SearchSpace
from hwnas.space.network import Network, build_network, count_params
from hwnas.space.ops import GENOTYPE_OPS, PRIMITIVES, create_op
from hwnas.space.supernet import MixedOp, Supernet

__all__ = [
    "GENOTYPE_OPS", "PRIMITIVES", "Genotype", "MixedOp", "Network", "SearchSpace", "Supernet",
    "build_network", "count_params", "create_op",
]
