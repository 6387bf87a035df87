"""Prune what is traceable: a model whose forward cannot be captured whole, pruned through its parts.

Detectors wrap ordinary convolutions in code no tracer follows (image lists, NMS, a Python loop over
layers). This module runs a *copy* of the model once on the example inputs, recording every module call
(its arguments and outputs) and every tensor operation with the modules that were running. The parts are
the largest modules that were called once with tensors (or lists, tuples or dicts of tensors) and that
``torch.fx`` traces (``modules=[...]`` names them instead). Their graphs are joined into one graph keyed
by the model's own parameter names: where a part's input is the very tensor another part returned (a
backbone into an FPN into heads, a YOLO layer into the next), the two are wired together, so pruning
ties their channels; an input that comes from untraced code is a graph input, and an output that
untraced code reads (or the model returns) is a graph output — fixed interfaces whose channels stay,
listed in :attr:`PartsResult.crossings` with the code that reads them. The joined graph is pruned as
any graph is, and the model comes back as its own class (:func:`fxprune.module.rebuild`), checked by
running the rebuilt model and comparing every recorded part output with the pruned graph's.

>>> out = fxprune.module.prune_parts(detector, ([image],), sparsity=0.5)   # doctest: +SKIP
>>> out.parts                                                              # doctest: +SKIP
('backbone', 'rpn.head', 'roi_heads.box_head', 'roi_heads.box_predictor')
"""
from __future__ import annotations

import copy
import inspect
import operator
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn
from torch.overrides import TorchFunctionMode

from fxprune.errors import CaptureError, InvalidOptionError, ModuleForwardError
from fxprune.module.check import GRAPH_HINT, batches, compare, eval_mode, keeping_code_sizes
from fxprune.module.rebuild import rebuild


@dataclass
class Call:
    """One call of a module in the recorded run."""

    args: tuple
    kwargs: dict
    output: Any = None
    done: int = 0
    """How many operations had run when the call returned: later ones may read its output."""


@dataclass
class Recording:
    """One run of the model: each module's calls, and each tensor operation with the modules running."""

    calls: dict[str, list[Call]] = field(default_factory=dict)
    ops: list[tuple[tuple[str, ...], set[int], str]] = field(default_factory=list)
    output: Any = None


