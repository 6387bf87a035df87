"""Recurrent layers: LSTM, GRU and Elman RNN, as modules (fx) and as ``aten.lstm/gru/rnn_*`` (export).

A recurrent layer opens one space of *hidden units*. Unit j owns row ``g*H + j`` of every gate ``g`` in
``W_ih``, ``W_hh`` and both biases (4 gates for an LSTM, 3 for a GRU, 1 for an RNN): all gates of a unit
are tied, so a unit is kept or dropped whole (torch.ao's pruner masks each gate on its own, which
misaligns units across gates). ``W_hh``'s columns read the units back (the recurrence), the next layer's
``W_ih`` columns read them from below, and the output's last dim carries them (twice, forward then
reverse, when bidirectional); layer 0's ``W_ih`` columns contract over the input's last dim.

Every layer and both directions share **one** unit space, tied index by index: ``nn.LSTM`` and
``aten.lstm`` have a single ``hidden_size``, so every layer must keep the same number of units, and the
channel table can only promise that by tying them (independent per-layer spaces would be separate groups
whose kept counts can differ, for example when only the last layer reaches a graph output). A bonus:
``h_n``/``c_n`` stack the layers on dim 0 and then carry the same unit ids on their last dim, so a head on
``h_n[-1]`` prunes too.

Dropping a unit is exact: its own state still evolves, but with its ``W_hh`` columns, the next layer's
``W_ih`` columns and the output's consumers zeroed, nothing reads it (verify zeroes exactly those).
An initial state passed in from outside (a graph input) is a fixed interface and freezes the units; a
zero state built in the graph from a literal size (``torch.zeros(L, N, H)``, the ``aten.zeros`` that
export inserts) is resized by the rewriter. ``proj_size > 0`` and packed sequences are unsupported.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

from fxprune.core.opcall import OpCall, Unsupported
from fxprune.core.registry import OpFamily, OpRule, register

aten = torch.ops.aten

GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
ATEN_MODES = {aten.lstm: "LSTM", aten.gru: "GRU", aten.rnn_tanh: "RNN_TANH", aten.rnn_relu: "RNN_RELU"}
ZERO_FACTORIES = (torch.zeros, aten.zeros.default, "new_zeros", aten.new_zeros.default)


@dataclass(frozen=True)
class Cell:
    """The parameters of one layer in one direction (state_dict keys; biases may be absent)."""

    w_ih: str
    w_hh: str
    biases: tuple[str, ...]


@dataclass(frozen=True)
class Recurrence:
    """What the rule needs to know of one recurrent call, whatever its spelling."""

    gates: int
    layers: tuple[tuple[Cell, ...], ...]
    """``layers[k]`` holds the forward cell and, when bidirectional, the reverse one."""
    x: Any
    hx: Any


def recurrent(op: OpCall, rec: Recurrence) -> Any:
    # rnn(x[..., in], h0[L*D, N, H]) -> (y[..., D*H], h_n[L*D, N, H], ...): one unit space, gates tied
    hidden = _hidden_size(op, rec.layers[0][0])
    units = op.table.fresh(hidden)
    rows = units.repeat(rec.gates)
    x_ids = op.ids(rec.x)
    op.freeze(list(x_ids[:-1]), "a recurrence mixes time steps (its batch and time dims stay)")
    feed = x_ids[-1]
    for layer in rec.layers:
        for cell in layer:
            _tie_cell(op, cell, rows, units, feed)
        feed = units.repeat(len(layer))
    _tie_initial_state(op, rec.hx, units)
    return _result(op, feed, units)


def _hidden_size(op: OpCall, cell: Cell) -> int:
    w_hh = op.param(cell.w_hh)
    size, width = w_hh[0].numel(), w_hh[1].numel()
    if size % width:
        raise Unsupported(f"a recurrent weight {cell.w_hh!r} of shape [{size}, {width}] (proj_size > 0?)")
    return width


def _tie_cell(op: OpCall, cell: Cell, rows: torch.Tensor, units: torch.Tensor,
              feed: Optional[torch.Tensor]) -> None:
    """Gate rows of W_ih, W_hh and biases are the units; W_hh columns read them back."""
    for key in (cell.w_ih, cell.w_hh):
        op.unify(op.produce(key, 0), rows)
    for key in cell.biases:
        op.unify(op.param(key)[0], rows)
    op.unify(op.param(cell.w_hh)[1], units)
    op.consume_param(cell.w_hh, 1)
    op.unify(op.param(cell.w_ih)[1], feed, f"an input with fixed features at {op.where()}")
    op.consume_param(cell.w_ih, 1)


def _tie_initial_state(op: OpCall, hx: Any, units: torch.Tensor) -> None:
    """h0 (and c0) carry the units on their last dim; one from outside the graph freezes them."""
    for node in _nodes(hx):
        if zero_state(node):
            continue  # rebuilt at the new size by the rewriter
        for ids in _tensor_maps(op.ids(node)):
            op.unify(ids[-1], units, f"an initial state with fixed features at {op.where()}")
            op.freeze(list(ids[:-1]), "an initial state")


def _result(op: OpCall, out_ids: Optional[torch.Tensor], units: torch.Tensor) -> Any:
    """The output carries ``out_ids`` on its last dim, every state tensor the units."""
    leaves = itertools.count()

    def leaf(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return None
        last = out_ids if next(leaves) == 0 else units
        return (None,) * (value.dim() - 1) + (last,)

    return pytree.tree_map(leaf, op.out)


def _nodes(value: Any) -> list[fx.Node]:
    if isinstance(value, fx.Node):
        return [value]
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _nodes(v)]
    return []


def _tensor_maps(ids: Any) -> list[tuple]:
    """The per-tensor channel maps inside a (nested) map of a state argument."""
    if isinstance(ids, tuple) and all(i is None or isinstance(i, torch.Tensor) for i in ids):
        return [ids] if ids else []
    if isinstance(ids, (list, tuple)):
        return [m for i in ids for m in _tensor_maps(i)]
    return []


def zero_state(node: fx.Node) -> bool:
    """A zero tensor built in the graph from literal sizes, used only as a recurrent initial state."""
    target = node.target if node.op in ("call_function", "call_method") else None
    if target not in ZERO_FACTORIES:
        return False
    size = _zero_size(node)
    users = list(node.users)
    return size is not None and isinstance(size[-1], int) and len(users) == 1 and _is_recurrent(users[0])


def _zero_size(node: fx.Node) -> Optional[list]:
    args = node.args[1:] if node.target in ("new_zeros", aten.new_zeros.default) else node.args
    if "size" in node.kwargs:
        args = (node.kwargs["size"],)
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        return list(args[0])
    return list(args) if args else None


def _is_recurrent(node: fx.Node) -> bool:
    if node.op == "call_function":
        return getattr(node.target, "overloadpacket", None) in ATEN_MODES
    if node.op == "call_module":
        owner = node.graph.owning_module
        return owner is not None and isinstance(owner.get_submodule(str(node.target)), nn.RNNBase)
    return False


# --- spellings -----------------------------------------------------------------------------------
def recurrent_module(op: OpCall) -> Any:
    # nn.LSTM(x, (h0, c0)) / nn.GRU(x, h0) / nn.RNN(x, h0)
    m = op.module
    if m.mode not in GATES:
        raise Unsupported(f"recurrent mode {m.mode!r} of module {op.node.target}")
    if getattr(m, "proj_size", 0) > 0:
        raise Unsupported(f"LSTM {op.node.target} with proj_size={m.proj_size}")
    names = list(m._flat_weights_names)
    per = len(names) // (m.num_layers * (2 if m.bidirectional else 1))
    keys = [f"{op.node.target}.{n}" for n in names]
    return recurrent(op, _recurrence(keys, per, m.num_layers, m.bidirectional, GATES[m.mode],
                                     op.arg(0, "input"), _hx(op.node)))


def recurrent_aten(op: OpCall) -> Any:
    # lstm.input(x, [h0, c0], params, has_biases, num_layers, dropout, train, bidirectional, batch_first)
    if op.node.target._overloadname != "input":
        raise Unsupported("a recurrent layer over a packed sequence")
    params, layers, bidirectional = op.arg(2), op.value(op.arg(4)), op.value(op.arg(7))
    keys = [op.param_key(p) for p in params]
    if any(k is None for k in keys):
        raise Unsupported("a recurrent layer whose weights are computed in the graph")
    directions = 2 if bidirectional else 1
    per = len(keys) // (layers * directions)
    if per not in (2, 4):
        raise Unsupported("an LSTM with proj_size > 0")
    gates = GATES[ATEN_MODES[op.node.target.overloadpacket]]
    return recurrent(op, _recurrence(keys, per, layers, bidirectional, gates, op.arg(0), op.arg(1)))


def _recurrence(keys: Sequence[str], per: int, layers: int, bidirectional: bool, gates: int,
                x: Any, hx: Any) -> Recurrence:
    """Cells from a flat weight list ordered like ``nn.RNNBase._flat_weights_names``."""
    if per not in (2, 4):
        raise Unsupported(f"{per} weights per recurrent cell (proj_size > 0?)")
    cells = [Cell(keys[i], keys[i + 1], tuple(keys[i + 2: i + per])) for i in range(0, len(keys), per)]
    d = 2 if bidirectional else 1
    return Recurrence(gates, tuple(tuple(cells[k * d:(k + 1) * d]) for k in range(layers)), x, hx)


# --- rewrite -------------------------------------------------------------------------------------
def rewrite_zero_state(rw) -> None:
    """A zero initial state built in the graph gets the new hidden size as its last literal."""
    hidden = _new_hidden(rw)
    for old, new in zip(_nodes(_hx(rw.old_node)), _nodes(_hx(rw.node))):
        if zero_state(old):
            _set_last_size(new, hidden)


def _hx(node: fx.Node) -> Any:
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("hx")


def _new_hidden(rw) -> int:
    shapes = [s for s in pytree.tree_leaves(rw.new_shape(), is_leaf=lambda v: isinstance(v, tuple))]
    return int(shapes[1][-1])


def _set_last_size(node: fx.Node, size: int) -> None:
    if "size" in node.kwargs:
        node.kwargs = {**node.kwargs, "size": [*node.kwargs["size"][:-1], size]}
        return
    lead = 1 if node.target in ("new_zeros", aten.new_zeros.default) else 0
    args = list(node.args)
    if len(args) == lead + 1 and isinstance(args[lead], (list, tuple)):
        args[lead] = [*args[lead][:-1], size]
    else:
        args[-1] = size
    node.args = tuple(args)


def resize_recurrent(old: nn.Module, new: nn.Module, rw) -> None:
    new.input_size = new.weight_ih_l0.shape[1]
    new.hidden_size = new.weight_hh_l0.shape[1]
    new._init_flat_weights()  # the forward reads this cached list, not the attributes


__all__ = ["recurrent", "zero_state", "Recurrence", "Cell"]


FAMILY = register(OpFamily("recurrent", (
    # nn.LSTM(x, (h0, c0)) / nn.GRU(x, h0) / nn.RNN(x, h0)
    OpRule((nn.RNNBase,), recurrent_module, rewrite=rewrite_zero_state, resize=resize_recurrent),
    # lstm.input(x, [h0, c0], params, has_biases, num_layers, dropout, train, bidirectional, batch_first)
    OpRule(tuple(ATEN_MODES), recurrent_aten, rewrite=rewrite_zero_state),
)))
