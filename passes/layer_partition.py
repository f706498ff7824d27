"""DeepSpeed's and torchgpipe's sequence partitioners, transcribed with their tie-breaking (pure functions of weights).

The baseline planners of :mod:`fxpipe.passes.baselines` run them over a graph's layer sequence;
they are tested here against the libraries' own answers (tests/test_baselines.py).
"""

from __future__ import annotations

from typing import Sequence

from fxpipe.errors import PartitionError

__all__ = ["partition_uniform", "partition_balanced", "balanced_partition", "block_partition"]


def _part_of_every_item(bounds: Sequence[int], n: int) -> list[int]:
    """Part boundaries ``[0, b1, ..., n]`` -> the part index of each of the ``n`` items."""
    out = [0] * n
    for part in range(len(bounds) - 1):
        for i in range(bounds[part], bounds[part + 1]):
            out[i] = part
    return out


# -- DeepSpeed 0.19.8, deepspeed/runtime/utils.py ------------------------------------------------

def partition_uniform(num_items: int, num_parts: int) -> list[int]:
    """DeepSpeed 0.19.8 ``partition_uniform``: part boundaries of equal counts, extras first.

    ``partition_uniform(10, 4) == [0, 3, 6, 8, 10]``; with ``num_items <= num_parts`` the
    trailing parts are empty (``partition_uniform(2, 3) == [0, 1, 2, 2]``).
    """
    if num_items <= num_parts:
        return [min(p, num_items) for p in range(num_parts + 1)]
    chunk = num_items // num_parts
    residual = num_items - chunk * num_parts
    parts = [i * chunk for i in range(num_parts + 1)]
    for i in range(residual):
        for j in range(i + 1, num_parts + 1):
            parts[j] += 1
    return parts


def partition_balanced(weights: Sequence[float], num_parts: int) -> list[int]:
    """DeepSpeed 0.19.8 ``partition_balanced``: the linear-partition DP minimising max - min part sum.

    Returns part boundaries (``num_parts + 1`` indices into ``weights``). Like the original,
    a later cut wins a tie (``>=``) and ``len(weights) <= num_parts`` falls back to
    :func:`partition_uniform`. Worked example: ``[4, 1, 1, 1, 3]`` into 2 parts: cut
    [4 1 | 1 1 3] has sums 5 and 5 (max - min = 0), so ``[0, 2, 5]``.
    """
    n, m = len(weights), num_parts
    if n <= m:
        return partition_uniform(n, m)
    inf = float("inf")
    dp_max = [[inf] * (m + 1) for _ in range(n + 1)]
    dp_min = [[inf] * (m + 1) for _ in range(n + 1)]
    dp_cost = [[inf] * (m + 1) for _ in range(n + 1)]
    position = [[0] * (m + 1) for _ in range(n + 1)]
    prefix = [0.0] * (n + 1)
    for i, w in enumerate(weights):
        prefix[i + 1] = prefix[i] + float(w)
    dp_max[0][0] = 0.0
    dp_cost[0][0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, min(i, m) + 1):
            for k in range(i):
                seg = prefix[i] - prefix[k]
                max_sum = max(dp_max[k][j - 1], seg)
                min_sum = min(dp_min[k][j - 1], seg)
                cost = max_sum - min_sum
                if dp_cost[i][j] >= cost:
                    dp_cost[i][j] = cost
                    dp_max[i][j] = max_sum
                    dp_min[i][j] = min_sum
                    position[i][j] = k
    parts = [n]
    for j in reversed(range(1, m + 1)):
        parts.append(position[parts[-1]][j])
    parts.reverse()
    return parts


def balanced_partition(weights: Sequence[float], parts: int) -> list[int]:
    """The part index of every item under :func:`partition_balanced` (DeepSpeed 0.19.8)."""
    return _part_of_every_item(partition_balanced(weights, parts), len(weights))


# -- torchgpipe 0.0.7, torchgpipe/balance/blockpartition.py --------------------------------------

def block_partition(sequence: Sequence[float], parts: int, max_iter: int = 1_000_000) -> list[int]:
    """torchgpipe 0.0.7 ``blockpartition.solve`` (Barany et al., "Block partitions of sequences").

    Weights are normalised to [0, 1]; starting from equal counts (the last block takes the
    remainder), the heaviest block p is fixed (ties: the highest index, as ``max`` over
    ``(size, i)``) and the lightest block q (ties: the lowest index) takes one element from
    its neighbour on p's side, until max block <= min block + 1 (normalised units)::

        [9 9 | 0 0 | 0 0] -> [9 | 9 0 0 | 0 0]   normalised [1 1 | 0 0 | 0 0]: max 2 > min 0 + 1
                                                 -> max 1 <= min 0 + 1: stop

    Args:
        sequence: non-negative weights (torchgpipe passes integer microseconds).
        parts: number of blocks, 1 <= parts <= len(sequence).
        max_iter: a cap on moves the original does not have (it could loop for ever).

    Returns:
        The block index of every item (non-decreasing).

    Raises:
        ValueError: parts < 1 or longer than the sequence (as the original).
        PartitionError: the moves did not stop within ``max_iter``, or a block came out empty
            (torchgpipe's GPipe then rejects the balance).
    """
    if parts < 1:
        raise ValueError(f"partitions must be a positive integer ({parts} < 1)")
    n = len(sequence)
    if n < parts:
        raise ValueError(f"sequence is shorter than intended partitions ({n} < {parts})")
    minimum = min(sequence)
    maximum = max(sequence) - minimum
    norm = [0.0 for _ in sequence] if maximum == 0 else [(x - minimum) / maximum for x in sequence]
    splits = [n // parts * (x + 1) for x in range(parts - 1)] + [n]

    def block_size(i: int) -> float:
        start = splits[i - 1] if i > 0 else 0
        return sum(norm[start:splits[i]])

    def leaderboard() -> list[tuple[float, int]]:
        return [(block_size(i), i) for i in range(parts)]

    it = 0
    done = False
    while not done:
        max_size, p = max(leaderboard())
        while True:
            it += 1
            if it > max_iter:
                raise PartitionError(f"torchgpipe's blockpartition.solve did not stop after {max_iter} moves "
                                     f"on {n} weights into {parts} blocks; use fxpipe's own planner")
            min_size, q = min(leaderboard())
            if max_size <= min_size + 1:
                done = True
                break
            if p < q:
                h = q - 1
                splits[h] -= 1
            else:
                h = q + 1
                splits[q] += 1
            if p == h:
                break
    bounds = [0] + splits
    if any(bounds[i + 1] <= bounds[i] for i in range(parts)):
        raise PartitionError(f"torchgpipe's blockpartition.solve left a block empty (balance "
                             f"{[bounds[i + 1] - bounds[i] for i in range(parts)]}), which torchgpipe's "
                             "GPipe rejects; use fewer stages or fxpipe's own planner")
    return _part_of_every_item(bounds, n)