class _Ops(TorchFunctionMode):
    """Logs every torch operation: the module paths running, the ids of its tensor arguments."""

    def __init__(self, stack: list[str], log: list):
        super().__init__()
        self.stack, self.log = stack, log

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ids = {id(t) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        if ids:
            self.log.append((tuple(self.stack), ids, getattr(func, "__name__", str(func))))
        return func(*args, **kwargs)


def record(model: nn.Module, inputs: tuple) -> Recording:
    """Run ``model`` (a copy the caller owns) once in eval mode without gradients, recording calls and
    operations."""
    rec, stack = Recording(), []
    names = {id(m): n for n, m in model.named_modules()}

    def enter(module, args, kwargs):
        stack.append(names[id(module)])
        rec.calls.setdefault(stack[-1], []).append(Call(args, kwargs))

    def leave(module, args, kwargs, output):
        call = rec.calls[stack.pop()][-1]
        call.output, call.done = output, len(rec.ops)

    hooks = [h for m in model.modules() for h in (m.register_forward_pre_hook(enter, with_kwargs=True),
                                                  m.register_forward_hook(leave, with_kwargs=True))]
    try:
        with eval_mode(model), torch.no_grad(), _Ops(stack, rec.ops):
            rec.output = model(*inputs)
    except Exception as exc:
        exc.fxprune_module = stack[-1] if stack else ""  # the innermost module running, for the message
        raise
    finally:
        for hook in hooks:
            hook.remove()
    return rec


def _tensors_only(value: Any) -> bool:
    leaves = pytree.tree_leaves(value)
    return bool(leaves) and all(isinstance(v, torch.Tensor) for v in leaves)


class _PieceProxy(fx.Proxy):
    """A proxy whose length is known: a chunk/split with a literal count, or an argument that was a list."""

    def __len__(self) -> int:
        count = _pieces(self.node, self.tracer.lengths)
        return super().__len__() if count is None else count


class PartTracer(fx.Tracer):
    """``symbolic_trace``'s tracer that can also iterate the pieces of a ``chunk`` or ``split`` whose
    count is in the code (``list(self.cv1(x).chunk(2, 1))`` in YOLO's C2f) and an argument that was a
    list of tensors in the recorded call (``for feature in x`` in a detection head)."""

    def __init__(self, lengths: Optional[Mapping[str, int]] = None):
        super().__init__()
        self.lengths = dict(lengths or {})

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _PieceProxy(node, self)

    def iter(self, obj: fx.Proxy):
        count = _pieces(obj.node, self.lengths)
        if count is None:
            return super().iter(obj)
        return iter([obj[i] for i in range(count)])


def _pieces(node: fx.Node, lengths: Mapping[str, int]) -> Optional[int]:
    """How many tensors a node holds where the code or the recorded call says: a chunk/split with a
    literal count, an argument recorded as a list."""
    if node.op == "placeholder":
        return lengths.get(str(node.target))
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    sizes = node.args[1] if len(node.args) > 1 else node.kwargs.get("chunks", node.kwargs.get("split_size_or_sections"))
    if name == "chunk" and isinstance(sizes, int):
        return sizes
    if name == "split" and isinstance(sizes, (list, tuple)):
        return len(sizes)
    return None


def traces(module: nn.Module, call: Optional[Call] = None) -> Optional[fx.GraphModule]:
    """The module's fx graph, or None where the tracer cannot follow its forward."""
    lengths = {name: len(v) for name, v in arguments(module, call) if isinstance(v, (list, tuple))} if call else {}
    try:
        graph = PartTracer(lengths).trace(module)
    except Exception:  # any failure of the tracer means "not a part": its children are tried
        return None
    return fx.GraphModule(module, graph, class_name=type(module).__name__)


def find_parts(model: nn.Module, rec: Recording, modules: Optional[Sequence[str]] = None
               ) -> dict[str, fx.GraphModule]:
    """{path: graph} of the largest traceable modules called once with tensors, outermost first."""
    if modules is not None:
        return {path: _named_part(model, rec, path) for path in modules}
    found: dict[str, fx.GraphModule] = {}
    _search(model, "", rec, found)
    return found


def _named_part(model: nn.Module, rec: Recording, path: str) -> fx.GraphModule:
    graph = _part(model.get_submodule(path), rec.calls.get(path, [])) if path in dict(model.named_modules()) \
        else None
    if graph is None:
        raise InvalidOptionError(f"modules=[{path!r}]: not a module called once with tensors that torch.fx "
                                 f"traces (calls recorded: {len(rec.calls.get(path, []))})")
    return graph


def _part(module: nn.Module, calls: list[Call]) -> Optional[fx.GraphModule]:
    if len(calls) != 1 or not _tensors_only((calls[0].args, calls[0].kwargs)) or not _tensors_only(calls[0].output):
        return None
    return traces(module, calls[0])


def _search(module: nn.Module, path: str, rec: Recording, found: dict) -> None:
    graph = _part(module, rec.calls.get(path, []))
    if graph is not None:
        found[path] = graph
        return
    for name, child in module.named_children():
        _search(child, f"{path}.{name}" if path else name, rec, found)


@dataclass
class Joined:
    """The parts' graphs joined into one, and where each input and output of it came from."""

    gm: fx.GraphModule
    inputs: list[tuple[str, int]]
    """Per graph input: (part path, index of the leaf among the part's flattened arguments)."""
    outputs: list[tuple[str, int]]
    """Per graph output: (part path, index of the leaf among the part's flattened outputs)."""
    crossings: dict[str, str]


def join(model: nn.Module, rec: Recording, parts: Mapping[str, fx.GraphModule]) -> Joined:
    """One graph over ``model``'s own module tree calling every part, wired where tensors pass between
    parts (by identity in the recorded run)."""
    graph, produced, placeholders = fx.Graph(), {}, {}
    joined = Joined(None, [], [], {})  # type: ignore[arg-type]
    outs: list[tuple[fx.Node, torch.Tensor, tuple[str, int]]] = []
    for path in sorted(parts, key=lambda p: _first_call(rec, p)):
        call = rec.calls[path][0]
        env = _bind_inputs(graph, parts[path], path, call, produced, placeholders, joined)
        result = _copy_nodes(graph, parts[path], path, env)
        for index, (node, value) in enumerate(zip(pytree.tree_leaves(result), pytree.tree_leaves(call.output))):
            if isinstance(node, fx.Node):
                produced[id(value)] = node
                outs.append((node, value, (path, index)))
    readers = _outside_readers(rec, set(parts))
    kept = [(n, v, s) for n, v, s in outs if id(v) in readers or not _read_by_parts(v, rec, parts)]
    for node, value, source in kept:
        joined.crossings[f"{source[0]} output {source[1]}"] = readers.get(id(value), "returned or unused")
    graph.output(tuple(n for n, _, _ in kept))
    joined.outputs = [s for _, _, s in kept]
    joined.gm = fx.GraphModule(model, graph, class_name=f"{type(model).__name__}Parts")
    return joined


def _first_call(rec: Recording, path: str) -> int:
    return list(rec.calls).index(path)


def arguments(part: nn.Module, call: Call) -> list[tuple[str, Any]]:
    """The call's arguments bound to the part's forward, in the order of its placeholders, defaults in."""
    bound = inspect.signature(part.forward).bind(*call.args, **call.kwargs)
    bound.apply_defaults()
    return list(bound.arguments.items())


def argument_tensors(part: nn.Module, call: Call) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves([v for _, v in arguments(part, call)]) if isinstance(t, torch.Tensor)]


