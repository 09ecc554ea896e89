"""Architecture search: the pymoo problem, the NSGA-II / random runner with JSON checkpoints, the Pareto front."""
from hwnas.search.front import OBJECTIVES, FrontMember, ParetoFront, hypervolume, non_dominated, plot_fronts
from hwnas.search.problem import HWNASProblem, ParamsCounter, SpaceRepair
from hwnas.search.runner import search

__all__ = [
    "OBJECTIVES", "FrontMember", "HWNASProblem", "ParamsCounter", "ParetoFront", "SpaceRepair",
    "hypervolume", "non_dominated", "plot_fronts", "search",
]
