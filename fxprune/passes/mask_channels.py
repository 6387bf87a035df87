"""``mask-channels``: soft pruning — the channels a prune would drop are masked in the graph, not cut.

The functional counterpart of torch.ao's ``FakeStructuredSparsity``, without parametrizations, hooks or
hidden state: the masks are **explicit nodes** — ``mul(x, self.fxprune_mask_0)`` — in the generated
code, each mask a registered buffer named ``fxprune_mask_<i>``, and the plan they implement is recorded
on the result as ``gm.meta["fxprune_plan"]`` (its JSON text) for :mod:`~fxprune.passes.materialize`.

**Where masks go.** A dropped channel stops mattering once nothing *contracts* over it, and the
analysis already lists every contraction (see :mod:`fxprune.verify`): parameter consumers (a conv's or
linear's input columns, ``analysis.param_sinks``) and activation contractions (``q @ k``, a sum,
``analysis.act_sinks``). Verify's reference zeroes the consumers' weight columns; this pass masks
instead, so training can go on around the dropped channels without ever writing them back:

- an activation contraction: its input is multiplied by the mask along the contracted dim;
- a parameter read by a ``get_attr`` node (every parameter at the export level): the weight is
  multiplied by the mask along the consumed dim, right after the ``get_attr``;
- a parameter of a ``call_module`` layer: the layer's input that carries those channels (found by
  channel identity, not by position) is multiplied by the mask. A layer that contracts channels no
  input carries (an LSTM's recurrent columns at the fx level) is refused with an error naming it.

Dropped channels are still computed; whatever values they carry never reach an output, because every
reader masks them. The masked model therefore equals the pruned one to float tolerance where no norm's statistics span a
dropped channel; a LayerNorm-family norm still normalises over every channel here (masking keeps the
original graph), so it differs from the pruned model as the unmasked original does — verify's
reference, which recomputes those statistics over the kept channels, is the exact one. The gradients of
dropped channels' consumer weights are zero. The parameters themselves are never written.

**Masking again.** Run on a graph that is already masked (gradual pruning: the sparsity grows with a
:mod:`fxprune.passes.schedule`), the pass strips the old masks and selects anew, ranking the channels the old
plan dropped below every other, so a growing sparsity only ever adds channels to the mask. The pass
returns new tensors: rebuild the optimizer after each masking step.

>>> masked = MaskChannels(sparsity=0.5)(gm).graph_module                         # doctest: +SKIP
>>> print(masked.code)                                                             # doctest: +SKIP
    ... mul = torch.mul(layer1_0_relu, fxprune_mask_0) ...
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.fx as fx

from fxprune.core.channels import Dropped
from fxprune.core.analysis import Analysis
from fxprune.core.capture import graph_level
from fxprune.errors import InvalidOptionError, UnsafeFileError, UnsupportedModelError
from fxprune.core.meta import PLAN_KEY
from fxprune.core.graph import MaskSite, copy_graph_module, insert_masks, is_mask
from fxprune.passes.pipeline import placeholder_zeros, refresh_values, register
from fxprune.core.plan import Plan
from fxprune.core.rewrite import Pruning
from fxprune.core.verify import act_mask_sites
from fxprune.passes.selection import selection_options
from fxprune.stages import analyze, choose, drop_from_plan, make_plan

# --- where the masks go -------------------------------------------------------------------------
def mask_sites(analysis: Analysis, drop: Dropped) -> list[MaskSite]:
    """Every reader of a dropped channel: parameter consumers, then activation contractions."""
    pruning = Pruning(analysis, drop)
    sites = list(_param_sites(analysis, pruning)) + list(act_mask_sites(analysis, pruning))
    unique = {(s.node, s.arg, s.dim): s for s in sites}
    return list(unique.values())


def _param_sites(analysis: Analysis, pruning: Pruning) -> Iterator[MaskSite]:
    graph = analysis.gm.graph
    attrs = {str(n.target): n for n in graph.find_nodes(op="get_attr")}
    layers = [n for n in graph.nodes if n.op == "call_module"]
    for key, dim in dict.fromkeys(analysis.param_sinks):
        keep = pruning.kept(analysis.params[key][dim])
        if keep is None or bool(keep.all()):
            continue
        if key in attrs:
            yield MaskSite(attrs[key].name, None, dim, keep)
        for node in _owners(layers, key):
            yield _input_site(analysis, node, key, dim, keep)


def _owners(layers: list[fx.Node], key: str) -> list[fx.Node]:
    """The call_module nodes of the innermost called module that holds ``key``."""
    holders = [n for n in layers if key.startswith(f"{n.target}.")]
    deepest = max((len(str(n.target)) for n in holders), default=0)
    return [n for n in holders if len(str(n.target)) == deepest]


def _input_site(analysis: Analysis, node: fx.Node, key: str, dim: int, keep: torch.Tensor) -> MaskSite:
    """The input of ``node`` that carries the channels ``key`` contracts over along ``dim``."""
    root = analysis.solution.root
    want = root[analysis.params[key][dim]]
    for index, arg in enumerate(node.args):
        ids = analysis.env.get(arg) if isinstance(arg, fx.Node) else None
        for d, a in enumerate(ids if isinstance(ids, tuple) else ()):
            if isinstance(a, torch.Tensor) and a.shape == want.shape and bool((a >= 0).all()) \
                    and torch.equal(root[a], want):
                return MaskSite(node.name, index, d, keep)
    raise UnsupportedModelError(
        f"mask-channels cannot mask the channels {key!r} (dim {dim}) contracts over: no input of "
        f"module {node.target!r} ({node.name}) carries them (they are internal to the module); "
        f"capture at the export level, where the weight itself is masked, or use prune-channels")


# --- inserting and stripping masks --------------------------------------------------------------
def strip_masks(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule without the mask nodes and buffers, sharing ``gm``'s other tensors."""
    graph = copy.deepcopy(gm.graph)
    for node in [n for n in graph.nodes if is_mask(n)]:
        mask = node.args[1]
        node.replace_all_uses_with(node.args[0])
        graph.erase_node(node)
        if not mask.users:
            graph.erase_node(mask)
    out = copy_graph_module(gm, graph)  # keeps gm.meta (a prepared graph's quantization state)...
    out.meta.pop(PLAN_KEY, None)  # ...but not the plan of the masks it no longer has
    return out


