"""Mixture-of-experts layers of a graph: find every router and its experts, and remove whole experts exactly.

A **MoE layer** is a top-k node whose input is a router: a linear layer (its output ``E`` wide, one
logit per expert), reached through pass-through ops only (softmax, dtype casts), each of them read by
the next alone. What the graph computes from the top-k and the tensors before it, with no new
parameter, is its **routing** (weights, expert masks, sort orders, offsets). The experts are found in
one of two spellings:

- **lanes** (the fx level, a loop over an ``nn.ModuleList`` unrolled by tracing): each expert adds its
  contribution to an accumulator (``out = out + w * expert(x)``, ``out.index_add_(0, tokens, y)``), and
  its iteration reads the routing with its own index as a literal (``chosen == e``, ``mask[e]``). A lane
  is what only that contribution reads: removing the add (dead code takes the rest) removes the expert.
- **stacked** parameters (transformers 5's Mixtral, OLMoE, Qwen-MoE experts, both levels): a parameter
  whose dim 0 is ``E``, read by an op together with the routing (``grouped_mm(x, w, offsets)``, ``w[ids]``).
  Removing an expert slices it out of dim 0.

Either way the router's rows of the removed experts go, the kept lanes' index literals are renumbered,
and the literal expert counts the routing holds (``one_hot`` classes, ``histc`` bins and range) shrink.
The result equals the original whose router never picks a removed expert (:func:`routed_reference`: its
logits at ``-inf`` before the softmax and top-k). What the pass does not understand is not a candidate
and is listed with the reason: a router read elsewhere, a count literal in an op without a rule, lanes
that do not cover the experts once each.

>>> found = find_experts(capture(moe, x).gm)                                           # doctest: +SKIP
>>> found.layers[0].name, found.layers[0].num_experts, found.layers[0].kind            # doctest: +SKIP
('', 4, 'lanes')
>>> smaller = drop_experts(gm, {"": (1,)})                                             # doctest: +SKIP
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxprune.core.blocks import ADDS, _ancestors, _attr, _module_path
from fxprune.core.rewrite import build_graph_module
from fxprune.core.verify import reference_items
from fxprune.errors import InvalidOptionError

aten = torch.ops.aten
TOPK = frozenset({torch.topk, aten.topk.default, "topk"})
#: Ops between the router and the top-k: they keep one logit per expert on the last dim.
PASS_THROUGH = frozenset({torch.softmax, F.softmax, torch.nn.functional.log_softmax, aten.softmax.int,
                          aten._softmax.default, aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout,
                          "softmax", "to", "float", "type_as", "contiguous", aten.clone.default})
#: The ops a loop over experts reads the routing with, its expert index a literal argument.
INDEXING = frozenset({operator.getitem, operator.eq, torch.eq, aten.eq.Scalar, "eq", "__getitem__", "__eq__"})
SORTS = frozenset({aten.sort.default, aten.sort.stable, torch.sort, "sort"})
MULS = frozenset({operator.mul, torch.mul, aten.mul.Tensor, "mul"})
#: Export's runtime checks: they read sizes and dtypes, never the values an expert computes.
ASSERTS = frozenset({aten._assert_scalar.default, aten._assert_tensor_metadata.default, torch._assert,
                     aten.sym_constrain_range_for_size.default})
LINEARS = frozenset({F.linear, aten.linear.default})
#: The accumulations an expert's contribution is summed into (in place or not).
ACCUMULATES = ADDS | frozenset({torch.index_add, aten.index_add.default, aten.index_add_.default, "index_add",
                                "index_add_"})
#: Ops that can stand between an expert parameter and the op that reads it with the routing.
PARAM_VIEWS = frozenset({aten.transpose.int, aten.permute.default, aten.to.dtype, aten._to_copy.default,
                         aten.contiguous.default, aten.view.default, torch.transpose, "transpose", "to",
                         "permute", "contiguous", "t", aten.t.default})


@dataclass(frozen=True)
class Lane:
    """One expert's unrolled iteration (node names)."""

    index: int
    """The expert's index (the literal its iteration reads the routing with)."""
    terminal: str
    """The add that sums its contribution into the accumulator."""
    accumulator: str
    contribution: str
    literal: str
    """The node holding the index literal."""
    where: Any
    """Its position: an args index or a kwargs key."""
    tensors: tuple[str, ...]
    """The parameters only this expert reads (state_dict keys)."""


