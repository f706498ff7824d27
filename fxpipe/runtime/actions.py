"""Actions, the unit of a schedule: ``Action(stage, kind, microbatch)`` printing as ``"1F0"``, and weight versions.

Conventions
-----------
* Microbatch indices are global across batches: microbatch ``i`` belongs to
  batch ``i // m`` (``m`` = microbatches per batch).
* ``"F"`` = forward, ``"B"`` = backward (input *and* weight gradient),
  ``"U"`` = optimizer update of the stage's weights; for ``"U"`` the
  ``microbatch`` field holds the **batch** index.
* Weight version ``v`` = the weights after ``v`` updates; version 0 exists at the
  start and version ``v`` is created by ``U`` of batch ``v - 1``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fxpipe.errors import ScheduleError
from fxpipe.ir import SCHEDULES, min_microbatches

__all__ = ["SCHEDULES", "KINDS", "Action", "batch_of", "weight_version", "check_config"]

KINDS: tuple[str, ...] = ("F", "B", "U")
"""Action kinds: forward, backward (input + weight gradient), optimizer update."""

_ACTION_RE = re.compile(r"^\s*(\d+)([FBU])(\d+)\s*$")


@dataclass(frozen=True)
class Action:
    """One step of one stage: ``Action(1, "F", 0)`` prints as ``"1F0"``.

    Attributes:
        stage: the pipeline stage (== rank) that runs the action.
        kind: ``"F"`` forward, ``"B"`` backward (input and weight gradients),
            ``"U"`` optimizer update of this stage's weights.
        microbatch: for ``"F"``/``"B"`` the global microbatch index (microbatch
            ``i`` belongs to batch ``i // m``); for ``"U"`` the **batch** index
            whose gradient is applied.
    """

    stage: int
    kind: str
    microbatch: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ScheduleError(
                f"Action kind must be one of {', '.join(KINDS)}; got {self.kind!r} "
                f"(stage={self.stage}, microbatch={self.microbatch})")
        if self.stage < 0 or self.microbatch < 0:
            raise ScheduleError(
                f"Action stage and microbatch must be >= 0; got stage={self.stage}, "
                f"microbatch={self.microbatch}")

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.microbatch}"

    @classmethod
    def parse(cls, text: str) -> Action:
        """Parse the text form back: ``Action.parse("1F0") == Action(1, "F", 0)``.

        Args:
            text: ``<stage><kind><microbatch>``, e.g. ``"2B5"`` or ``"0U1"``.

        Returns:
            The action.

        Raises:
            ScheduleError: the text does not have that form.
        """
        match = _ACTION_RE.match(text) if isinstance(text, str) else None
        if match is None:
            raise ScheduleError(
                f"cannot parse action {text!r}: expected <stage><kind><microbatch> with kind "
                f"in {'/'.join(KINDS)}, e.g. '1F0', '2B5', '0U1'")
        return cls(int(match.group(1)), match.group(2), int(match.group(3)))


def batch_of(action: Action, num_microbatches: int) -> int:
    """The batch an action belongs to.

    Args:
        action: any action.
        num_microbatches: microbatches per batch (``m``).

    Returns:
        ``microbatch // m`` for F/B, the batch index itself for U.
    """
    return action.microbatch if action.kind == "U" else action.microbatch // num_microbatches



def check_config(schedule: str, num_stages: int, num_microbatches: int, num_batches: int) -> None:
    """Raise ScheduleError unless the schedule name and sizes make a valid schedule."""
    if schedule not in SCHEDULES:
        raise ScheduleError(
            f"unknown schedule {schedule!r}: choose one of {', '.join(repr(s) for s in SCHEDULES)}")
    for name, value in (("num_stages", num_stages), ("num_microbatches", num_microbatches),
                        ("num_batches", num_batches)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ScheduleError(f"{name} must be an int >= 1, got {value!r}")
    if num_microbatches < min_microbatches(schedule, num_stages):
        raise ScheduleError(
            f"schedule '2bw' needs num_microbatches >= num_stages (m >= d), got "
            f"m={num_microbatches}, d={num_stages}: raise num_microbatches to >= {num_stages} "
            f"or use schedule='flush'")


def weight_version(schedule: str, action: Action, num_microbatches: int) -> int:
    """The weight version an action runs with (version v = weights after v updates).

    * ``"2bw"``: F/B of batch ``b`` use version ``max(b - 1, 0)``.
    * ``"flush"`` / ``"gpipe"``: F/B of batch ``b`` use version ``b``.
    * ``"U"`` of batch ``b`` (any schedule) steps the newest weights, version
      ``b``, producing version ``b + 1``; ``b`` is returned.

    Args:
        schedule: one of :data:`SCHEDULES`.
        action: the action.
        num_microbatches: microbatches per batch ``m``.

    Returns:
        The version index.

    Raises:
        ScheduleError: unknown schedule, or ``num_microbatches < 1``.
    """
    if schedule not in SCHEDULES:
        raise ScheduleError(
            f"unknown schedule {schedule!r}: choose one of {', '.join(repr(s) for s in SCHEDULES)}")
    if num_microbatches < 1:
        raise ScheduleError(f"num_microbatches must be >= 1, got {num_microbatches}")
    b = batch_of(action, num_microbatches)
    if action.kind == "U" or schedule != "2bw":
        return b
    return max(b - 1, 0)


