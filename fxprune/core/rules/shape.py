"""Ops that move channels without computing on them: views, permutes, concatenation, splitting, slicing.

A reshape is cut into factor groups (runs of input dims whose product equals a run of output dims).
Merging dims keeps each position's id, so a conv channel flattened into a Linear becomes a block of
features. Splitting a channel dim in two (hidden -> heads x head_dim, channels -> shuffle groups) makes a
grid of ids; one axis carries the channels and the ids along the other axes are tied, so every head (or
shuffle group) keeps the same local indices. cat and split map offsets exactly; their literal sizes,
like view sizes and slice bounds, are recomputed by the rewriters from the pruned shapes.
"""
from __future__ import annotations

import builtins
import math
import operator
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.fx as fx

from fxprune.core.graph import iter_arrays
from fxprune.core.opcall import OpCall, Unsupported
from fxprune.core.predicates import is_tensor
from fxprune.core.rules.elementwise import nary
from fxprune.core.registry import OpFamily, OpRule, register, register_after_rule

aten = torch.ops.aten


# --- values that are not tensors ---------------------------------------------------------------
# A number measured from a tensor (``x.size(-1)``, ``C // heads``) carries no channel, but its map
# records the ids of the channel dims it measures ("size ids"). Pruning changes that number, which is
# right in a view's size argument (the view rewriters replace it with the new literal size) and wrong in
# tensor arithmetic (``attn * q.size(-1) ** -0.5``): there the dims it measures freeze.
SIZE_QUERIES = ("size", "numel", "nelement", builtins.getattr, builtins.len, torch.numel,
                aten.sym_size, aten.sym_numel)


def shape_query(op: OpCall) -> Any:
    # x.size(1), x.shape, numbers computed from them: no channels, but they remember what they measure
    if isinstance(op.out, torch.Tensor):
        numbers = [a for a in op.node.args if isinstance(a, fx.Node) and not is_tensor(a)]
        op.freeze([op.ids(a) for a in numbers], "a channel count used in tensor arithmetic")
        return nary(op)
    return _size_ids(op)


def _size_ids(op: OpCall) -> Any:
    """The channel ids a number depends on: a tuple per dim for ``x.shape``, else one array or None."""
    x = op.arg(0)
    if not is_tensor(x):  # arithmetic on numbers: the union of what they measure
        return _union([op.ids(a) for a in op.node.args if isinstance(a, fx.Node)])
    if op.node.target not in SIZE_QUERIES:  # x.dim(), x.get_device()
        return None
    x_ids = op.ids(x)
    if op.node.target is builtins.getattr:
        return x_ids if op.arg(1) == "shape" else None
    if op.node.target in ("size", aten.sym_size):
        dim = op.value(op.arg(1, "dim"))
        return x_ids if dim is None else x_ids[dim]
    return x_ids[0] if op.node.target is builtins.len else _union(x_ids)


def _union(ids: Any) -> Optional[torch.Tensor]:
    arrays = list(iter_arrays(ids))
    return torch.cat(arrays) if arrays else None


def new_factory(op: OpCall) -> Any:
    # x.new_zeros(size) -> a fresh tensor of literal size: no channels; x lends only dtype and device
    return op.fixed()


@register_after_rule
def freeze_read_sizes(op: OpCall, rule: Any) -> None:
    """A number measured from a channel dim (``B, N, C = x.shape``, ``C // heads``) is recomputed at run
    time from the pruned tensor, so only ops that read it exactly may take it: shape arithmetic (it
    carries what the number measures on), views and expand (their rewriters put the pruned literal in
    place of a stale size) and items of a shape tuple. Any other op freezes the dims it measures."""
    if rule in (shape_query, reshape, expand) or (rule is getitem and not is_tensor(op.node.args[0])):
        return
    numbers = [a for a in op.node.all_input_nodes if not is_tensor(a)]
    op.freeze([op.ids(a) for a in numbers], "a size read from the tensor's shape at run time")


# --- reshape -----------------------------------------------------------------------------------
VIEW_METHODS = ("view", "reshape")
VIEW_FUNCTIONS = (torch.reshape, aten.view, aten.reshape, aten._unsafe_view, aten.view_copy)
UNFLATTENS = ("unflatten", torch.unflatten, aten.unflatten)
SIZELESS_VIEWS = ("flatten", torch.flatten, nn.Flatten, aten.flatten)
"""Views whose arguments hold no size (start/end dims): nothing to rewrite."""
AS_VIEWS = ("view_as", "reshape_as", aten.view_as, aten.reshape_as)
"""Views to another tensor's shape: no size to rewrite, but the result's dims are that tensor's."""
VIEWS = VIEW_METHODS + VIEW_FUNCTIONS + UNFLATTENS + SIZELESS_VIEWS + AS_VIEWS + (nn.Unflatten, aten._reshape_alias)