@dataclass(frozen=True)
class MoELayer:
    """A router, its top-k and its experts."""

    name: str
    """The innermost module holding the router and the experts (``model.layers.0.mlp``); the router's
    module path (``gate``) when that is the root."""
    router: str
    """The router's output node (one logit per expert)."""
    router_tensors: tuple[str, ...]
    """The router's weight (and bias) keys: their rows are the experts."""
    topk: str
    top_k: int
    num_experts: int
    lanes: tuple[Lane, ...] = ()
    stacked: tuple[str, ...] = ()
    """Parameters whose dim 0 is the experts (state_dict keys)."""
    counts: tuple[str, ...] = ()
    """Routing nodes holding the expert count as a literal."""
    ids: str = ""
    """The top-k's expert-index output node (``topk[1]``)."""
    sorted_ids: str = ""
    """Stacked experts run on tokens sorted by expert (``grouped_mm``): the sorted expert ids, one per row
    of :attr:`weighted` ('' when the graph has no such rows)."""
    weighted: str = ""
    """The experts' outputs times their gate values, one row per (token, chosen expert) in sorted order."""

    @property
    def kind(self) -> str:
        return "lanes" if self.lanes else "stacked"

    def expert_tensors(self, expert: int) -> dict[str, Any]:
        """{state_dict key: None (the whole tensor) or the dim-0 index} of expert ``expert``'s weights."""
        if self.lanes:
            return {k: None for k in self.lanes[expert].tensors}
        return {k: expert for k in self.stacked}


