"""Weight versions: PipeDream-2BW's double-buffered weights, and the single version of flush/GPipe.

2BW keeps two buffers per parameter. Batch t computes with W(max(t-1, 0)); the
update after batch t writes W(t+1) = W(t) - lr * grad(W(t-1)) into the buffer
whose version is no longer needed::

    batch:        0        1         2          3
    computes:    W0       W0        W1         W2
    after U(t):  {W0,W1}  {W1,W2}   {W2,W3}    {W3,W4}     (two buffers, reused)

The optimizer sees one ``nn.Parameter`` per weight (the model's own), so its state
is never versioned; before each step that parameter is pointed at the free buffer
(``p.data = buf``) holding a copy of the newest weights, and stepped in place.
Computation never touches ``p`` itself: each version hands out leaf views of its
buffer whose ``.grad`` accumulates over the microbatches that use it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from fxpipe.errors import ConfigError

from fxpipe.runtime.schedules import Action, weight_version

__all__ = ["WeightVersions", "check_scheduler"]


def check_scheduler(sched: Any) -> Any:
    """``sched`` if it is an LR scheduler that ``step()`` advances by one batch.

    Raises:
        ConfigError: anything else (None, an optimizer, ReduceLROnPlateau which needs a metric).
    """
    lr = torch.optim.lr_scheduler
    if not isinstance(sched, lr.LRScheduler) or isinstance(sched, lr.ReduceLROnPlateau):
        raise ConfigError(f"lr_scheduler must be a factory optimizer -> torch.optim.lr_scheduler.LRScheduler "
                          f"(stepped once per batch), but it returned {type(sched).__name__} {sched!r:.60}; pass e.g. "
                          "lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1, (t + 1) "
                          "/ 100)) (ReduceLROnPlateau needs a metric: step it yourself)")
    return sched


def _check_optimizer(opt: object, params: dict[str, torch.nn.Parameter]) -> None:
    """The factory's optimizer must be an Optimizer over (some of) the parameters it was given."""
    from fxpipe.errors import ConfigError

    if not isinstance(opt, torch.optim.Optimizer):
        raise ConfigError(f"the optimizer factory returned a {type(opt).__name__}, not a torch.optim.Optimizer; "
                          "pass e.g. optimizer=lambda params: torch.optim.SGD(params, lr=0.1)")
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    if params and not any(id(p) in held for p in params.values()):
        raise ConfigError(f"the optimizer factory returned a {type(opt).__name__} holding none of the "
                          f"{len(params)} parameters it was given (e.g. {next(iter(params))!r}), so this stage "
                          "would never train; build it from the factory's argument: "
                          "optimizer=lambda params: torch.optim.SGD(params, lr=0.1)")


def _version_used(schedule: str, batch: int) -> int:
    """The version batch ``batch``'s forwards and backwards use: the schedule's rule, :func:`weight_version`."""
    return weight_version(schedule, Action(0, "F", batch), num_microbatches=1)