def reshape_as(op: OpCall) -> Any:
    # x.reshape_as(other): x's channels land on the dims of other (LeViT's BatchNorm over flattened
    # tokens, reshaped back as its input), so each output dim is tied to other's dim
    out = reshape(op)
    for ids, other in zip(out, op.ids(op.arg(1, "other"))):
        op.unify(ids, other, f"reshaped as a tensor without those channels at {op.where()}")
    return out


def reshape(op: OpCall) -> Any:
    out = _reshape(op)
    if op.ctx.options.code_sizes:
        _measured_widths(op, out)
    return out


def _measured_widths(op: OpCall, out: tuple) -> None:
    """``v.view(B, C, H, W)`` with ``C`` read from ``x.shape``: code that recomputes ``C`` from the pruned
    ``x`` views ``v`` correctly only if both kept as many channels (``AnalysisOptions.code_sizes``)."""
    for position, size in enumerate(_size_args(op)):
        measured = op.ids(size) if isinstance(size, fx.Node) else None
        if isinstance(measured, torch.Tensor) and position < len(out) and out[position] is not None \
                and measured.numel() == out[position].numel():
            op.equal_pieces([measured, out[position]])


def _size_args(op: OpCall) -> list:
    """The size arguments of a view/reshape, one per output dim (empty for spellings without them)."""
    node = op.node
    if node.op == "call_method" and node.target in VIEW_METHODS:
        args = list(node.args[1:]) or list(node.kwargs.get("shape", ()))
        return list(args[0]) if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
    if node.target in VIEW_FUNCTIONS:
        sizes = op.arg(1, "shape" if node.target is torch.reshape else "size")
        return list(sizes) if isinstance(sizes, (list, tuple)) else []
    return []


def _reshape(op: OpCall) -> Any:
    x = op.arg(0, "input")
    in_shape, out_shape = op.shape(x), op.shape(op.node)
    x_ids = op.ids(x)
    out: list[Optional[torch.Tensor]] = [None] * len(out_shape)
    for d, size in enumerate(in_shape):
        if size == 1:
            op.freeze(x_ids[d], "a single channel reshaped away")
    for in_dims, out_dims in factor_groups(in_shape, out_shape):
        for d, ids in _reshape_group(op, x_ids, in_shape, out_shape, in_dims, out_dims).items():
            out[d] = ids
    return tuple(out)


def factor_groups(a: tuple, b: tuple) -> list[tuple[list[int], list[int]]]:
    """Runs of dims of ``a`` and ``b`` (size-1 dims skipped) whose products match."""
    ins = [d for d, s in enumerate(a) if s != 1]
    outs = [d for d, s in enumerate(b) if s != 1]
    groups, i, j = [], 0, 0
    while i < len(ins) and j < len(outs):
        gi, gj = [ins[i]], [outs[j]]
        pi, pj = a[ins[i]], b[outs[j]]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj and i < len(ins):
                gi.append(ins[i]); pi *= a[ins[i]]; i += 1
            elif pj < pi and j < len(outs):
                gj.append(outs[j]); pj *= b[outs[j]]; j += 1
            else:
                raise Unsupported(f"a reshape from {list(a)} to {list(b)}")
        groups.append((gi, gj))
    return groups


def _reshape_group(op: OpCall, x_ids: tuple, a: tuple, b: tuple, gi: list, gj: list) -> dict:
    carriers = [d for d in gi if x_ids[d] is not None]
    if not carriers:
        return {}
    if len(carriers) > 1:
        op.freeze([x_ids[d] for d in carriers], "a reshape merging two channel dims")
        return {}
    k = carriers[0]
    sizes = [a[d] for d in gi]
    shape = [1] * len(gi)
    shape[gi.index(k)] = -1
    flat = x_ids[k].view(shape).expand(sizes).reshape(-1)
    if len(gj) == 1:
        return {gj[0]: flat}
    return _split_grid(op, flat.view([b[d] for d in gj]), gj)