def _bind_inputs(graph: fx.Graph, part: fx.GraphModule, path: str, call: Call, produced: dict,
                 placeholders: dict, joined: Joined) -> dict:
    """{part placeholder: value in the joined graph}: another part's output node, or a new input."""
    values = dict(arguments(part, call))
    env, leaf = {}, 0
    for node in part.graph.nodes:
        if node.op != "placeholder":
            continue
        leaves, spec = pytree.tree_flatten(values.get(node.target.lstrip("*")))
        nodes = []
        for value in leaves:
            if isinstance(value, torch.Tensor):
                value = produced.get(id(value)) or _input(graph, value, (path, leaf), placeholders, joined)
                leaf += 1
            nodes.append(value)
        env[node] = pytree.tree_unflatten(nodes, spec)
    return env


def _input(graph: fx.Graph, tensor: torch.Tensor, source: tuple[str, int], placeholders: dict,
           joined: Joined) -> fx.Node:
    if id(tensor) not in placeholders:
        placeholders[id(tensor)] = graph.placeholder(f"input_{len(placeholders)}")
        joined.inputs.append(source)
    return placeholders[id(tensor)]


def _copy_nodes(graph: fx.Graph, part: fx.GraphModule, path: str, env: dict) -> Any:
    """Copy the part's nodes into ``graph`` with module and attribute targets under ``path``; returns the
    part's output (nodes in its structure)."""
    for node in part.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            return fx.node.map_arg(node.args[0], lambda n: env[n])
        if _is_item_of_list(node, env):  # x[i] of an argument that was a list: the element itself
            env[node] = env[node.args[0]][node.args[1]]
            continue
        new = graph.node_copy(node, lambda n: env[n])
        if node.op in ("call_module", "get_attr"):
            new.target = f"{path}.{node.target}" if path else node.target
        new.meta["nn_module_stack"] = _stack(part, path, node)
        env[node] = new
    raise CaptureError(f"the graph of {path!r} has no output")


def _is_item_of_list(node: fx.Node, env: dict) -> bool:
    return (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], int)
            and isinstance(env.get(node.args[0]), (list, tuple)))


def _stack(part: nn.Module, path: str, node: fx.Node) -> OrderedDict:
    """The node's module stack with the part's path in front, so sizes are found on the right module."""
    inner = node.meta.get("nn_module_stack") or {}
    prefix = f"{path}." if path else ""
    stack = OrderedDict([(path or "root", (path, type(part)))])
    stack.update((f"{prefix}{k}", (f"{prefix}{p}", t)) for k, (p, t) in inner.items())
    return stack


def _outside_readers(rec: Recording, parts: set[str]) -> dict[int, str]:
    """{tensor id: where} for every part output an operation outside all parts read after the part returned
    it (an earlier op's id may be a freed tensor's); the model's outputs too."""
    born = {id(v): rec.calls[p][0].done for p in parts for v in pytree.tree_leaves(rec.calls[p][0].output)}
    out: dict[int, str] = {}
    for index, (stack, ids, name) in enumerate(rec.ops):
        if parts.intersection(stack):
            continue
        where = f"read by untraced code ({name} in {stack[-1] if stack and stack[-1] else 'the model'})"
        for i in ids:
            if index >= born.get(i, len(rec.ops)):
                out.setdefault(i, where)
    for value in pytree.tree_leaves(rec.output):
        if isinstance(value, torch.Tensor):
            out.setdefault(id(value), "returned by the model")
    return out


def _read_by_parts(value: torch.Tensor, rec: Recording, parts: Mapping[str, Any]) -> bool:
    return any(any(v is value for v in pytree.tree_leaves((rec.calls[p][0].args, rec.calls[p][0].kwargs)))
               for p in parts)


