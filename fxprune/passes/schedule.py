"""Sparsity schedules: the sparsity to prune (or mask) to at each step of a gradual pruning run.

A :class:`Schedule` is a frozen value: ``schedule(step)`` is the sparsity at ``step``, iterating it
yields one sparsity per step from 0 to ``warmup + total_steps`` (the last is ``final``), and
``schedule.changes()`` the steps where the value moves — where to re-mask. Three shapes:

- :func:`cubic` — torch.ao's ``CubicSL`` (Zhu & Gupta, 2017), with ``t_0 = warmup`` and
  ``Δt · n = total_steps``: ``s_t = s_f + (s_0 - s_f) · (1 - (t - t_0) / n)^3``, clamped to
  ``[s_0, s_f]``. It prunes fast while there is redundancy and slowly near the end.
- :func:`linear` — a straight ramp from ``initial`` to ``final`` over ``total_steps``.
- :func:`constant` — the same sparsity at every step (one-shot pruning, repeated).

Before ``warmup`` every shape holds ``initial``; after ``warmup + total_steps`` it holds ``final``.

Gradual soft pruning with :mod:`~fxprune.passes.mask_channels` (re-masking only adds channels) and a
final :mod:`~fxprune.passes.materialize`::

    schedule = fxprune.passes.schedule.cubic(0.0, 0.5, total_steps=1000, warmup=100)
    for step, sparsity in enumerate(schedule):
        if step in schedule.changes():
            gm = MaskChannels(sparsity=sparsity)(gm).graph_module
            optimizer = torch.optim.SGD(gm.parameters(), lr=0.01)   # the pass made new tensors
        train_step(gm, optimizer)
    small = Materialize()(gm).graph_module

Iterative hard pruning (prune → fine-tune → prune the result) works the same way with
:func:`fxprune.prune` or :class:`~fxprune.passes.PruneChannels`, whose output is a valid input; give
each round the fraction of *what is left* to drop, :func:`step_ratio`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from fxprune.errors import InvalidOptionError

__all__ = ["Schedule", "cubic", "linear", "constant", "step_ratio"]

SHAPES = ("cubic", "linear", "constant")


@dataclass(frozen=True)
class Schedule:
    """Sparsity per step: ``initial`` until ``warmup``, then ``shape`` up to ``final`` at
    ``warmup + total_steps``."""

    shape: str
    initial: float
    final: float
    total_steps: int
    warmup: int = 0

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise InvalidOptionError(f"unknown schedule shape {self.shape!r}; expected one of {SHAPES}")
        for name in ("initial", "final"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise InvalidOptionError(f"{name} sparsity must be a number in [0, 1), got {value!r}")
        for name, low in (("total_steps", 1), ("warmup", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InvalidOptionError(f"{name} must be an int >= {low}, got {value!r}")

    def __call__(self, step: int) -> float:
        """The sparsity at ``step`` (any int: before the start ``initial``, after the end ``final``)."""
        progress = min(max((step - self.warmup) / self.total_steps, 0.0), 1.0)
        if self.shape == "constant":
            return float(self.final)
        if self.shape == "linear":
            value = self.initial + (self.final - self.initial) * progress
        else:  # torch.ao CubicSL
            value = self.final + (self.initial - self.final) * (1.0 - progress) ** 3
        low, high = sorted((self.initial, self.final))
        return float(min(max(value, low), high))

    def __len__(self) -> int:
        return self.warmup + self.total_steps + 1

    def __iter__(self) -> Iterator[float]:
        return (self(step) for step in range(len(self)))

    def changes(self) -> tuple[int, ...]:
        """The steps whose sparsity differs from the previous step's (step 0 always counts)."""
        values = list(self)
        return (0,) + tuple(s for s in range(1, len(values)) if values[s] != values[s - 1])


def cubic(initial: float, final: float, total_steps: int, warmup: int = 0) -> Schedule:
    """torch.ao's ``CubicSL`` curve from ``initial`` to ``final`` over ``total_steps`` after ``warmup``.

    >>> [round(s, 3) for s in cubic(0.0, 0.5, total_steps=4)]
    [0.0, 0.289, 0.438, 0.492, 0.5]
    """
    return Schedule("cubic", initial, final, total_steps, warmup)


def linear(initial: float, final: float, total_steps: int, warmup: int = 0) -> Schedule:
    """A straight ramp from ``initial`` to ``final`` over ``total_steps`` after ``warmup``.

    >>> list(linear(0.0, 0.5, total_steps=4))
    [0.0, 0.125, 0.25, 0.375, 0.5]
    """
    return Schedule("linear", initial, final, total_steps, warmup)


def constant(sparsity: float, total_steps: int) -> Schedule:
    """``sparsity`` at every one of ``total_steps + 1`` steps.

    >>> list(constant(0.25, total_steps=2))
    [0.25, 0.25, 0.25]
    """
    return Schedule("constant", sparsity, sparsity, total_steps)


def step_ratio(before: float, after: float) -> float:
    """The fraction of the *remaining* units to drop to go from total sparsity ``before`` to
    ``after`` — what each round of iterative hard pruning passes to :func:`fxprune.prune`.

    >>> step_ratio(0.5, 0.75)
    0.5
    """
    if not 0 <= before <= after < 1:
        raise InvalidOptionError(f"sparsities must satisfy 0 <= before <= after < 1, got {before!r} -> {after!r}")
    return (after - before) / (1.0 - before)
