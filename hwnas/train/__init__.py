"""Supernet training with checkpoint/resume, the shared-weight accuracy estimate, stand-alone training."""
from hwnas.train.estimate import AccuracyEstimator
from hwnas.train.standalone import evaluate, train_network
from hwnas.train.supernet import load_data, load_elastic_data, load_supernet, sample_genotype, train_supernet

__all__ = ["AccuracyEstimator", "evaluate", "load_data", "load_elastic_data", "load_supernet", "sample_genotype", "train_network", "train_supernet"]