@dataclass(frozen=True)
class Experts:
    """What :func:`find_experts` found: the MoE layers in graph order, and what is not one and why."""

    layers: tuple[MoELayer, ...]
    rejected: tuple[tuple[str, str], ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.layers)

    def pick(self, removed: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
        """``removed`` checked: known layers, valid indices, at least ``top_k`` (and one) kept."""
        layers = {m.name: m for m in self.layers}
        unknown = sorted(set(removed) - set(layers))
        if unknown:
            why = dict(self.rejected)
            shown = "; ".join(f"{n!r}: {why.get(n, 'no such MoE layer')}" for n in unknown[:3])
            raise InvalidOptionError(f"not a MoE layer whose experts can be removed: {shown} "
                                     f"(layers: {list(self.names)[:8]})")
        return {name: check_removal(layers[name], indices) for name, indices in removed.items()}


def check_removal(layer: MoELayer, indices: Iterable[int]) -> tuple[int, ...]:
    """The sorted indices, checked: in range, not every expert, and ``top_k`` kept."""
    out = tuple(sorted(set(int(i) for i in indices)))
    bad = [i for i in out if not 0 <= i < layer.num_experts]
    if bad:
        raise InvalidOptionError(f"MoE layer {layer.name!r} has {layer.num_experts} experts: no expert {bad}")
    kept = layer.num_experts - len(out)
    if kept == 0:
        raise InvalidOptionError(f"cannot remove all {layer.num_experts} experts of MoE layer {layer.name!r}: "
                                 f"at least one must stay")
    if kept < layer.top_k:
        raise InvalidOptionError(f"MoE layer {layer.name!r} would keep {kept} experts, fewer than its top-k "
                                 f"{layer.top_k}: keep at least {layer.top_k}")
    return out


# --- finding -----------------------------------------------------------------------------------------
def find_experts(gm: fx.GraphModule) -> Experts:
    """Every MoE layer of ``gm`` (a captured graph) whose experts can be removed, and every rejected one."""
    ancestors = _ancestors(gm.graph)
    reads = _parameter_reads(gm, ancestors)
    found, rejected = [], []
    for node in gm.graph.nodes:
        if not _is_call(node, TOPK):
            continue
        layer, reason = _layer(gm, node, ancestors, reads)
        if layer is not None:
            found.append(layer)
        else:
            rejected.append((_router_name(gm, node), reason))
    return Experts(tuple(found), tuple(rejected))


def _is_call(node: fx.Node, targets: frozenset) -> bool:
    return node.op in ("call_function", "call_method") and node.target in targets


def _parameter_reads(gm: fx.GraphModule, ancestors: dict) -> dict[fx.Node, frozenset]:
    """Per node, the parameter-reading nodes among it and its ancestors."""
    readers = {n for n in gm.graph.nodes if _reads_parameter(gm, n)}
    return {n: frozenset(a for a in ancestors[n] | {n} if a in readers) for n in gm.graph.nodes}


def _reads_parameter(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "get_attr":
        return isinstance(_attr(gm, str(node.target)), torch.nn.Parameter)
    return node.op == "call_module" and any(True for _ in gm.get_submodule(str(node.target)).parameters())


def _layer(gm: fx.GraphModule, topk: fx.Node, ancestors: dict, reads: dict) -> tuple[Optional[MoELayer], str]:
    router, why = _router(gm, topk)
    if router is None:
        return None, why
    node, keys, experts = router
    k = _topk_k(topk)
    if k is None:
        return None, f"the top-k {topk.name!r} is not over the last dim, or its k is not a literal"
    routing = {n for n in gm.graph.nodes if topk in ancestors[n] and reads[n] <= reads[topk]} | {topk}
    ids = next((u for u in topk.users if u.target is operator.getitem and u.args[1] == 1), None)
    counts, why = _count_nodes(routing, experts)
    if why:
        return None, why
    lanes, why = _lanes(gm, topk, routing, ancestors, reads, experts)
    if why:
        return None, why
    stacked = () if lanes else _stacked(gm, routing, experts, keys)
    if not lanes and not stacked:
        return None, (f"no experts: nothing adds one contribution per expert index, and no parameter with "
                      f"{experts} rows on dim 0 is read with the routing of {topk.name!r}")
    name = _common_owner(keys + stacked + tuple(k for lane in lanes for k in lane.tensors)) \
        or keys[0].rpartition(".")[0]  # the root's own MoE: named after its router
    rows = _sorted_rows(gm, routing, ids, stacked) if stacked and ids is not None else ("", "")
    return MoELayer(name, node.name, keys, topk.name, k, experts, lanes, stacked, counts,
                    ids.name if ids is not None else "", *rows), ""


def _common_owner(keys: tuple[str, ...]) -> str:
    """The innermost module holding every key (``model.layers.0.mlp``), or '' (the root)."""
    paths = [k.split(".")[:-1] for k in keys]
    common = []
    for parts in zip(*paths):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common)


def _router(gm: fx.GraphModule, topk: fx.Node) -> tuple[Optional[tuple], str]:
    """(router output node, its weight/bias keys, the expert count), or None and why."""
    node = topk.args[0]
    while isinstance(node, fx.Node) and _is_call(node, PASS_THROUGH):
        if len(_readers(node)) != 1:
            return None, f"the router's logits are read elsewhere too ({node.name!r} has {len(_readers(node))} users)"
        node = node.args[0]
    if not isinstance(node, fx.Node):
        return None, f"the input of top-k {topk.name!r} is not a tensor"
    keys = _linear_keys(gm, node)
    if keys is None:
        return None, f"the top-k {topk.name!r} does not read a router linear layer (it reads {node.name!r})"
    if len(_readers(node)) != 1:
        return None, f"the router's logits {node.name!r} are read elsewhere too (a graph output, an aux loss)"
    return (node, keys, int(_attr(gm, keys[0]).shape[0])), ""


def _readers(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` but export's metadata checks (they read a dtype, not the values)."""
    return [u for u in node.users if u.target is not aten._assert_tensor_metadata.default]


def _linear_keys(gm: fx.GraphModule, node: fx.Node) -> Optional[tuple[str, ...]]:
    if node.op == "call_module" and type(gm.get_submodule(str(node.target))) is torch.nn.Linear:
        module = gm.get_submodule(str(node.target))
        return tuple(f"{node.target}.{n}" for n in ("weight", "bias") if getattr(module, n) is not None)
    if _is_call(node, LINEARS):
        params = [a for a in list(node.args[1:3]) + [node.kwargs.get("bias")] if isinstance(a, fx.Node)]
        if params and all(p.op == "get_attr" for p in params):
            return tuple(str(p.target) for p in params)
    return None


def _topk_k(topk: fx.Node) -> Optional[int]:
    k = topk.args[1] if len(topk.args) > 1 else topk.kwargs.get("k")
    dim = topk.args[2] if len(topk.args) > 2 else topk.kwargs.get("dim", -1)
    rank = len(getattr(topk.args[0].meta.get("val", topk.args[0].meta.get("tensor_meta")), "shape", ())) or None
    last = dim == -1 or (rank is not None and dim == rank - 1)
    return k if isinstance(k, int) and last else None


def _router_name(gm: fx.GraphModule, topk: fx.Node) -> str:
    stack = topk.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.values()), ("",))[0] if stack else ""
    return _module_path(path) or topk.name


# --- the literal expert counts -----------------------------------------------------------------------
def _count_places(node: fx.Node) -> list[tuple[Any, int]]:
    """``[(where, shift)]``: the literal at ``where`` (an args index or kwargs key) is the expert count
    plus ``shift``."""
    if node.target in (F.one_hot, aten.one_hot.default, torch._C._nn.one_hot):
        return [(1 if len(node.args) > 1 else "num_classes", 0)]
    if node.target in (aten.histc.default, torch.histc, "histc"):
        return [(1, 0), (3, -1)]  # bins = E, max = E - 1
    if node.target in (aten.bincount.default, torch.bincount, "bincount"):
        return [(2 if len(node.args) > 2 else "minlength", 0)]
    return []


def _literal(node: fx.Node, where: Any) -> Any:
    if isinstance(where, int):
        return node.args[where] if where < len(node.args) else None
    return node.kwargs.get(where)


def _count_nodes(routing: set[fx.Node], experts: int) -> tuple[tuple[str, ...], str]:
    """The routing nodes holding the expert count (ops with a rule), or why the layer is refused."""
    out = []
    for node in sorted(routing, key=lambda n: n.name):
        places = _count_places(node)
        if places and all(_literal(node, w) == experts + shift for w, shift in places):
            out.append(node.name)
        elif experts in _ints(node.args, node.kwargs) and node.op != "get_attr" and not places \
                and not _is_call(node, TOPK):
            return (), (f"the routing node {node.name!r} ({node.target}) holds the expert count {experts} "
                        f"as a literal the pass has no rule to rewrite")
    return tuple(out), ""


def _ints(*values: Any) -> list[int]:
    out: list[int] = []
    for v in values:
        if isinstance(v, bool):
            continue
        if isinstance(v, int):
            out.append(v)
        elif isinstance(v, (tuple, list)):
            out.extend(_ints(*v))
        elif isinstance(v, dict):
            out.extend(_ints(*v.values()))
    return out


# --- lanes ----------------------------------------------------------------------------------------------
def _dominated(graph: fx.Graph, seeds: set[fx.Node], checks: set[fx.Node]) -> set[fx.Node]:
    """``seeds`` and every node read only by them (what dead-code elimination takes with them)."""
    lane = set(seeds)
    for node in reversed(graph.nodes):
        readers = [u for u in node.users if u not in checks]
        if node.op not in ("placeholder", "output") and readers and node not in lane \
                and all(u in lane for u in readers):
            lane.add(node)
    return lane


def _accumulation(node: fx.Node) -> Optional[tuple[fx.Node, list[fx.Node]]]:
    """(accumulator, the contribution's nodes) of an add or index_add, or None."""
    if not _is_call(node, ACCUMULATES):
        return None
    if node.target in ADDS:
        return None if len(node.args) != 2 else (node.args[0], [node.args[1]])  # resolved in _lane_of
    acc, *rest = [a for a in node.args if isinstance(a, fx.Node)]
    return acc, rest


def _lanes(gm: fx.GraphModule, topk: fx.Node, routing: set, ancestors: dict, reads: dict,
           experts: int) -> tuple[tuple[Lane, ...], str]:
    lanes: dict[int, list[Lane]] = {}
    indexing = {n for n in routing if _index_literals(n) and not _is_tuple(n.args[0])}  # mask[e], ids == e
    if not indexing:
        return (), ""
    checks = _checks(gm.graph)
    for node in gm.graph.nodes:
        if not ancestors[node].isdisjoint(indexing) and node not in routing and node not in checks:
            lane = _lane_of(gm, node, routing, checks)
            if lane is not None:
                lanes.setdefault(lane.index, []).append(lane)
    if not lanes:
        return (), ""
    if sorted(lanes) != list(range(experts)) or any(len(v) != 1 for v in lanes.values()):
        got = {i: len(v) for i, v in sorted(lanes.items())}
        return (), (f"the per-expert contributions do not cover the {experts} experts once each "
                    f"(contributions per expert index: {got})")
    return tuple(lanes[i][0] for i in range(experts)), ""


def _lane_of(gm: fx.GraphModule, node: fx.Node, routing: set, checks: set) -> Optional[Lane]:
    acc = _accumulation(node)
    if acc is None:
        return None
    options = [(acc[0], acc[1])]
    if node.target in ADDS:
        a, b = node.args
        options = [(a, [b]), (b, [a])]
    found = [lane for lane in (_one_lane(gm, node, a, seeds, routing, checks) for a, seeds in options) if lane is not None]
    if len(found) == 2:  # out = prev + contribution: the accumulator is the previous add
        found = [lane for lane in found if not _is_call(next(n for n in gm.graph.nodes
                                                             if n.name == lane.contribution), ADDS)]
    return found[0] if len(found) == 1 else None


def _one_lane(gm: fx.GraphModule, terminal: fx.Node, acc: Any, seeds: list, routing: set,
              checks: set) -> Optional[Lane]:
    if not isinstance(acc, fx.Node) or not all(isinstance(s, fx.Node) for s in seeds):
        return None
    lane = _dominated(gm.graph, set(seeds), checks)
    literals = [(n, where, i) for n in lane if n not in checks for where, i in _index_literals(n)
                if any(a in routing and a not in lane for a in n.all_input_nodes)]
    if len({(n, where) for n, where, _ in literals}) != 1:
        return None
    tensors = _lane_tensors(gm, lane)
    if not tensors:
        return None
    seed = seeds[-1] if terminal.target not in ADDS else seeds[0]
    node, where, index = literals[0]
    return Lane(index, terminal.name, acc.name, seed.name, node.name, where, tensors)


def _index_literals(node: fx.Node) -> list[tuple[Any, int]]:
    """``[(args position or kwargs key, int)]``: the int literals ``node`` could index experts with."""
    if node.target in (aten.select.int, torch.select, "select"):  # select(x, dim, index)
        return [(2, node.args[2])] if len(node.args) > 2 and isinstance(node.args[2], int) else []
    if node.target in INDEXING:  # x[e], x[:, e], ids == e
        return [(i, v) for i, a in enumerate(node.args) for v in _ints(a)]
    return []  # any other op's ints are dims or sizes


def _is_tuple(value: Any) -> bool:
    """Whether ``value`` is a node with several outputs (``topk``, ``sort``, ``where``): ``x[i]`` picks one."""
    if not isinstance(value, fx.Node):
        return False
    traced = value.meta.get("val", value.meta.get("tensor_meta"))
    return isinstance(traced, (tuple, list)) or _is_call(value, TOPK | SORTS)


def _checks(graph: fx.Graph) -> set[fx.Node]:
    """Nodes read only by export's runtime assertions (and the assertions): they never count as readers."""
    out: set[fx.Node] = set()
    for node in reversed(graph.nodes):
        if node.target in ASSERTS or (node.users and all(u in out for u in node.users)):
            out.add(node)
    return out


def _lane_tensors(gm: fx.GraphModule, lane: set[fx.Node]) -> tuple[str, ...]:
    keys = []
    for node in lane:
        if node.op == "call_module":
            keys += [f"{node.target}.{k}" for k, _ in gm.get_submodule(str(node.target)).named_parameters()]
        elif node.op == "get_attr" and isinstance(_attr(gm, str(node.target)), torch.nn.Parameter):
            keys.append(str(node.target))
    return tuple(sorted(keys))


# --- stacked -------------------------------------------------------------------------------------------
def _stacked(gm: fx.GraphModule, routing: set, experts: int, router: tuple[str, ...]) -> tuple[str, ...]:
    out = []
    for node in gm.graph.nodes:
        if node.op != "get_attr" or str(node.target) in router:
            continue
        value = _attr(gm, str(node.target))
        if isinstance(value, torch.nn.Parameter) and value.dim() >= 2 and value.shape[0] == experts \
                and _read_with(node, routing):
            out.append(str(node.target))
    return tuple(out)


def _sorted_rows(gm: fx.GraphModule, routing: set, ids: fx.Node, stacked: tuple[str, ...]) -> tuple[str, str]:
    """(sorted expert ids, the gate-weighted expert outputs in that order), or ('', '') when the graph
    does not sort tokens by expert (``sort(ids.flatten())`` values, then a product of a routing weight
    and a tensor computed from the stacked parameters)."""
    sort = next((n for n in gm.graph.nodes if n in routing and _is_call(n, SORTS) and ids in _upstream(n, routing)),
                None)
    values = next((u for u in sort.users if u.target is operator.getitem and u.args[1] == 0), None) if sort else None
    if values is None:
        return "", ""
    params = {n for n in gm.graph.nodes if n.op == "get_attr" and str(n.target) in stacked}
    for node in gm.graph.nodes:
        if node in routing or not _is_call(node, MULS) or len(node.all_input_nodes) != 2:
            continue
        a, b = node.all_input_nodes
        for weight, output in ((a, b), (b, a)):
            if weight in routing and params & _upstream(output, None):
                return values.name, node.name
    return "", ""


def _upstream(node: fx.Node, within: Optional[set]) -> set[fx.Node]:
    """``node``'s ancestors (only through ``within`` when given)."""
    seen, frontier = set(), [node]
    while frontier:
        for parent in frontier.pop().all_input_nodes:
            if parent not in seen and (within is None or parent in within or parent.op == "get_attr"):
                seen.add(parent)
                frontier.append(parent)
    return seen


def _read_with(node: fx.Node, routing: set) -> bool:
    """Whether ``node`` (seen through views and casts) is read by an op that also reads the routing."""
    frontier = [node]
    while frontier:
        current = frontier.pop()
        for user in current.users:
            if any(a in routing for a in user.all_input_nodes if a is not current):
                return True
            if _is_call(user, PARAM_VIEWS):
                frontier.append(user)
    return False


# --- removing ------------------------------------------------------------------------------------------
def mask_experts(logits: torch.Tensor, removed: tuple[int, ...]) -> torch.Tensor:
    """``logits`` with the removed experts' entries at ``-inf`` (the reference's router)."""
    index = torch.tensor(list(removed), dtype=torch.long, device=logits.device)
    return logits.index_fill(-1, index, float("-inf"))


def routed_reference(gm: fx.GraphModule, found: Experts, removed: Mapping[str, Sequence[int]]) -> fx.GraphModule:
    """Verify's reference: ``gm`` whose routers never pick a removed expert, sharing ``gm``'s tensors."""
    graph = copy.deepcopy(gm.graph)
    nodes = {n.name: n for n in graph.nodes}
    for layer in found.layers:
        if not removed.get(layer.name):
            continue
        router = nodes[layer.router]
        with graph.inserting_after(router):
            masked = graph.call_function(mask_experts, (router, tuple(removed[layer.name])))
        router.replace_all_uses_with(masked, delete_user_cb=lambda user: user is not masked)
    graph.lint()
    return build_graph_module(gm, graph, reference_items(gm, graph, {}))


def drop_experts(gm: fx.GraphModule, found: Experts, removed: Mapping[str, Sequence[int]]) -> fx.GraphModule:
    """A new GraphModule: ``gm`` without the ``removed`` experts ({layer name: indices}), new tensors."""
    removed = found.pick(removed)
    graph = copy.deepcopy(gm.graph)
    nodes = {n.name: n for n in graph.nodes}
    unused = {n.name for n in gm.graph.nodes if not n.users}
    sliced: dict[str, torch.Tensor] = {}
    modules: dict[str, torch.nn.Module] = {}
    for layer in found.layers:
        drop = removed.get(layer.name, ())
        if not drop:
            continue
        keep = [i for i in range(layer.num_experts) if i not in drop]
        _cut_lanes(graph, nodes, layer, drop, keep)
        _rewrite_counts(nodes, layer, len(keep))
        sliced.update(_sliced(gm, layer.router_tensors + layer.stacked, keep))
        router = nodes[layer.router]
        if router.op == "call_module":
            modules[str(router.target)] = _smaller_linear(gm.get_submodule(str(router.target)), keep)
    _remove_dead(graph, unused, [nodes[lane.terminal] for layer in found.layers for lane in layer.lanes
                                 if lane.index not in removed.get(layer.name, ())])
    graph.lint()
    items = reference_items(gm, graph, {})
    items = {k: modules.get(k, sliced.get(k, v)) for k, v in items.items()}
    fresh = {k for k in items if k in modules or k in sliced}
    return build_graph_module(gm, graph, {k: v if k in fresh else copy.deepcopy(v) for k, v in items.items()})


def _remove_dead(graph: fx.Graph, unused: set[str], kept: list[fx.Node]) -> None:
    """Erase every node neither the output nor a kept lane's accumulation reads (an in-place
    ``index_add_`` is read by nothing and still counts), except the never-read nodes that read nothing
    dead (asserts, export's guards)."""
    live = {graph.output_node(), *kept}
    for node in reversed(graph.nodes):
        if node in live:
            live.update(node.all_input_nodes)
    for node in graph.nodes:
        if node.name in unused and node not in live and set(node.all_input_nodes) <= live:
            live.add(node)
    for node in reversed(list(graph.nodes)):
        if node not in live and node.op != "placeholder":
            graph.erase_node(node)


def _cut_lanes(graph: fx.Graph, nodes: dict, layer: MoELayer, drop: Sequence[int], keep: list[int]) -> None:
    for lane in layer.lanes:
        if lane.index in drop:
            terminal = nodes[lane.terminal]
            terminal.replace_all_uses_with(nodes[lane.accumulator])
            graph.erase_node(terminal)
            nodes[lane.terminal] = nodes[lane.accumulator]
        else:
            node, new = nodes[lane.literal], keep.index(lane.index)
            if isinstance(lane.where, int):
                args = list(node.args)
                args[lane.where] = _replace_int(args[lane.where], lane.index, new)
                node.args = tuple(args)
            else:
                node.kwargs = {**node.kwargs, lane.where: _replace_int(node.kwargs[lane.where], lane.index, new)}


def _replace_int(value: Any, old: int, new: int) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return new if value == old else value
    if isinstance(value, (tuple, list)):
        return type(value)(_replace_int(v, old, new) for v in value)
    if isinstance(value, dict):
        return {k: _replace_int(v, old, new) for k, v in value.items()}
    return value


def _rewrite_counts(nodes: dict, layer: MoELayer, kept: int) -> None:
    for name in layer.counts:
        node = nodes[name]
        args, kwargs = list(node.args), dict(node.kwargs)
        for where, shift in _count_places(node):
            if isinstance(where, int):
                args[where] = kept + shift
            else:
                kwargs[where] = kept + shift
        node.args, node.kwargs = tuple(args), kwargs


def _sliced(gm: fx.GraphModule, keys: Sequence[str], keep: list[int]) -> dict[str, torch.Tensor]:
    out = {}
    for key in keys:
        value = _attr(gm, key)
        new = value.detach().index_select(0, torch.tensor(keep, device=value.device)).clone()
        out[key] = torch.nn.Parameter(new, value.requires_grad) if isinstance(value, torch.nn.Parameter) else new
    return out


def _smaller_linear(module: torch.nn.Linear, keep: list[int]) -> torch.nn.Linear:
    new = copy.deepcopy(module)
    index = torch.tensor(keep, device=module.weight.device)
    new.weight = torch.nn.Parameter(module.weight.detach().index_select(0, index).clone(), module.weight.requires_grad)
    if module.bias is not None:
        new.bias = torch.nn.Parameter(module.bias.detach().index_select(0, index).clone(), module.bias.requires_grad)
    new.out_features = len(keep)
    return new


__all__ = ["Lane", "MoELayer", "Experts", "find_experts", "check_removal", "mask_experts", "routed_reference",
           "drop_experts"]