class WeightVersions:
    """The versions of one stage's own parameters, and its optimizer.

    Args:
        params: canonical name -> the model's nn.Parameter (the newest weights live here).
        optimizer: factory called once with the list of parameters.
        schedule: "2bw" keeps two versions; "flush"/"gpipe" keep one.
        lr_scheduler: factory called once with the optimizer; the scheduler is stepped after every
            update (skipped ones too, as after ``GradScaler.step``).

    Raises:
        ConfigError: ``lr_scheduler`` returned something that is not an LR scheduler.
    """

    def __init__(self, params: dict[str, torch.nn.Parameter],
                 optimizer: Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer] | None,
                 schedule: str, lr_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None) -> None:
        self.params = params
        self.schedule = schedule
        self.optimizer = optimizer(list(params.values())) if (optimizer is not None and params) else None
        if self.optimizer is not None:
            _check_optimizer(self.optimizer, params)
        self.scheduler = None
        if lr_scheduler is not None and self.optimizer is not None:
            self.scheduler = check_scheduler(lr_scheduler(self.optimizer))
        self.current = 0                                   # version held by self.params
        self._bufs: dict[int, dict[str, torch.Tensor]] = {0: {k: p.data for k, p in params.items()}}
        self._leaves: dict[int, dict[str, torch.Tensor]] = {}

    @property
    def alive(self) -> list[int]:
        """Versions whose buffers are held now."""
        return sorted(self._bufs)

    def leaves(self, version: int) -> dict[str, torch.Tensor]:
        """Leaf tensors (requires_grad) of ``version``; one set shared by all its microbatches."""
        if version not in self._bufs:
            raise RuntimeError(f"weight version {version} is not alive (alive: {self.alive}); "
                               "the schedule asked for weights it already dropped")
        if version not in self._leaves:
            self._leaves[version] = {
                k: b.detach().requires_grad_(self.params[k].requires_grad) for k, b in self._bufs[version].items()
            }
        return self._leaves[version]

    def forget_grads(self, version: int) -> None:
        """Drop the gradients accumulated on ``version``'s leaves (a failed step's partial sums)."""
        for t in self._leaves.get(version, {}).values():
            t.grad = None

    def newest(self) -> dict[str, torch.Tensor]:
        """The newest weights, for forward-only use."""
        return {k: p.detach() for k, p in self.params.items()}

    def take_grads(self, batch: int) -> dict[str, torch.Tensor | None]:
        """The gradients ``batch`` collected (on the leaves of the version it used), for :meth:`update`.

        Under 2bw batch 0 and batch 1 both use version 0: its leaves are cleared here so batch 1
        accumulates from zero.
        """
        used = _version_used(self.schedule, batch)
        leaves = self._leaves.get(used, {})
        grads = {k: leaves[k].grad if k in leaves else None for k in self.params}
        if used == batch:
            for t in leaves.values():
                t.grad = None
        return grads

    def update(self, batch: int, grads: dict[str, torch.Tensor | None] | None = None, skip: bool = False) -> None:
        """Step the optimizer after ``batch`` with the gradient of the version it used.

        ``grads`` (canonical name -> gradient) replaces the leaves' ``.grad`` when the
        caller has taken them already (:meth:`take_grads`; the distributed executor reduces
        them first); the leaves' gradients are then left alone.  ``skip``: make the next
        version without stepping the optimizer (non-finite fp16 gradients), so versions stay
        consistent: W(t+1) = W(t).  The LR scheduler steps either way.
        """
        used = _version_used(self.schedule, batch)
        given = grads is not None
        if grads is None:
            grads = {k: t.grad for k, t in self._leaves.get(used, {}).items()}
        if self.schedule == "2bw":
            keep = {batch, batch + 1}  # batch+1 computes with version `batch`
            dead = [v for v in self._bufs if v not in keep and v != self.current]
            if dead:
                buf = self._bufs.pop(min(dead))
            else:
                buf = {k: torch.empty_like(b) for k, b in self._bufs[self.current].items()}
            for k, p in self.params.items():
                buf[k].copy_(self._bufs[self.current][k])
                p.data = buf[k]
        else:
            buf = self._bufs.pop(self.current)
        for k, p in self.params.items():
            p.grad = grads.get(k)
        if self.optimizer is not None and not skip:
            self.optimizer.step()
        for p in self.params.values():
            p.grad = None
        if self.scheduler is not None:
            self.scheduler.step()
        self.current += 1
        self._bufs[self.current] = {k: p.data for k, p in self.params.items()}
        for v in list(self._leaves):
            if v not in self._bufs or v == used and self.schedule != "2bw":
                del self._leaves[v]
        if self.schedule == "2bw":
            for v in [v for v in self._bufs if v < batch]:
                del self._bufs[v]
                self._leaves.pop(v, None)
            # version `used` is done (batch was its last user unless used == batch == 0)
            if used in self._leaves and used < batch:
                del self._leaves[used]
            elif used in self._leaves and not given:
                for t in self._leaves[used].values():
                    t.grad = None

    def versions(self) -> dict[int, dict[str, torch.Tensor]]:
        """Every alive version's buffers (canonical name -> tensor), by version; not copies."""
        return {v: dict(b) for v, b in self._bufs.items()}

    def restore(self, current: int, versions: dict[int, dict[str, torch.Tensor]]) -> None:
        """Make ``versions`` (as :meth:`versions` returns them) the alive buffers and ``current`` the newest.

        The model's parameters then hold version ``current``; no gradient is kept.

        Raises:
            KeyError: ``versions`` lacks ``current`` or one of this stage's parameters in it.
        """
        missing = [k for k in self.params if k not in versions.get(current, {})]
        if missing:
            raise KeyError(f"version {current} lacks {missing[:5]}")
        self.current = int(current)
        self._bufs = {int(v): dict(b) for v, b in versions.items()}
        self._leaves = {}
        for k, p in self.params.items():
            p.data = self._bufs[self.current][k]

    def reset(self) -> None:
        """Forget every version: the newest weights (self.params) become version 0's only buffer."""
        self.current = 0
        self._bufs = {0: {k: p.data for k, p in self.params.items()}}
        self._leaves = {}
