"""Ranks under torchrun: the process group, the (stage, replica) layout, its groups, and each replica's share.

Rank layout (``d`` stages, ``w`` data-parallel replicas, ``WORLD_SIZE = d * w``), the plan's
placement order (``plan.extra["placement"]["order"]``, :mod:`fxpipe.cost_models.topology`;
stages-in-node when the plan records none). torchrun numbers ranks node by node, so a rank
is the device the planner priced::

    stages-in-node:   rank = replica * d + stage       replicas-in-node:  rank = stage * w + replica

                 stage 0    stage 1    stage 2                  stage 0    stage 1    stage 2
    replica 0:   rank 0 ──▶ rank 1 ──▶ rank 2      replica 0:   rank 0 ──▶ rank 2 ──▶ rank 4
    replica 1:   rank 3 ──▶ rank 4 ──▶ rank 5      replica 1:   rank 1 ──▶ rank 3 ──▶ rank 5
                   └ data-parallel group of stage 0: {0, 3}       └ data-parallel group of stage 0: {0, 1}

A parameter read by several stages (tied embeddings) is summed over a group of
every replica of every stage that reads it.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree

from fxpipe.cost_models.topology import PLACEMENTS, Placement
from fxpipe.errors import ConfigError, DistributedError, InputError

__all__ = ["timeout_seconds", "init_distributed", "data_parallel_width", "replica_share", "placement_order", "Layout"]


def env_seconds(name: str, default: float) -> float:
    """A positive number of seconds from the environment variable ``name`` (``default`` when unset).

    Raises:
        ConfigError: the value is not a number, or not > 0.
    """
    raw = os.environ.get(name, str(default))
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number of seconds; set e.g. {name}={default:g}") from None
    if value <= 0:
        raise ConfigError(f"{name} must be > 0 seconds, got {value}")
    return value


def timeout_seconds() -> float:
    """Seconds any distributed wait may take (env ``FXPIPE_TIMEOUT``, default 60)."""
    return env_seconds("FXPIPE_TIMEOUT", 60)


def init_distributed() -> None:
    """Initialise the default process group from the environment (torchrun's variables) if needed.

    Backend: NCCL when CUDA is available (device ``cuda:LOCAL_RANK``), gloo otherwise.

    Raises:
        DistributedError: RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT are missing or rendezvous fails.
    """
    if dist.is_initialized():
        return
    _require_env()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_seconds()))
    except Exception as e:  # noqa: BLE001 - any rendezvous failure
        raise DistributedError(f"rank {os.environ.get('RANK')}: init_process_group({backend!r}) failed: {e}; "
                               "check MASTER_ADDR/MASTER_PORT and that every rank was started") from e


def _require_env() -> None:
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DistributedError(f"executor='distributed' needs a process group, and the environment lacks "
                               f"{missing}; launch with torchrun --nproc_per_node=N script.py, or call "
                               "torch.distributed.init_process_group(...) before fxpipe.compile")


def _world_size() -> int:
    if dist.is_initialized():
        return dist.get_world_size()
    _require_env()
    return int(os.environ["WORLD_SIZE"])


def data_parallel_width(num_stages: int) -> int:
    """w = WORLD_SIZE // num_stages.

    Raises:
        DistributedError: no process group and no torchrun environment.
        ConfigError: WORLD_SIZE is not a multiple of ``num_stages``.
    """
    world = _world_size()
    if world % num_stages != 0:
        raise ConfigError(f"WORLD_SIZE={world} is not a multiple of num_stages={num_stages}: the distributed "
                          f"executor runs one process per (stage, replica); launch {num_stages} x w processes "
                          f"(e.g. torchrun --nproc_per_node={num_stages}) or change num_stages")
    return world // num_stages


def replica_share(tree: Any, w: int, replica: int) -> Any:
    """The contiguous ``replica``-th of ``w`` equal shares (dim 0) of every tensor in ``tree``.

    Raises:
        InputError: a tensor's batch is not divisible by ``w``.
    """
    if w == 1:
        return tree

    def cut(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        if x.dim() == 0 or x.shape[0] % w != 0:
            raise InputError(f"a tensor of shape {tuple(x.shape)} cannot be split among {w} data-parallel "
                             f"replicas: its batch dimension (dim 0) must be divisible by {w} "
                             "(x num_microbatches); use a batch size that is a multiple of both")
        n = x.shape[0] // w
        return x[replica * n:(replica + 1) * n]

    return pytree.tree_map(cut, tree)


def placement_order(plan: Any) -> str:
    """The rank order ``plan`` was priced for: ``plan.extra["placement"]["order"]``, stages-in-node when absent.

    Raises:
        ConfigError: the plan records an order that is not one of PLACEMENTS.
    """
    where = plan.extra.get("placement") if plan is not None else None
    order = where.get("order", PLACEMENTS[0]) if isinstance(where, dict) else PLACEMENTS[0]
    if order not in PLACEMENTS:
        raise ConfigError(f"plan.extra['placement']['order'] is {order!r}, not one of {', '.join(PLACEMENTS)}; "
                          "fix the plan's JSON or re-plan it (fxpipe.plan(...) records a valid one)")
    return order


class Layout:
    """This process's place among the ranks, and the process groups every rank creates in the same order.

    Args:
        d: number of stages.
        stage_names: per stage, stage-module parameter name -> canonical name.
        order: the rank order, one of :data:`~fxpipe.cost_models.topology.PLACEMENTS` (module docstring).

    Attributes:
        rank, world, w, stage, replica, order; ``pipeline_groups[i]`` / ``loss_p2p_groups[i]`` (the stages of
        replica i: activations and gradients / the loss), ``loss_group`` (all ranks), ``dp_groups[s]`` (replicas of
        stage s); ``grad_groups``: (group, canonical names of this stage) whose gradients are summed
        in that group and divided by w; ``tied``: canonical name -> the stages reading it (if > 1).
    """

    def __init__(self, d: int, stage_names: list[dict[str, str]], order: str = PLACEMENTS[0]) -> None:
        if order not in PLACEMENTS:
            raise ConfigError(f"rank order {order!r} is not one of {', '.join(PLACEMENTS)}")
        self.d = d
        self.order = order
        self.world = dist.get_world_size()
        self.rank = dist.get_rank()
        self.w = w = data_parallel_width(d)
        self._place = Placement(order, d, w, 1)
        self.stage, self.replica = self.stage_replica(self.rank)
        rank_of = self.rank_of
        # every rank creates every group, in this order (new_group is collective over the default group)
        self.pipeline_groups = [dist.new_group([rank_of(s, r) for s in range(d)]) for r in range(w)]
        # a batch's loss, last stage -> the others: a group of its own so it never queues behind (or, under
        # NCCL, which ignores tags, is matched with) an activation or a gradient
        self.loss_p2p_groups = [dist.new_group([rank_of(s, r) for s in range(d)]) for r in range(w)]
        self.dp_groups = [dist.new_group([rank_of(s, r) for r in range(w)]) for s in range(d)]
        self.loss_group = dist.new_group(list(range(self.world)))
        self.stats_group = dist.new_group(list(range(self.world)))   # the global gradient norm / found-inf
        users: dict[str, set[int]] = {}
        for s, names in enumerate(stage_names):
            for c in names.values():
                users.setdefault(c, set()).add(s)
        tied_sets = sorted({tuple(sorted(u)) for u in users.values() if len(u) > 1})
        tied_groups = {S: dist.new_group(sorted(rank_of(s, r) for r in range(w) for s in S)) for S in tied_sets}
        mine = sorted(set(stage_names[self.stage].values()))
        self.grad_groups: list[tuple[Any, list[str]]] = []
        local = [c for c in mine if len(users[c]) == 1]
        if local and w > 1:
            self.grad_groups.append((self.dp_groups[self.stage], local))
        for S, g in tied_groups.items():
            names = [c for c in mine if tuple(sorted(users[c])) == S]
            if names:
                self.grad_groups.append((g, names))
        self.tied = {c: sorted(u) for c, u in users.items() if len(u) > 1}

    def rank_of(self, stage: int, replica: int | None = None) -> int:
        """Global rank of ``stage`` in ``replica`` (default: this process's replica), under :attr:`order`."""
        return self._place.device(stage, self.replica if replica is None else replica)

    def stage_replica(self, rank: int) -> tuple[int, int]:
        """(stage, replica) of global ``rank``: the inverse of :meth:`rank_of`."""
        if self.order == PLACEMENTS[0]:
            return rank % self.d, rank // self.d
        return rank // self.w, rank % self.w

    def where(self, rank: int | None = None) -> str:
        """``"rank r (stage s, replica i)"`` of this process or of ``rank``."""
        r = self.rank if rank is None else rank
        s, i = self.stage_replica(r)
        return f"rank {r} (stage {s}, replica {i})"
