"""Errors a user can cause: every one is a subclass of :class:`FxpipeError`."""

from __future__ import annotations

__all__ = [
    "FxpipeError",
    "ConfigError",
    "TraceError",
    "CostModelError",
    "PartitionError",
    "InfeasibleMemoryError",
    "ScheduleError",
    "InputError",
    "StateDictError",
    "CheckpointError",
    "PlanFormatError",
    "LossError",
    "PipelineStateError",
    "ModelSpecError",
    "DistributedError",
    "PlanMismatchError",
]


class FxpipeError(Exception):
    """Base class of every error a user of fxpipe can cause.

    Messages state the values that were seen and the way out.
    """


class ConfigError(FxpipeError, ValueError):
    """An argument of :func:`fxpipe.compile` / :func:`fxpipe.plan` is out of range."""


class PlanFormatError(ConfigError):
    """A Plan's JSON (``Plan.from_json``, ``compile(plan=path)``) is not valid JSON or not a Plan."""


class TraceError(FxpipeError):
    """The model could not be turned into a torch.fx graph."""


class CostModelError(FxpipeError):
    """A cost model returned something unusable (negative, NaN, wrong type)."""


class PartitionError(FxpipeError):
    """The planner could not cut the graph as asked."""


class InfeasibleMemoryError(PartitionError):
    """No plan fits the per-device memory limit.

    Attributes:
        memory_limit: the limit that was asked for, in bytes.
        min_feasible: the smallest limit (or a lower bound on it) that would work.
        binding_stage: the stage that binds, when known.
    """

    def __init__(self, message: str, *, memory_limit: int | None = None,
                 min_feasible: int | None = None, binding_stage: int | None = None) -> None:
        super().__init__(message)
        self.memory_limit = memory_limit
        self.min_feasible = min_feasible
        self.binding_stage = binding_stage


class ScheduleError(FxpipeError):
    """A pipeline schedule is unknown or invalid (e.g. 2bw with fewer microbatches than stages)."""


class InputError(FxpipeError, ValueError):
    """Inputs or targets given to ``step`` / ``__call__`` do not match what was compiled."""


class StateDictError(FxpipeError, KeyError):
    """A state dict given to ``load_state_dict`` has missing, unexpected or mis-shaped entries."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class CheckpointError(StateDictError):
    """A checkpoint directory cannot be written where asked, or cannot be read back."""


class LossError(FxpipeError, TypeError):
    """``loss_fn`` returned something ``step`` cannot train on (not a scalar tensor with a gradient)."""


class PipelineStateError(FxpipeError, RuntimeError):
    """The pipeline refuses to continue: an earlier ``step`` failed after some weights were updated."""


class ModelSpecError(FxpipeError):
    """A CLI model spec (``path.py:factory`` or ``pkg.mod:factory``) cannot be loaded."""


class DistributedError(FxpipeError):
    """A distributed run failed: a rank raised, died, or timed out."""


class PlanMismatchError(DistributedError):
    """Ranks of one distributed run hold different plans (or graphs that do not fit rank 0's plan)."""