def has_masks(gm: fx.GraphModule) -> bool:
    return any(is_mask(n) for n in gm.graph.nodes)


def masked_plan(gm: fx.GraphModule) -> Optional[Plan]:
    """The plan :class:`MaskChannels` recorded on ``gm`` (None when there is none)."""
    text = getattr(gm, "meta", {}).get(PLAN_KEY)
    return None if text is None else Plan.from_json(text)


# --- the pass -----------------------------------------------------------------------------------
@register
@dataclass(frozen=True)
class MaskChannels(selection_options("MaskChannelsOptions", exclude=("prune_outputs", "propagate_bias"))):
    """Mask the channels :class:`~fxprune.passes.PruneChannels` would drop (or a plan names)."""

    name = "mask-channels"

    plan_json: str = ""
    """A saved plan to mask exactly (instead of selecting); the selection options must stay default."""

    def validate(self) -> None:
        super().validate()
        if self.plan_json:
            self._check_plan_only()

    def _check_plan_only(self) -> None:
        try:
            Plan.from_json(self.plan_json)
        except UnsafeFileError as exc:
            raise InvalidOptionError(f"plan_json is not a plan: {exc}") from exc
        chosen = [k for k in self.options() if k != "plan_json"]
        if chosen:
            raise InvalidOptionError(f"mask-channels takes a plan_json or selection options, not both; "
                                     f"got plan_json and {chosen}")

    @classmethod
    def of(cls, plan: Plan) -> "MaskChannels":
        """The pass masking exactly what ``plan`` drops."""
        return cls(plan_json=plan.to_json(indent=None))

    def apply(self, gm: fx.GraphModule) -> fx.GraphModule:
        level = graph_level(gm)
        base = strip_masks(gm)
        analysis = analyze(base, placeholder_zeros(gm), self.prune_options(level).replace(split_axis=self._split_axis()))
        drop, plan = self._select(analysis, masked_plan(gm))
        out = insert_masks(copy.deepcopy(analysis.gm), mask_sites(analysis, drop), level)
        out.meta[PLAN_KEY] = plan.to_json(indent=None)
        return refresh_values(out)

    def _split_axis(self) -> str:
        if self.plan_json:
            return Plan.from_json(self.plan_json).options.split_axis
        return self.split_axis

    def _select(self, analysis: Analysis, prior: Optional[Plan]) -> tuple[torch.Tensor, Plan]:
        if self.plan_json:
            plan = Plan.from_json(self.plan_json)
            drop = drop_from_plan(analysis, plan)
            return drop, make_plan(analysis, drop, plan.options)
        scores = self.scores(analysis)
        if prior is not None:
            scores = _rank_below(analysis, scores, drop_from_plan(analysis, prior))
        return choose(analysis, scores, self.prune_options(analysis.level))


def _rank_below(analysis: Analysis, scores: dict[str, torch.Tensor], was: torch.Tensor) -> dict[str, Any]:
    """Scores where the units ``was`` dropped rank below every other, each set keeping its order
    (all positive, so a global ranking's per-group normalisation still means something)."""
    out = dict(scores)
    for group in analysis.groups:
        if group.name not in scores:
            continue
        s, hit = scores[group.name], was[torch.tensor(group.units, dtype=torch.long)]
        if not bool(hit.any()):
            continue
        span = float(s.max() - s.min()) + 1.0
        out[group.name] = torch.where(hit, (s - s.min()) / span, s - s.min() + 1.0)
    return out