def _split_grid(op: OpCall, grid: torch.Tensor, gj: list) -> dict:
    """One axis of the grid carries the channels; ids along the others are tied to it."""
    varying = [axis for axis in range(grid.dim()) if bool((grid != grid.narrow(axis, 0, 1)).any())]
    if not varying:
        varying = [0]
    if op.ctx.options.split_axis == "outer":
        axis = varying[0]
    else:
        axis = max(varying, key=lambda v: (grid.shape[v], v))
    index = [0] * grid.dim()
    index[axis] = slice(None)
    rep = grid[tuple(index)]
    view = [1] * grid.dim()
    view[axis] = -1
    # view(c) -> (g, c/g): each column is one unit, so every group keeps the same local indices
    op.unify(grid.reshape(-1), rep.view(view).expand(grid.shape).reshape(-1),
             f"channels split across dims at {op.where()}")
    return {gj[axis]: rep}


def _view_sizes(rw, sizes: list, old_sizes: Optional[list] = None) -> list:
    """New literal sizes: each int that was not -1 becomes the pruned output size, and so does a size
    computed in the graph (``C // heads``) from a pruned dim or at a position that shrinks: its value
    would follow whichever tensor it measured, not this view's output (``old_sizes``: the old graph's
    arguments, whose size ids analysis recorded)."""
    new, old = rw.new_shape(), rw.old_shape()
    if len(sizes) != len(new):
        return sizes
    env = rw.pruning.analysis.env
    old_sizes = sizes if old_sizes is None else old_sizes
    return [_new_size(rw, s, o, n, before, env) for s, o, n, before in zip(sizes, old_sizes, new, old)]


