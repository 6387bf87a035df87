"""The user's model is never changed (promise 1), even by running it.

Capturing, calibrating and verifying run the model, or a graph that shares its tensors: a forward that
updates a buffer in place (``self.calls.add_(1)``), a QAT-prepared model's observers (scale, zero point,
min/max, which observers assign as new tensors) and BatchNorm's running statistics would all change
the user's model. Copying a whole model for every run costs its size in memory; buffers are small, so
:func:`buffers_restored` records which tensors every module holds and a copy of every buffer (and an
ExportedProgram's buffers and constants) on entry, and on exit puts back every tensor a module was
given and every value that differs. Parameters are never written by what fxprune runs (no optimizer
step); a module given a new parameter object gets its own back.

>>> model = Counting()                          # forward does self.calls.add_(1)  # doctest: +SKIP
>>> with buffers_restored(model):               # doctest: +SKIP
...     model(x)
>>> int(model.calls)                            # doctest: +SKIP
0

:func:`leaves_models_untouched` wraps an API function so that every model among its arguments
(``nn.Module``, ``ExportedProgram``, a result's captured graph) is restored however it returns.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator

import torch


def _modules(obj: Any) -> list[torch.nn.Module]:
    """The modules whose state a run may change: a module's own, a result's captured graph's."""
    if isinstance(obj, torch.nn.Module):
        return list(obj.modules())
    gm = getattr(getattr(obj, "analysis", None), "gm", None)
    return list(gm.modules()) if isinstance(gm, torch.nn.Module) else []


def _loose_tensors(obj: Any) -> list[torch.Tensor]:
    """An ExportedProgram's state: its buffers and constants (its ``module()`` shares them)."""
    if not isinstance(obj, torch.export.ExportedProgram):
        return []
    values = list(obj.state_dict.values()) + list(obj.constants.values())
    return [v for v in values if isinstance(v, torch.Tensor) and not isinstance(v, torch.nn.Parameter)]


class _Snapshot:
    """Which tensor objects each module holds, and a copy of every buffer's value."""

    def __init__(self, objs: tuple) -> None:
        self.slots = [(m, dict(m._buffers), dict(m._parameters)) for obj in objs for m in _modules(obj)]
        tensors = [t for _, buffers, _ in self.slots for t in buffers.values() if t is not None]
        tensors += [t for obj in objs for t in _loose_tensors(obj)]
        self.values = {id(t): (t, t.detach().clone()) for t in tensors if not t.is_meta}

    def restore(self) -> None:
        for module, buffers, params in self.slots:  # an observer assigns new tensors: put the old back
            if module._buffers != buffers:
                module._buffers.clear()
                module._buffers.update(buffers)
            if module._parameters != params:
                module._parameters.clear()
                module._parameters.update(params)
        with torch.no_grad():
            for t, saved in self.values.values():  # and values written in place (no version bump needed)
                if t.shape != saved.shape or not torch.equal(t, saved):
                    t.resize_(saved.shape)
                    t.copy_(saved)


@contextlib.contextmanager
def buffers_restored(*objs: Any) -> Iterator[None]:
    """Snapshot every buffer of ``objs``; on exit restore each one replaced or written meanwhile."""
    snapshot = _Snapshot(objs)
    try:
        yield
    finally:
        snapshot.restore()


def leaves_models_untouched(fn: Callable) -> Callable:
    """Decorate an API function: the models among its arguments keep their buffers, whatever it runs.

    >>> @leaves_models_untouched
    ... def analyze(model, example_inputs): ...
    """
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        models = [a for a in (*args, *kwargs.values()) if isinstance(a, (torch.nn.Module, torch.export.ExportedProgram))
                  or hasattr(a, "analysis")]
        with buffers_restored(*models):
            return fn(*args, **kwargs)
    return wrapper
