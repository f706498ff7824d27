"""fxpipe: compile a plain nn.Module into balanced pipeline stages and train them under PipeDream-2BW."""

from fxpipe.errors import *  # noqa: F401,F403
from fxpipe.errors import __all__ as _errors_all
from fxpipe.ir import CostModel, NodeCost, Plan, StagePlan
from fxpipe.api import PlannedGraph, compile, plan, plan_with_graph  # noqa: A004 - the public names are the contract

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "Pipeline":
        from fxpipe.pipeline import Pipeline

        return Pipeline
    raise AttributeError(name)


__all__ = ["compile", "plan", "plan_with_graph", "PlannedGraph", "Pipeline", "CostModel", "NodeCost", "Plan", "StagePlan", *_errors_all]
