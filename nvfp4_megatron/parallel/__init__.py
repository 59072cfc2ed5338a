"""Parallel layout planning: 5D layouts with MoE parallel folding, parameters, FLOPs, memory, time.

``layout`` validates TP x CP x DP x PP (attention) and ETP x EP x EDP x PP (experts) over one
world and builds Megatron-Core's rank groups; ``model_stats`` counts parameters (analytic and
meta-device), model FLOPs and memory per GPU; ``hardware`` holds GPU peak rates with sources;
``planner`` ties them together for ``pretrain.py dry_run=true world_size=N`` (docs/planner.md).
Nothing here imports Megatron-Core at module import time (only the meta-device build does).
"""

from .layout import LayoutError, ParallelLayout, make_layout, rank_groups
from .planner import Plan, plan, run_dry_run

__all__ = ["LayoutError", "ParallelLayout", "Plan", "make_layout", "plan", "rank_groups",
           "run_dry_run"]
