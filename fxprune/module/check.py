"""Check: the rebuilt module's own forward must compute what the pruned graph computes.

Both run in eval mode on the example inputs and on a second batch size (one more row), and every output
must match to float tolerance. A forward that bakes a size into code (``x.view(-1, 512)``) either fails —
the error names the innermost module that was running — or computes something else; either way a
:class:`~fxprune.errors.ModuleForwardError` says so and points to the graph result, which has its sizes
rewritten. Nothing wrong is returned.

>>> error = check(small, result.graph_module, (x,))    # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.utils._pytree as pytree
from torch import nn

from fxprune.errors import ModuleForwardError

GRAPH_HINT = "use result.graph_module (the pruned graph, whose sizes are rewritten) instead"


def keeping_code_sizes(arguments: dict) -> dict:
    """``fxprune.prune`` keywords for a result the user's own forward will run: a width that forward reads
    from one tensor's shape and gives another's view stays equal in both (``code_sizes``; the graph
    alone needs no such tie, its rewrite puts the pruned literal there)."""
    from fxprune.options import PruneOptions

    base = arguments.get("options") or PruneOptions()
    if not isinstance(base, PruneOptions):
        return arguments  # PruneOptions.build names the wrong type
    return {**arguments, "options": base.replace(code_sizes=True)}


def check(module: nn.Module, reference: Callable, example_inputs: tuple, tolerance: float = 1e-4) -> float:
    """The largest output difference between ``module`` and ``reference`` (the pruned graph) over the
    example inputs and one more batch row; raises :class:`ModuleForwardError` beyond ``tolerance``
    (relative to the reference's magnitude, at least 1)."""
    worst = 0.0
    for inputs in batches(example_inputs):
        with eval_mode(module), eval_mode(reference), torch.no_grad():
            try:
                expected = reference(*inputs)
            except Exception:  # a graph specialised to the example's batch: that size is not checked
                continue
            got = run_named(module, inputs)
        worst = max(worst, compare(module, got, expected, tolerance, _batch(inputs)))
    return worst


def batches(example_inputs: tuple) -> list[tuple]:
    """The example inputs, then the same with one more row where every tensor input has one batch size."""
    tensors = [x for x in example_inputs if isinstance(x, torch.Tensor)]
    sizes = {x.shape[0] for x in tensors if x.dim() > 0}
    if len(sizes) != 1:
        return [example_inputs]
    grown = tuple(torch.cat([x, x[:1]]) if isinstance(x, torch.Tensor) and x.dim() > 0 else x
                  for x in example_inputs)
    return [example_inputs, grown]


def _batch(inputs: tuple) -> Any:
    return next((x.shape[0] for x in inputs if isinstance(x, torch.Tensor) and x.dim() > 0), None)


@contextlib.contextmanager
def eval_mode(module: Any) -> Iterator[None]:
    """Every submodule in eval mode for the block; each one's own flag restored after."""
    if not isinstance(module, nn.Module):
        yield
        return
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def run_named(module: nn.Module, inputs: tuple) -> Any:
    """``module(*inputs)``; a failure becomes a :class:`ModuleForwardError` naming the innermost module
    that was running."""
    running: list[str] = []
    names = {id(m): n for n, m in module.named_modules()}

    def enter(m: nn.Module, args: Any) -> None:
        running.append(names.get(id(m), "?"))

    def leave(m: nn.Module, args: Any, out: Any) -> None:  # returns None: the output stays as it is
        running.pop()

    hooks = [h for m in module.modules() for h in (m.register_forward_pre_hook(enter),
                                                   m.register_forward_hook(leave))]
    try:
        return module(*inputs)
    except Exception as exc:
        where = running[-1] if running else ""
        cls = type(module.get_submodule(where)).__name__ if where in names.values() else "?"
        raise ModuleForwardError(
            f"{type(module).__name__}'s own forward fails on the pruned parameters in module "
            f"{where or '(the root)'!r} ({cls}): {type(exc).__name__}: {str(exc)[:300]}. Its code computes "
            f"with a size the plan changed; {GRAPH_HINT}") from exc
    finally:
        for hook in hooks:
            hook.remove()


def compare(module: nn.Module, got: Any, expected: Any, tolerance: float, batch: Any) -> float:
    """The largest difference between two output trees; raises when structure, shapes or values differ."""
    got_leaves, got_spec = pytree.tree_flatten(got)
    want_leaves, want_spec = pytree.tree_flatten(expected)
    where = f"{type(module).__name__}'s own forward (batch {batch})"
    if len(got_leaves) != len(want_leaves):
        raise ModuleForwardError(f"{where} returns {len(got_leaves)} values, the pruned graph "
                                 f"{len(want_leaves)}; {GRAPH_HINT}")
    worst = 0.0
    for i, (a, b) in enumerate(zip(got_leaves, want_leaves)):
        worst = max(worst, _difference(where, i, a, b, tolerance))
    return worst


def _difference(where: str, index: int, got: Any, want: Any, tolerance: float) -> float:
    if not isinstance(want, torch.Tensor):
        return 0.0
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        raise ModuleForwardError(f"{where}: output {index} has shape {tuple(getattr(got, 'shape', ()))}, the "
                                 f"pruned graph's {tuple(want.shape)}: the code bakes in a size the plan "
                                 f"changed; {GRAPH_HINT}")
    if not want.is_floating_point() or want.numel() == 0:
        if not torch.equal(got, want):
            raise ModuleForwardError(f"{where}: output {index} differs from the pruned graph's; {GRAPH_HINT}")
        return 0.0
    error = float((got.double() - want.double()).abs().max())
    scale = max(1.0, float(want.double().abs().max()))
    if not error <= tolerance * scale:
        raise ModuleForwardError(f"{where}: output {index} differs from the pruned graph's by {error:.3g} "
                                 f"(tolerance {tolerance * scale:.3g}); {GRAPH_HINT}")
    return error