def _new_size(rw, size: Any, old: Any, new: int, before: int, env: dict) -> Any:
    if isinstance(size, int):
        return size if size == -1 else new
    if not isinstance(size, fx.Node):
        return size
    measures = isinstance(old, fx.Node) and any(True for _ in iter_arrays(env.get(old)))
    if measures:  # it would follow the tensor it measured, not this output: the literal size
        return new
    if new == before:
        return size
    if not _symbolic(old):
        return new
    # a size the graph computes from a dynamic dim (batch * heads) at a position that shrinks: scaled in
    # the graph, so a dynamic batch stays dynamic (a literal would bake the example's batch in)
    common = math.gcd(new, before)
    graph = rw.node.graph
    with graph.inserting_before(rw.node):
        if new // common != 1:
            size = graph.call_function(operator.mul, (size, new // common))
        return graph.call_function(operator.floordiv, (size, before // common))


def _symbolic(node: Any) -> bool:
    """An exported graph's size computed from ``aten.sym_size`` (export keeps only dynamic dims as
    sizes read at run time; static ones are constants), through SymInt arithmetic."""
    if not isinstance(node, fx.Node):
        return False
    if node.target is torch.ops.aten.sym_size.int:
        return True
    return node.target in _SIZE_ARITHMETIC and any(_symbolic(a) for a in node.all_input_nodes)


_SIZE_ARITHMETIC = (operator.mul, operator.floordiv, operator.add, operator.sub, operator.mod)


def reshape_alias(op: OpCall) -> Any:
    # _reshape_alias(x, size, stride): a reshape, when x and the strides are contiguous (the rewrite
    # recomputes contiguous strides for the new sizes; any other stride pattern would need x's layout)
    if not _contiguous(op.value(op.arg(0, "input"))) or \
            list(op.value(op.arg(2, "stride"))) != _contiguous_strides(op.shape(op.node)):
        raise Unsupported("a _reshape_alias with non-contiguous strides")
    return reshape(op)


def _contiguous_strides(shape: tuple) -> list[int]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(int(size), 1)
    return strides[::-1]


def _contiguous(value: Any) -> bool:
    stride = value.stride() if callable(value.stride) else value.stride
    return list(stride) == _contiguous_strides(tuple(value.shape))


def rewrite_reshape_alias(rw) -> None:
    rw.set_arg(1, "size", _view_sizes(rw, list(rw.arg(1, "size")), list(rw.old_node.args[1])))
    rw.set_arg(2, "stride", _contiguous_strides(tuple(rw.new_shape())))


def rewrite_view_method(rw) -> None:
    args, old = list(rw.node.args[1:]), list(rw.old_node.args[1:])
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        rw.node.args = (rw.node.args[0], _view_sizes(rw, list(args[0]), list(old[0])))
    elif args:
        rw.node.args = (rw.node.args[0], *_view_sizes(rw, args, old))
    elif "shape" in rw.node.kwargs:
        rw.set_arg(1, "shape", _view_sizes(rw, list(rw.node.kwargs["shape"]),
                                           list(rw.old_node.kwargs["shape"])))


def rewrite_view_function(rw) -> None:
    name = "shape" if rw.node.target is torch.reshape else "size"
    old = rw.old_node.args[1] if len(rw.old_node.args) > 1 else rw.old_node.kwargs[name]
    rw.set_arg(1, name, _view_sizes(rw, list(rw.arg(1, name)), list(old)))


def rewrite_unflatten(rw) -> None:
    dim = rw.arg(1, "dim")
    sizes = list(rw.arg(2, "sizes"))
    dim = dim % len(rw.old_input_shape(0))
    new = rw.new_shape()[dim: dim + len(sizes)]
    rw.set_arg(2, "sizes", [n if s != -1 else s for s, n in zip(sizes, new)])


def resize_unflatten(old: nn.Module, new: nn.Module, rw) -> None:
    dim = old.dim % len(rw.old_input_shape(0))
    new.unflattened_size = tuple(rw.new_shape()[dim: dim + len(old.unflattened_size)])


# --- dim moves -----------------------------------------------------------------------------------
def _perm_of(op: OpCall) -> list[int]:
    args = op.node.args[1:]
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        return list(args[0])
    if not args:
        return list(op.node.kwargs.get("dims", ()))
    return list(args)


def permute(op: OpCall) -> Any:
    x_ids = op.ids(op.arg(0, "input"))
    perm = [p % len(x_ids) for p in _perm_of(op)]
    return tuple(x_ids[p] for p in perm)


def transpose(op: OpCall) -> Any:
    x_ids = list(op.ids(op.arg(0, "input")))
    d0, d1 = (op.value(op.arg(i)) % len(x_ids) for i in (1, 2))
    x_ids[d0], x_ids[d1] = x_ids[d1], x_ids[d0]
    return tuple(x_ids)


def t(op: OpCall) -> Any:
    return tuple(reversed(op.ids(op.arg(0, "input"))))


def movedim(op: OpCall) -> Any:
    x_ids = op.ids(op.arg(0, "input"))
    src, dst = op.value(op.arg(1, "source")), op.value(op.arg(2, "destination"))
    src = [src] if isinstance(src, int) else list(src)
    dst = [dst] if isinstance(dst, int) else list(dst)
    n = len(x_ids)
    src, dst = [s % n for s in src], [d % n for d in dst]
    rest = [d for d in range(n) if d not in src]
    order: list[Optional[int]] = [None] * n
    for s, d in zip(src, dst):
        order[d] = s
    it = iter(rest)
    return tuple(x_ids[o if o is not None else next(it)] for o in order)


def unsqueeze(op: OpCall) -> Any:
    x_ids = list(op.ids(op.arg(0, "input")))
    d = op.value(op.arg(1, "dim")) % (len(x_ids) + 1)
    return tuple(x_ids[:d] + [None] + x_ids[d:])


def squeeze(op: OpCall) -> Any:
    x = op.arg(0, "input")
    x_ids, shape = op.ids(x), op.shape(x)
    dims = op.value(op.arg(1, "dim"))
    if dims is None:
        dims = range(len(shape))
    dims = {d % len(shape) for d in ([dims] if isinstance(dims, int) else dims)}
    gone = [d for d in dims if shape[d] == 1]
    op.freeze([x_ids[d] for d in gone], "a single channel squeezed away")
    return tuple(ids for d, ids in enumerate(x_ids) if d not in gone)


def expand(op: OpCall) -> Any:
    # x[1, C, 1, 1].expand(N, C, H, W): expanded dims carry no channel
    x = op.arg(0, "input")
    x_ids, shape, out = op.ids(x), op.shape(x), op.shape(op.node)
    lead = len(out) - len(shape)
    result = []
    for d in range(len(out)):
        k = d - lead
        if k >= 0 and shape[k] == out[d]:
            result.append(x_ids[k])
        else:
            if k >= 0:
                op.freeze(x_ids[k], "a single channel expanded")
            result.append(None)
    return tuple(result)


def rewrite_expand(rw) -> None:
    rewrite_view_method(rw) if rw.node.op == "call_method" else rw.set_arg(
        1, "size", _view_sizes(rw, list(rw.arg(1, "size"))))


def roll(op: OpCall) -> Any:
    # roll(x, shifts, dims): positions rotate along spatial dims (Swin's cyclic shift); channels pass
    x_ids = op.ids(op.arg(0, "input"))
    dims = op.value(op.arg(2, "dims"))
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    if not dims:  # a roll of the flattened tensor mixes every dim
        op.freeze(list(x_ids), "a roll over the flattened tensor")
        return op.fixed()
    # a rotated channel dim would need a new shift once channels go: keep it whole
    op.freeze([x_ids[d % len(x_ids)] for d in dims], "a roll along a channel dim")
    return x_ids


def repeat(op: OpCall) -> Any:
    x_ids = op.ids(op.arg(0, "input"))
    reps = op.node.args[1:]
    reps = list(reps[0]) if len(reps) == 1 and isinstance(reps[0], (list, tuple)) else list(reps)
    lead = len(reps) - len(x_ids)
    return tuple(None if d < lead else (None if x_ids[d - lead] is None
                                        else x_ids[d - lead].repeat(op.value(reps[d]))) for d in range(len(reps)))


# --- concatenation -----------------------------------------------------------------------------
def cat(op: OpCall) -> Any:
    # cat([a, b], dim): offsets map exactly; every other dim ties position by position
    tensors = list(op.arg(0, "tensors"))
    dim = op.value(op.arg(1, "dim", 0))
    ids = [op.ids(t) for t in tensors]
    shapes = [op.shape(t) for t in tensors]
    n = len(op.shape(op.node))
    dim %= n
    parts = [i[dim] if i[dim] is not None else torch.full((s[dim],), -1, dtype=torch.long)
             for i, s in zip(ids, shapes)]
    joined = torch.cat(parts) if any(i[dim] is not None for i in ids) else None
    return tuple(joined if d == dim else _tie_all(op, [i[d] for i in ids]) for d in range(n))


def _tie_all(op: OpCall, arrays: list) -> Any:
    if any(a is None for a in arrays):
        op.freeze(arrays, "concatenated with a tensor that has no channels on this dim")
        return None
    for other in arrays[1:]:
        op.unify(arrays[0], other)
    return arrays[0]


def stack(op: OpCall) -> Any:
    tensors = list(op.arg(0, "tensors"))
    ids = [op.ids(t) for t in tensors]
    n = len(op.shape(op.node))
    dim = op.value(op.arg(1, "dim", 0)) % n
    inner = [_tie_all(op, [i[d] for i in ids]) for d in range(n - 1)]
    return tuple(inner[:dim] + [None] + inner[dim:])


# --- splitting and slicing -----------------------------------------------------------------------
def _pieces(op: OpCall, dim: int) -> Any:
    x = op.arg(0, "input")
    x_ids = op.ids(x)
    n = len(op.shape(x))
    dim %= n
    out, offset = [], 0
    for value in op.out:
        size = int(value.shape[dim])
        piece = list(x_ids)
        if x_ids[dim] is not None:
            piece[dim] = x_ids[dim][offset: offset + size]
        out.append(tuple(piece))
        offset += size
    return tuple(out)


def split(op: OpCall) -> Any:
    if op.node.target in ("tensor_split", torch.tensor_split, aten.tensor_split):
        raise Unsupported("tensor_split")
    dim = op.value(op.arg(2, "dim", 0))
    pieces = _pieces(op, dim)
    if _is_chunk(op.node) or op.ctx.options.code_sizes:
        _equal_pieces(op, [piece[dim % len(piece)] for piece in pieces])
    return pieces


def _equal_pieces(op: OpCall, arrays: list) -> None:
    """chunk(n) splits at size // n: after pruning it splits where the plan's pieces end only if they
    stay equal (a forward that keeps ``chunk``, such as the user's own under fxprune.module), so equal
    pieces are recorded for selection to keep equal. Unequal ones (chunk(3) of 10) have nothing to keep.
    Under ``code_sizes`` a split into equal pieces is kept so too: its sizes come from one number in the
    user's code (``split((self.c, self.c), 1)`` in YOLO11's C2PSA), which can take only one new value;
    a graph alone needs neither, the rewrite recomputes the split sizes."""
    if arrays[0] is None or len({a.numel() for a in arrays}) != 1 or len(arrays) < 2:
        return
    op.equal_pieces(arrays)


def _is_chunk(node: fx.Node) -> bool:
    return node.target in ("chunk", torch.chunk) or getattr(node.target, "overloadpacket", None) is aten.chunk \
        or node.target is aten.chunk


def rewrite_split(rw) -> None:
    dim = rw.arg(2, "dim", 0)
    dim %= len(rw.old_input_shape(0))
    sizes = [shape[dim] for shape in rw.new_shape()]
    old_sizes = [shape[dim] for shape in rw.old_shape()]
    if sizes == old_sizes or _still_a_chunk(rw, sizes):
        return
    x = rw.node.args[0]
    if rw.node.op == "call_method":
        rw.node.target = "split"
        rw.node.args, rw.node.kwargs = (x, sizes, dim), {}
    elif rw.node.op == "call_function" and isinstance(rw.node.target, torch._ops.OpOverload):
        rw.node.target = aten.split_with_sizes.default
        rw.node.args, rw.node.kwargs = (x, sizes, dim), {}
    else:
        rw.node.target = torch.split
        rw.node.args, rw.node.kwargs = (x, sizes, dim), {}


def _still_a_chunk(rw, sizes: list[int]) -> bool:
    """chunk(n) of the pruned tensor gives the same pieces when they are equal: keep it readable."""
    return _is_chunk(rw.node) and len(set(sizes)) == 1


def unbind(op: OpCall) -> Any:
    x = op.arg(0, "input")
    x_ids = op.ids(x)
    dim = op.value(op.arg(1, "dim", 0)) % len(x_ids)
    op.freeze(x_ids[dim], "channels unbound one by one")
    return tuple(tuple(i for d, i in enumerate(x_ids) if d != dim) for _ in op.out)


def getitem(op: OpCall) -> Any:
    x, index = op.node.args
    if not is_tensor(x):
        container = op.ids(x)
        if isinstance(container, (tuple, list)) and isinstance(index, (int, slice)) and \
                isinstance(op.value(x), (tuple, list)):
            return container[index]
        return op.fixed()
    return _index(op, op.ids(x), op.shape(x), index)


def _index(op: OpCall, x_ids: tuple, shape: tuple, index: Any) -> Any:
    items = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(i, (fx.Node, torch.Tensor, list)) and not _is_int_node(op, i) for i in items):
        return _tensor_index(op, x_ids, _expand_ellipsis(items, len(shape)))
    items = _expand_ellipsis(items, len(shape))
    out, d = [], 0
    for item in items:
        if item is None:
            out.append(None)
            continue
        ids = x_ids[d]
        if isinstance(item, slice):
            out.append(_slice_ids(op, ids, shape[d], item))
        else:
            op.freeze(ids, "a single channel selected by index")
        d += 1
    return tuple(out + list(x_ids[d:]))


def _tensor_index(op: OpCall, x_ids: tuple, items: list) -> Any:
    # table[idx] with a tensor idx (other dims whole): the gathered dims lose their channels
    plain = [isinstance(i, slice) and i == slice(None) for i in items]
    if any(i is None for i in items) or not all(p or isinstance(i, fx.Node) for p, i in zip(plain, items)):
        raise Unsupported("indexing that mixes tensors with slices, ints or None")
    dims = [d for d, p in enumerate(plain) if not p]
    if any(op.value(items[d]).dtype in (torch.bool, torch.uint8) for d in dims):
        raise Unsupported("indexing with a boolean mask")
    return _gather(op, list(x_ids), dims)


def _is_int_node(op: OpCall, item: Any) -> bool:
    return isinstance(item, fx.Node) and isinstance(op.value(item), int)


def _expand_ellipsis(items: list, ndim: int) -> list:
    if Ellipsis not in items:
        return items
    at = items.index(Ellipsis)
    used = sum(1 for i in items if i is not None and i is not Ellipsis)
    return items[:at] + [slice(None)] * (ndim - used) + items[at + 1:]


def _slice_ids(op: OpCall, ids: Any, size: int, item: slice) -> Any:
    if ids is None:
        return None
    if any(isinstance(v, fx.Node) for v in (item.start, item.stop, item.step)):
        op.freeze(ids, "a channel slice with bounds computed at run time")
        return ids[slice(*(op.value(v) for v in (item.start, item.stop, item.step)))]
    if item.step not in (None, 1):
        op.freeze(ids, "a strided channel slice")
    return ids[item]


def remap(kept: torch.Tensor, position: Optional[int], size: int) -> Optional[int]:
    """Where an old index lands once dropped positions are gone (None stays None)."""
    if position is None:
        return None
    position = max(0, min(size, position + size if position < 0 else position))
    return int(kept[:position].sum())


def rewrite_getitem(rw) -> None:
    x, index = rw.node.args
    if not isinstance(rw.old_node.args[0], fx.Node) or not rw.is_tensor(rw.old_node.args[0]):
        return
    items = list(index) if isinstance(index, tuple) else [index]
    shape = rw.old_input_shape(0)
    items = _expand_ellipsis(items, len(shape))
    new_items, d = [], 0
    for item in items:
        if item is None:
            new_items.append(None)
            continue
        new_items.append(_remap_item(rw.kept_positions(0, d), item, shape[d]))
        d += 1
    rw.node.args = (x, tuple(new_items) if isinstance(index, tuple) else new_items[0])


def _remap_item(kept: Optional[torch.Tensor], item: Any, size: int) -> Any:
    if kept is None or bool(kept.all()):
        return item
    if isinstance(item, slice):
        return slice(remap(kept, item.start, size), remap(kept, item.stop, size), item.step)
    return remap(kept, item, size)


def index_tensor(op: OpCall) -> Any:
    # x[idx] / index(x, [None, idx]): gathered dims lose their channels, the other dims pass
    x_ids = list(op.ids(op.arg(0, "input")))
    return _gather(op, x_ids, _gathered_dims(op, len(x_ids)))


def _gather(op: OpCall, x_ids: list, indexed: list[int]) -> Any:
    """Advanced indexing on ``indexed`` dims: their channels freeze, the index dims carry none."""
    op.freeze([x_ids[d] for d in indexed], "channels gathered by a tensor index")
    rest = len(x_ids) - len(indexed)
    new = [None] * (len(op.shape(op.node)) - rest)  # the index tensors' broadcast dims
    first, last = indexed[0], indexed[-1]
    if last - first + 1 == len(indexed):  # adjacent indices replace their dims in place
        return tuple(x_ids[:first] + new + x_ids[last + 1:])
    return tuple(new + [i for d, i in enumerate(x_ids) if d not in indexed])


def _gathered_dims(op: OpCall, ndim: int) -> list[int]:
    if op.node.target in (aten.index_select, torch.index_select, "index_select") or \
            getattr(op.node.target, "overloadpacket", None) is aten.index_select:
        return [op.value(op.arg(1, "dim")) % ndim]
    indices = list(op.arg(1, "indices"))
    dims = [d for d, i in enumerate(indices) if i is not None]
    if not dims or any(op.value(indices[d]).dtype in (torch.bool, torch.uint8) for d in dims):
        raise Unsupported("indexing with a boolean mask")
    return dims


def aten_slice(op: OpCall) -> Any:
    # slice(x, dim, start, end, step)
    x = op.arg(0)
    x_ids = list(op.ids(x))
    dim = op.value(op.arg(1, "dim", 0)) % len(x_ids)
    start, end, step = (op.value(op.arg(i, n, dflt)) for i, n, dflt in
                        ((2, "start", None), (3, "end", None), (4, "step", 1)))
    x_ids[dim] = _slice_ids(op, x_ids[dim], op.shape(x)[dim], slice(start, end, step))
    return tuple(x_ids)


def rewrite_aten_slice(rw) -> None:
    dim = rw.arg(1, "dim", 0) % len(rw.old_input_shape(0))
    kept = rw.kept_positions(0, dim)
    if kept is None or bool(kept.all()):
        return
    size = rw.old_input_shape(0)[dim]
    for i, name in ((2, "start"), (3, "end")):
        value = rw.arg(i, name)
        if value is not None:
            rw.set_arg(i, name, remap(kept, min(value, size) if value > 0 else value, size))


def narrow(op: OpCall) -> Any:
    x = op.arg(0, "input")
    x_ids = list(op.ids(x))
    dim = op.value(op.arg(1, "dim")) % len(x_ids)
    start, length = op.value(op.arg(2, "start")), op.value(op.arg(3, "length"))
    x_ids[dim] = _slice_ids(op, x_ids[dim], op.shape(x)[dim], slice(start, start + length))
    return tuple(x_ids)


def rewrite_narrow(rw) -> None:
    dim = rw.arg(1, "dim") % len(rw.old_input_shape(0))
    kept = rw.kept_positions(0, dim)
    if kept is None or bool(kept.all()):
        return
    size = rw.old_input_shape(0)[dim]
    start, length = rw.arg(2, "start"), rw.arg(3, "length")
    new_start = remap(kept, start, size)
    rw.set_arg(2, "start", new_start)
    rw.set_arg(3, "length", remap(kept, start + length, size) - new_start)


def select(op: OpCall) -> Any:
    x = op.arg(0, "input")
    x_ids = list(op.ids(x))
    dim = op.value(op.arg(1, "dim")) % len(x_ids)
    op.freeze(x_ids[dim], "a single channel selected by index")
    return tuple(x_ids[:dim] + x_ids[dim + 1:])


def rewrite_select(rw) -> None:
    dim = rw.arg(1, "dim") % len(rw.old_input_shape(0))
    kept = rw.kept_positions(0, dim)
    if kept is not None and not bool(kept.all()):
        rw.set_arg(2, "index", remap(kept, rw.arg(2, "index"), rw.old_input_shape(0)[dim]))


FAMILY = register(OpFamily("shape", (
    # x.size(1), x.shape, numbers computed from them: no channels, but they remember what they measure
    OpRule(("size", "dim", "numel", "nelement", "ndimension", "get_device", "element_size", "data_ptr",
           builtins.getattr, builtins.len, torch.numel, aten.sym_size, aten.sym_numel, aten.sym_stride,
           aten.sym_storage_offset, operator.floordiv, operator.mul, operator.add, operator.sub,
           operator.truediv, operator.pow, operator.mod, operator.neg, operator.eq, operator.ne, operator.lt,
           operator.le, operator.gt, operator.ge), shape_query, rewrite=None),
    # x.new_zeros(size) -> a fresh tensor of literal size: no channels; x lends only dtype and device
    OpRule(("new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", aten.new_zeros, aten.new_ones,
           aten.new_empty, aten.new_full), new_factory, rewrite=None),
    # x.view(n, -1), reshape, flatten, unflatten: factor groups map a channel to a block, heads or a grid
    OpRule(VIEW_METHODS, reshape, rewrite=rewrite_view_method),
    OpRule(VIEW_FUNCTIONS, reshape, rewrite=rewrite_view_function),
    OpRule(UNFLATTENS, reshape, rewrite=rewrite_unflatten),
    OpRule((nn.Unflatten,), reshape, rewrite=None, resize=resize_unflatten),
    OpRule(SIZELESS_VIEWS, reshape, rewrite=None),
    OpRule(AS_VIEWS, reshape_as, rewrite=None),
    # _reshape_alias(x, size, stride): a view with explicit (contiguous) strides
    OpRule((aten._reshape_alias,), reshape_alias, rewrite=rewrite_reshape_alias),
    OpRule(("permute", torch.permute, aten.permute), permute, rewrite=None),
    OpRule(("transpose", "swapaxes", "swapdims", torch.transpose, torch.swapaxes, aten.transpose,
           aten.swapaxes), transpose, rewrite=None),
    OpRule(("t", torch.t, aten.t, aten.numpy_T), t, rewrite=None),
    OpRule(("movedim", "moveaxis", torch.movedim, torch.moveaxis, aten.movedim), movedim, rewrite=None),
    OpRule(("unsqueeze", torch.unsqueeze, aten.unsqueeze), unsqueeze, rewrite=None),
    OpRule(("squeeze", torch.squeeze, aten.squeeze), squeeze, rewrite=None),
    # x[1, C, 1, 1].expand(N, C, H, W): expanded dims carry no channel
    OpRule(("expand", "broadcast_to", torch.broadcast_to, aten.expand, aten.expand_copy, aten.broadcast_to),
           expand,
           rewrite=rewrite_expand),
    OpRule(("expand_as",), expand, rewrite=None),
    # roll(x, shifts, dims): positions rotate along spatial dims (Swin's cyclic shift); channels pass
    OpRule(("roll", torch.roll, aten.roll), roll, rewrite=None),
    OpRule(("repeat", aten.repeat), repeat, rewrite=None),
    # cat([a, b], dim): offsets map exactly; every other dim ties position by position
    OpRule((torch.cat, torch.concat, torch.concatenate, aten.cat, aten.concat, aten.concatenate), cat,
           rewrite=None),
    OpRule((torch.stack, aten.stack), stack, rewrite=None),
    # split(x, sizes, dim) / chunk(x, n, dim): pieces map offsets exactly; the rewrite recomputes the sizes;
    # a chunk's equal pieces stay equal (selection keeps them in lockstep, fxprune.core.lockstep)
    OpRule(("split", "chunk", "split_with_sizes", torch.split, torch.chunk, aten.split, aten.split_with_sizes,
           aten.chunk,
            aten.split_copy, aten.split_with_sizes_copy), split, rewrite=rewrite_split),
    OpRule(("tensor_split", torch.tensor_split, aten.tensor_split), split, rewrite=None),  # refused by split
    OpRule(("unbind", torch.unbind, aten.unbind), unbind, rewrite=None),
    OpRule((operator.getitem,), getitem, rewrite=rewrite_getitem),
    # x[idx] / index(x, [None, idx]): gathered dims lose their channels, the other dims pass
    OpRule((aten.index, aten.index_select, torch.index_select, "index_select"), index_tensor, rewrite=None),
    # slice(x, dim, start, end, step)
    OpRule((aten.slice, aten.slice_copy), aten_slice, rewrite=rewrite_aten_slice),
    OpRule(("narrow", torch.narrow, aten.narrow), narrow, rewrite=rewrite_narrow),
    OpRule(("select", torch.select, aten.select), select, rewrite=rewrite_select),
)))
