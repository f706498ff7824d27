"""Reading a stage's transfer fields back from a plan's JSON (:meth:`fxpipe.ir.Plan.from_dict`).

``received_from`` is X_s by producer stage, ``[[p, bytes], ...]``; ``received_grad_from`` the
part of it whose gradient goes back (floating values), over the same producers, e.g. a stage
receiving 64 B of activations and 8 B of int64 token ids from stage 0 has
``received_from == [[0, 72]]`` and ``received_grad_from == [[0, 64]]``. Each reader names the
way out in its :class:`~fxpipe.errors.PlanFormatError`.
"""

from __future__ import annotations

from typing import Any

from fxpipe.errors import PlanFormatError

__all__ = ["received_from", "received_grad_from"]


def received_from(st: dict[str, Any], i: int, how: str) -> tuple[tuple[int, int], ...]:
    """A stage's ``received_from`` read back from JSON: [[p, bytes], ...], p < the stage, summing to X_s."""
    raw = st.get("received_from", ())
    if isinstance(raw, (list, tuple)) and not raw:
        return ()
    index = st["index"]
    pairs = _int_pairs(raw) if isinstance(index, int) else None
    ok, pairs = pairs is not None, pairs or ()
    last = index - 1 if isinstance(index, int) else "index - 1"
    if not ok or any(not 0 <= p < index or b < 0 for p, b in pairs) or len({p for p, _ in pairs}) != len(pairs) \
            or sum(b for _, b in pairs) != st.get("received_bytes", 0):
        raise PlanFormatError(
            f"Plan stage {i}: received_from must be [[producer stage, bytes], ...] with distinct producers in "
            f"0..{last}, bytes >= 0, summing to received_bytes={st.get('received_bytes', 0)!r}; got "
            f"{raw!r:.120}; {how}, or drop received_from (then all of received_bytes comes from stage {last})")
    return tuple(sorted(pairs))


def _int_pairs(raw: Any) -> tuple[tuple[int, int], ...] | None:
    """``raw`` as sorted (int, int) pairs, or None when it is not a list of two-int lists."""
    if not isinstance(raw, (list, tuple)) or not all(isinstance(e, (list, tuple)) and len(e) == 2 and all(
            isinstance(x, int) and not isinstance(x, bool) for x in e) for e in raw):
        return None
    return tuple(sorted((int(p), int(b)) for p, b in raw))


def received_grad_from(st: dict[str, Any], i: int, sent: tuple[tuple[int, int], ...],
                        how: str) -> tuple[tuple[int, int], ...] | None:
    """``received_grad_from`` read back: None when absent (all of ``sent`` gets a gradient), else
    [[p, bytes], ...] over the producers of ``sent``, each at most what p sends. Without ``sent`` (a
    stage whose received_from was dropped to price it as before) a non-empty one is ignored: None."""
    raw = st.get("received_grad_from")
    if raw is None or (not sent and isinstance(raw, (list, tuple)) and raw):
        return None
    whole, pairs = dict(sent), _int_pairs(raw)
    if pairs is None or [p for p, _ in pairs] != sorted(whole) or any(not 0 <= b <= whole[p] for p, b in pairs):
        raise PlanFormatError(
            f"Plan stage {i}: received_grad_from must be [[producer stage, bytes], ...] over the producers of "
            f"received_from={[list(e) for e in sent]}, each 0 <= bytes <= what that producer sends; got "
            f"{raw!r:.120}; {how}, or drop received_grad_from (then every received byte gets a gradient)")
    return pairs
