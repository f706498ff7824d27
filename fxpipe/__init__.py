"""fxpipe: compile a plain nn.Module into balanced pipeline stages and train them under PipeDream-2BW."""

from fxpipe.errors import *  # noqa: F401,F403
from fxpipe.errors import __all__ as _errors_all
from fxpipe.ir import CostModel, NodeCost, Plan, StagePlan

__version__ = "0.1.0"

__all__ = ["CostModel", "NodeCost", "Plan", "StagePlan", *_errors_all]