@dataclass(frozen=True)
class PartsResult:
    """The model's own class back, pruned through its traceable parts."""

    module: nn.Module
    """A smaller instance of the model's class: the parts' tensors sliced, the user's forward unchanged."""
    result: Any
    """The :class:`~fxprune.api.PruneResult` of the joined graph (plan keyed by the model's names)."""
    parts: tuple[str, ...]
    """The paths of the modules captured and pruned together."""
    crossings: Mapping[str, str]
    """{part output: reason}: tensors read by untraced code (or returned), whose channels stay."""
    max_abs_error: float

    @property
    def plan(self):
        return self.result.plan


def prune_parts(model: nn.Module, example_inputs: Any, *, modules: Optional[Sequence[str]] = None,
                **options: Any) -> PartsResult:
    """Prune the traceable parts of ``model`` together (every keyword of :func:`fxprune.prune`); the model
    is not changed.

    >>> out = prune_parts(yolo, (images,), sparsity=0.5)     # doctest: +SKIP
    >>> type(out.module) is type(yolo)                       # doctest: +SKIP
    True
    """
    from fxprune.stages import prune
    from fxprune.core.capture import as_inputs

    inputs = as_inputs(example_inputs)
    if options.get("capture") not in (None, "fx"):
        raise InvalidOptionError("prune_parts captures each part with torch.fx: capture must be 'fx'")
    work = copy.deepcopy(model)  # hooks go on a copy: the user's model is never touched
    rec = record(work, inputs)
    parts = find_parts(work, rec, modules)
    if not parts:
        raise CaptureError(f"no module of {type(model).__name__} was called once with tensors and traced by "
                           f"torch.fx: nothing to prune")
    joined = join(work, rec, parts)
    values = _values(work, rec, joined.inputs, "args")
    _check_join(joined, values, _values(work, rec, joined.outputs, "output"))
    result = prune(joined.gm, values, **keeping_code_sizes(options))
    small = rebuild(model, result)
    error = check_parts(small, result.graph_module, joined, inputs)
    return PartsResult(small, result, tuple(parts), dict(joined.crossings), error)


def _values(model: nn.Module, rec: Recording, sources: list[tuple[str, int]], what: str) -> tuple:
    """The recorded tensors at ``sources``: a part's argument tensors (in placeholder order) or outputs."""
    out = []
    for path, index in sources:
        call = rec.calls[path][0]
        leaves = argument_tensors(model.get_submodule(path), call) if what == "args" \
            else pytree.tree_leaves(call.output)
        out.append(leaves[index])
    return tuple(out)


def _check_join(joined: Joined, inputs: tuple, outputs: tuple) -> None:
    """The joined graph must reproduce the recorded outputs: a trace that specialised a branch would not."""
    with torch.no_grad():
        got = joined.gm(*inputs)
    for (path, index), a, b in zip(joined.outputs, got, outputs):
        if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
            raise CaptureError(f"the traced graph of {path!r} does not reproduce its recorded output {index}: "
                               f"its forward depends on something torch.fx fixed while tracing; "
                               f"pass modules=[...] without it")


def check_parts(small: nn.Module, graph: fx.GraphModule, joined: Joined, example_inputs: tuple) -> float:
    """Run the rebuilt model (its own forward), feed the inputs its parts received to the pruned graph,
    and compare with what its parts returned: the code around the parts must accept the new widths."""
    worst = 0.0
    for inputs in batches(example_inputs):
        try:
            rec = record(small, inputs)
        except Exception as exc:
            where = getattr(exc, "fxprune_module", "")
            cls = type(small.get_submodule(where)).__name__
            raise ModuleForwardError(f"{type(small).__name__}'s own forward fails on the pruned parameters in "
                                     f"module {where or '(the root)'!r} ({cls}): {type(exc).__name__}: "
                                     f"{str(exc)[:300]}. Its code computes with a size the plan changed; "
                                     f"{GRAPH_HINT}") from exc
        if any(len(rec.calls.get(p, [])) != 1 for p, _ in joined.inputs + joined.outputs):
            continue  # another batch took another path through untraced code
        with eval_mode(graph), torch.no_grad():
            expected = graph(*_values(small, rec, joined.inputs, "args"))
        worst = max(worst, compare(small, _values(small, rec, joined.outputs, "output"), tuple(expected), 1e-4,
                                   _batch_of(inputs)))
    return worst


def _batch_of(inputs: tuple) -> Any:
    first = pytree.tree_leaves(inputs)
    return first[0].shape[0] if first and isinstance(first[0], torch.Tensor) and first[0].dim() else None
