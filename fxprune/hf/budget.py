"""One budget instead of ratios: ``fxprune.hf.prune(model, inputs, target={kind: f})``.

fxprune chooses how many whole layers, how many routed experts (MoE models) and how much of the MLP
width to remove so that the model keeps the fraction ``f`` of a figure, by trying a few mixes and keeping
the one with the lowest next-token loss on the calibration data; where the run fits weights to the data
(``block_repair``, ``recover=``), on calibration sequences the mixes were not fitted on (:data:`HELD_OUT`),
the chosen mix then pruned again on all of the data. The figures (:data:`BUDGETS`):

- ``"params"``: the parameters (tied ones once). On an MoE model the mixes remove experts too.
- ``"active_params"`` (MoE only: a dense model's are all its parameters, refused by name): the
  parameters one token uses; embeddings, attention, norms, routers and shared experts count whole, the
  routed experts of a layer ``top_k / experts`` of theirs. Removing experts barely moves this figure
  (a token still runs ``top_k`` of them; only the router's rows go), so the search meets it with depth
  and width alone.
- ``"macs"``: multiply-accumulates of one forward pass at the example inputs' shape, counted by
  :func:`fxprune.measure.count_macs_by_module` (``torch.utils.flop_counter.FlopCounterMode``, MACs =
  FLOPs / 2: matmuls, attention and the MoE experts' grouped matmuls; element-wise ops count zero).
  Experts leave out of the mix as for ``active_params``: each token is multiplied by ``top_k`` experts.

Each mix splits what is to be removed into shares: :data:`DEPTH_SHARES` of it (none, half, all) by
whole layers, :data:`EXPERT_SHARES` by experts (figures that count them), the rest by the MLP width
(``moe_intermediate_size`` where the family has it, else ``intermediate_size``; the same share of every
other MLP width the figure counts: Qwen2-MoE's ``shared_expert_intermediate_size``). The figure of every
variant is computed from the model, not from a formula: its class is built from the changed config (on
the ``meta`` device for parameters, with zero weights and run on the example for MACs) and counted, as
``fixed + layers × per layer``; a figure is linear in the width kept, so the width that meets the budget
is solved from two such counts (stacked experts: the width kept is a multiple of 16 bytes' worth of
units, which transformers 5's grouped matmul needs). Layer and expert counts are rounded to the nearest
(down, where that removes more than :data:`OVERSHOOT` too much), and the width makes up the rest; where
the width cannot (more than :data:`MAX_WIDTH` of it), more experts, then more layers, are removed. Every
mix keeps one layer and ``num_experts_per_tok`` experts at least. A mix that removes layers removes them
as ``sparsity={"num_hidden_layers": r}`` would, with the call's ``block_criterion`` and ``block_repair``:
asked for, the repair is fitted in every such mix before its loss is measured (a layer option no mix can
use, like ``block_repair`` where every mix keeps every layer, is refused). The achieved fraction (measured
on the pruned model), the counting used, the sequences the loss was measured on and every mix tried (with
its widths, its repairs, its predicted and achieved fraction and its held-out loss) are recorded in
``config.fxprune["budget"]``. A budget no mix reaches is an ``InvalidOptionError`` naming the closest
fraction reachable.

>>> smaller = fxprune.hf.prune(model, (ids,), target={"params": 0.8}, calibration=batches)  # doctest: +SKIP
>>> smaller.config.fxprune["budget"]["achieved"]                                          # doctest: +SKIP
0.801
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch

from fxprune.data.calibration import Calibration, as_calibration
from fxprune.errors import InvalidOptionError, UnsupportedModelError
from fxprune.hf.calibrated import causal_lm_loss
from fxprune.hf.depth import layer_list
from fxprune.hf.experts import kernel_alignment, moe_blocks
from fxprune.measure import count_macs_by_module, count_params
from fxprune.options import BUDGETS, PruneOptions, keyed_by

#: The share of what is to be removed that whole layers take, per mix tried (the rest: experts, width).
#: Quarters (0, 1/4, ..., 1) tried no other mix on the 4-layer MoE of ``benchmarks/bench_depth.py --moe``
#: (its ``grid`` note), and add two prunings per budget on a deep model: not the default.
DEPTH_SHARES = (0.0, 0.5, 1.0)
#: The share that whole experts take (MoE models, a figure that counts them), beside the depth's.
EXPERT_SHARES = (0.0, 0.5, 1.0)
#: The largest fraction of the MLP width a mix removes.
MAX_WIDTH = 0.9
#: How far below the target a mix may land when its whole layers or experts, rounded to the nearest,
#: remove more than asked (with no width left to remove).
OVERSHOOT = 0.02
WIDTH_FIELDS = ("moe_intermediate_size", "intermediate_size")  # the MoE experts' width first
#: The MLP widths that shrink by the width's share beside it, where the config has them and they move the
#: figure: a shared expert (Qwen2-MoE) is as much MLP width as the routed ones; ``intermediate_size`` on an
#: MoE model counts only where some layers are dense (``mlp_only_layers``), else no module has it.
TIED_FIELDS = ("shared_expert_intermediate_size", "intermediate_size")


@dataclass(frozen=True)
class Figure:
    """A model's budgeted figure as ``fixed + layers × per_layer`` (layers: the model's average)."""

    fixed: float
    per_layer: float

    def at(self, layers: int) -> float:
        """The figure with ``layers`` layers.

        >>> Figure(10.0, 2.0).at(3)
        16.0
        """
        return self.fixed + layers * self.per_layer


def _params(model: Any, inputs: tuple) -> Figure:
    path, count = layer_list(model)
    layers = count_params(model.get_submodule(path))
    return Figure(count_params(model) - layers, layers / count)


def _active_params(model: Any, inputs: tuple) -> Figure:
    blocks = moe_blocks(model)
    if not blocks:
        raise InvalidOptionError(f"target 'active_params': {type(model).__name__} has no routed experts, so every "
                                 f"parameter is active; budget its 'params' instead")
    idle = sum(_idle_experts(block) for block in blocks.values())
    whole = _params(model, inputs)
    return Figure(whole.fixed, whole.per_layer - idle / layer_list(model)[1])


def _idle_experts(block: Any) -> float:
    """The routed expert parameters of a block that one token does not use: all but ``top_k`` of them."""
    experts, top_k = block.gate.weight.shape[0], block.gate.top_k
    return count_params(block.experts) * (experts - top_k) / experts


def _macs(model: Any, inputs: tuple) -> Figure:
    counts = count_macs_by_module(model, inputs, {"use_cache": False})
    path, count = layer_list(model)
    layers = sum(counts.get(f"{type(model).__name__}.{path}.{i}", 0) for i in range(count))
    return Figure(counts["Global"] - layers, layers / count)


@dataclass(frozen=True)
class Budget:
    """How one kind of budget is counted."""

    count: Callable[[Any, tuple], Figure]
    """``(model, example inputs) -> Figure``."""
    experts_move_it: bool
    """Whether removing experts moves the figure enough to be part of the mixes."""
    on_meta: bool
    """Counted from shapes alone (a variant is built on the ``meta`` device), else by running the variant."""
    note: str
    """How it is counted (recorded beside the achieved figure)."""


#: Each budget (named in :data:`fxprune.options.BUDGETS`).
BUDGET_RECORDS = keyed_by(BUDGETS, {
    "params": Budget(_params, True, True, "parameters, tied ones once"),
    "active_params": Budget(_active_params, False, True, "parameters a token uses: routed experts top_k/experts "
                                                         "of theirs, the rest whole"),
    "macs": Budget(_macs, False, False, "MACs = FlopCounterMode FLOPs / 2 at the example inputs' shape (matmuls, "
                                        "attention, grouped expert matmuls)"),
}, "budgets")


@dataclass
class Space:
    """What a model lets a budget remove, and the figure of each variant (cached: each is a model build)."""

    model: Any
    inputs: tuple
    kind: str
    layers: int
    width_field: str
    expert_field: Optional[str]
    experts: int
    """Routed experts per MoE layer (0: a dense model)."""
    top_k: int
    align: int
    """The MLP width kept is a multiple of this (stacked experts: transformers 5's grouped matmul needs rows
    of a multiple of 16 bytes, and fails on others)."""
    tied: tuple[str, ...] = ()
    """Other MLP width fields (:data:`TIED_FIELDS`) that keep the share ``width_field`` keeps."""
    _figures: dict = field(default_factory=dict, repr=False)

    @property
    def budget(self) -> Budget:
        return BUDGET_RECORDS[self.kind]

    @property
    def width(self) -> int:
        return getattr(self.model.config, self.width_field)

    @property
    def removable_experts(self) -> int:
        """The most experts a mix removes per layer (``top_k`` stay), 0 where experts are not in the mixes."""
        return self.experts - self.top_k if self.experts and self.budget.experts_move_it else 0

    def widths(self, kept: int) -> dict[str, int]:
        """Every MLP width field's units kept when ``width_field`` keeps ``kept``: the same share, rounded
        to :attr:`align` (the HF route rounds every width to it); whole where ``width_field`` is. On a
        Qwen2-MoE of ``moe_intermediate_size=48``, ``shared_expert_intermediate_size=40``:

        >>> space.widths(24)                                                          # doctest: +SKIP
        {'moe_intermediate_size': 24, 'shared_expert_intermediate_size': 20}
        """
        return {self.width_field: kept, **{name: self._tied_units(getattr(self.model.config, name), kept)
                                           for name in self.tied}}

    def _tied_units(self, size: int, kept: int) -> int:
        if kept == self.width:
            return size
        return max(self.align, round(size * kept / self.width / self.align) * self.align)

    def ratios(self, kept: int) -> dict[str, float]:
        """:meth:`widths` as the ratios removed, the ``sparsity`` of :func:`fxprune.hf.prune`."""
        return {name: (getattr(self.model.config, name) - units) / getattr(self.model.config, name)
                for name, units in self.widths(kept).items()}

    def figure(self, experts: int, width: int) -> Figure:
        """The figure of the model with ``experts`` per layer and ``width`` MLP units."""
        key = (experts, width)
        if key not in self._figures:
            self._figures[key] = self.budget.count(self._variant(experts, self.widths(width)), self.inputs)
        return self._figures[key]

    def _variant(self, experts: int, widths: dict[str, int]) -> Any:
        changes = {**widths, **({self.expert_field: experts} if self.expert_field else {})}
        return variant(self.model, changes, self.budget.on_meta)


def variant(model: Any, changes: dict[str, int], on_meta: bool) -> Any:
    """A model of ``model``'s class built from its config with ``changes``: on the ``meta`` device (no
    memory), or with zero weights (runs; routers with equal logits still pick ``top_k`` experts a token)."""
    from transformers.initialization import no_init_weights
    config = copy.deepcopy(model.config)
    for name, value in changes.items():
        setattr(config, name, value)
    if on_meta:
        with torch.device("meta"):
            return type(model)._from_config(config, dtype=model.dtype)
    with no_init_weights():
        new = type(model)._from_config(config, dtype=model.dtype)
    with torch.no_grad():
        for parameter in new.parameters():
            parameter.zero_()
    return new.to(model.device).eval()


def space_of(model: Any, inputs: tuple, kind: str) -> Space:
    """The :class:`Space` of ``model`` for a budget of ``kind`` (its width and expert fields)."""
    width_field = next((f for f in WIDTH_FIELDS if isinstance(getattr(model.config, f, None), int)), None)
    if width_field is None:
        raise UnsupportedModelError(f"{type(model).__name__}'s config has no {' / '.join(WIDTH_FIELDS)}: a budget "
                                    f"mixes layers with MLP width")
    blocks = moe_blocks(model)
    expert_field = _expert_field(model.config) if blocks else None
    first = next(iter(blocks.values()), None)
    experts = first.gate.weight.shape[0] if first is not None else 0
    top_k = first.gate.top_k if first is not None else 0
    space = Space(model, inputs, kind, layer_list(model)[1], width_field, expert_field, experts, top_k,
                  kernel_alignment(model))
    full = space.figure(experts, space.width)  # a kind the model cannot have is refused here, before any pruning
    space.tied = tuple(name for name in TIED_FIELDS if name != width_field and _moves(space, name, full))
    space._figures.clear()  # counted before the tied widths were known
    return space


def _moves(space: Space, name: str, full: Figure) -> bool:
    """Whether halving the config's ``name`` changes the figure (a field no module reads does not)."""
    size = getattr(space.model.config, name, None)
    if not isinstance(size, int) or size < 2 * space.align:
        return False
    halved = variant(space.model, {name: size // 2, space.width_field: space.width}, space.budget.on_meta)
    return space.budget.count(halved, space.inputs) != full


def _expert_field(config: Any) -> str:
    saved = config.to_dict()
    return next(f for f in ("num_experts", "num_local_experts") if isinstance(saved.get(f), int))


# --- the mixes ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mix:
    """One way to meet the budget: ``layers`` removed, ``experts`` removed per MoE layer, then ``width``
    (a ratio) of the MLP width."""

    depth_share: float
    expert_share: float
    layers: int
    experts: int
    width: float
    predicted: float
    """The fraction of the figure this mix is computed to keep."""

    def sparsity(self, space: Space) -> dict[str, float]:
        """The ``sparsity`` of :func:`fxprune.hf.prune` that removes this mix."""
        out = {"num_hidden_layers": self.layers / space.layers} if self.layers else {}
        if self.experts:
            out[space.expert_field] = self.experts / space.experts
        return {**out, **self.widths(space)} if self.width > 0 else out

    def widths(self, space: Space) -> dict[str, float]:
        """The ratio of every MLP width field this mix removes (``width`` of ``width_field``, the same
        share of the tied ones)."""
        return space.ratios(round((1 - self.width) * space.width))


def check_target(target: Any) -> tuple[str, float]:
    """``(kind, fraction kept)`` of a budget (checked as the ``target`` option is: :class:`PruneOptions`)."""
    ((kind, fraction),) = PruneOptions(target=target).target.items()
    return kind, float(fraction)


def mixes(model: Any, fraction: float, kind: str = "params", inputs: Optional[tuple] = None) -> list[Mix]:
    """The feasible mixes for keeping ``fraction`` of the ``kind`` figure (``inputs``: the example, needed
    for MACs); an ``InvalidOptionError`` naming the closest reachable fraction if there is none.

    >>> [(m.layers, m.width) for m in mixes(llama, 0.8)]                              # doctest: +SKIP
    [(0, 0.359375), (1, 0.0)]
    """
    return mixes_in(space_of(model, inputs or (), kind), fraction)


def mixes_in(space: Space, fraction: float, depth_shares: tuple[float, ...] = DEPTH_SHARES) -> list[Mix]:
    """:func:`mixes` of a :class:`Space` (``depth_shares``: the grid, :data:`DEPTH_SHARES` by default)."""
    found = {}
    for depth, experts in _shares(space, depth_shares):
        mix = _solve(space, fraction, depth, experts)
        if mix is not None:
            found.setdefault((mix.layers, mix.experts, mix.width), mix)  # the same mix from two shares: once
    if not found:
        raise InvalidOptionError(_unreachable(space, fraction))
    return list(found.values())


def _shares(space: Space, depth_shares: tuple[float, ...]) -> Iterator[tuple[float, float]]:
    expert_shares = EXPERT_SHARES if space.removable_experts else (0.0,)
    for depth in depth_shares:
        yield from ((depth, experts) for experts in expert_shares if depth + experts <= 1)


def _solve(space: Space, fraction: float, depth_share: float, expert_share: float) -> Optional[Mix]:
    full = space.figure(space.experts, space.width)
    goal = fraction * full.at(space.layers)
    for layers, experts in _counts(space, full.at(space.layers) - goal, depth_share, expert_share):
        width = _width(space, space.layers - layers, space.experts - experts, goal)
        overshoot = width < 0 and fraction - kept_fraction(space, layers, experts, space.width) > OVERSHOOT
        if width <= MAX_WIDTH and not overshoot:
            return _mix(space, depth_share, expert_share, layers, experts, max(0.0, width), fraction)
    return None


def _counts(space: Space, remove: float, depth_share: float, expert_share: float) -> Iterator[tuple[int, int]]:
    """The layer and expert counts to try, in order: the shares' counts rounded to the nearest, then down,
    then (the width alone cannot make up the rest) every expert allowed, then one more layer at a time."""
    for rounding in (round, math.floor):
        layers = min(rounding(depth_share * remove / space.figure(space.experts, space.width).per_layer),
                     space.layers - 1)
        experts = min(rounding(expert_share * remove / _per_expert(space, space.layers - layers)),
                      space.removable_experts) if expert_share else 0
        yield layers, experts
    for more in range(layers, space.layers):
        yield more, space.removable_experts


def _per_expert(space: Space, layers: int) -> float:
    """What removing one expert from each of ``layers`` layers removes from the figure."""
    return space.figure(space.experts, space.width).at(layers) - \
        space.figure(space.experts - 1, space.width).at(layers)


def _width(space: Space, layers: int, experts: int, goal: float) -> float:
    """The MLP width ratio that brings a model of ``layers`` layers and ``experts`` experts to ``goal``: a
    figure is linear in the width kept, so two counts give it."""
    half = space.width // 2 // space.align * space.align
    whole, halved = space.figure(experts, space.width).at(layers), space.figure(experts, half).at(layers)
    per_unit = (whole - halved) / (space.width - half)
    return (whole - goal) / per_unit / space.width  # below 0: the layers and experts removed overshoot


def kept_fraction(space: Space, layers: int, experts: int, width: int) -> float:
    """The fraction of the figure a model with ``layers``, ``experts`` (per layer) and ``width`` removed keeps."""
    full = space.figure(space.experts, space.width).at(space.layers)
    return space.figure(space.experts - experts, width).at(space.layers - layers) / full


def _mix(space: Space, depth_share: float, expert_share: float, layers: int, experts: int,
         width: float, fraction: float) -> Optional[Mix]:
    units = (1 - width) * space.width / space.align
    # the aligned width on either side of the solved one, whichever lands nearer the budget (ties: the
    # smaller, which meets it): a step of alignment moves the tied widths too, more than rounding suggests
    either = sorted({min(space.width, max(1, step) * space.align) for step in (math.floor(units), math.ceil(units))})
    kept = min(either, key=lambda units_kept: abs(kept_fraction(space, layers, experts, units_kept) - fraction))
    if not (layers or experts or kept < space.width):
        return None  # removes nothing: the budget is closer to 1 than one step of width
    predicted = kept_fraction(space, layers, experts, kept)
    return Mix(depth_share, expert_share, layers, experts, (space.width - kept) / space.width, round(predicted, 4))


def _unreachable(space: Space, fraction: float) -> str:
    full = space.figure(space.experts, space.width).at(space.layers)
    least = max(space.align, math.ceil((1 - MAX_WIDTH) * space.width / space.align) * space.align)
    smallest = space.figure(space.experts - space.removable_experts, least).at(1) / full
    one_unit = space.figure(space.experts, space.width - space.align).at(space.layers) / full
    closest, side = (smallest, "smallest") if fraction < smallest else (one_unit, "largest pruned")
    parts = "depth, experts and width" if space.removable_experts else "depth and width"
    return (f"target {space.kind} {fraction} cannot be met: the {side} model a mix of {parts} reaches keeps "
            f"{closest:.3f} of the {space.kind}")


# --- the search ---------------------------------------------------------------------------------------
#: The share of the calibration sequences (the last ones, one at least) that ranks the mixes of a run that
#: fits weights to the data (``block_repair``, ``recover=``): each mix is fitted on the rest and scored on
#: these, then the chosen one is pruned again on all of the data. Scored on the sequences it was fitted on,
#: the depth repair's refitted writers made the all-depth mix look best (loss 3.29 against 3.54 for width
#: only on 4 sequences of SmolLM2), and it was 2.41x dense on held-out text against 1.96x for width only
#: (``bench_depth_v4.json``); held out, the losses rank the mixes as the evaluation does (v5). A run that
#: only ranks units by the data is scored on all of it: on the trained MoE of ``bench_depth.py --moe`` the
#: mixes' losses differ by 0.03, and ranked on 2 held-out sequences the budget at 0.8 chose a mix 1.04x dense
#: where the in-sample ranking on 8 chose one 1.00x.
HELD_OUT = 0.25
#: What each whole-structure option needs some mix to remove (the option is refused where none does).
REMOVES = {"layer count": "layers", "expert count": "experts"}


def prune_to_budget(model: Any, inputs: tuple, target: Any, calibration: Any, prune: Callable[[Any, Any], Any],
                    whole_options: Optional[dict[str, tuple[Any, str]]] = None,
                    fits_weights: bool = False) -> tuple[Any, dict[str, float]]:
    """Try every mix with ``prune(sparsity, calibration) -> HFPruneResult`` and keep the one with the lowest
    next-token loss: where the run fits weights to the data (``fits_weights``: a depth repair, recovery),
    each mix is fitted on all but the last :data:`HELD_OUT` of the calibration sequences and scored on
    those, and the chosen one is pruned again on all of them; else each is scored on all of them.
    ``whole_options``: ``{option: (value, "layer count" | "expert count")}`` the call set, refused where no
    mix removes what they act on. Returns the result and the sparsity it was pruned with."""
    kind, fraction = check_target(target)
    space = space_of(model, inputs, kind)
    found = mixes_in(space, fraction)
    _check_used(found, whole_options or {}, kind, fraction)
    split = split_calibration(calibration) if fits_weights else None
    if split is None:  # no weight fitted to the data, or too little data to hold any out
        fit, scored = calibration, [inputs] if calibration is None else calibration
    else:
        fit, scored = split.fit, split.held_out
    original = space.budget.count(model, inputs).at(space.layers)
    tried, best = [], None
    for mix in found:
        sparsity = mix.sparsity(space)
        result = prune(sparsity, fit)
        loss, achieved = next_token_loss(result.model, scored), _kept(space, result, original)
        tried.append({"layers": mix.layers, "experts": mix.experts,
                      "width": {name: round(ratio, 4) for name, ratio in mix.widths(space).items()},
                      "repairs": len(result.model.config.fxprune.get("depth", {}).get("repairs", [])),
                      "predicted": mix.predicted, "achieved": round(achieved, 4), "loss": loss})
        if best is None or loss < best[0]:
            best = (loss, result, sparsity, achieved)
    _, result, sparsity, achieved = best
    if split is not None:
        del best, result  # the chosen mix, fitted on part of the data: freed before it is fitted on all
        result = prune(sparsity, calibration)
        achieved = _kept(space, result, original)
    result.model.config.fxprune = {**result.model.config.fxprune, "budget": {
        "target": {kind: fraction}, "achieved": round(achieved, 4),
        "counted": space.budget.note, "scored": _scored_note(split, fits_weights), "tried": tried}}
    return result, sparsity


def _kept(space: Space, result: Any, original: float) -> float:
    return space.budget.count(result.model, space.inputs).at(result.model.config.num_hidden_layers) / original


def _check_used(found: list[Mix], whole_options: dict[str, tuple[Any, str]], kind: str, fraction: float) -> None:
    for name, (value, what) in whole_options.items():
        if not any(getattr(mix, REMOVES[what]) for mix in found):
            raise InvalidOptionError(f"fxprune.hf: {name}={value!r} has no effect: no mix that meets target "
                                     f"{kind} {fraction} removes {REMOVES[what]} (the mixes that meet it: "
                                     f"{[(m.layers, m.experts, round(m.width, 3)) for m in found]} as (layers, "
                                     f"experts, width))")


def _scored_note(split: Optional["Split"], fits_weights: bool) -> str:
    if split is None and fits_weights:
        return "the mixes' loss on the data they were fitted on (fewer than 2 calibration sequences)"
    if split is None:
        return "the mixes' loss on the calibration data (no weights fitted to it)"
    return (f"the mixes' loss on the last {split.held_out_rows} calibration sequences, each mix fitted on the "
            f"other {split.fit_rows}; the chosen mix pruned again on all {split.fit_rows + split.held_out_rows}")


@dataclass(frozen=True)
class Split:
    """Calibration data split by sequences: ``fit`` then ``held_out`` (each a :class:`Calibration` of
    ``input_ids`` / ``labels`` / ``attention_mask`` dict batches)."""

    fit: Calibration
    held_out: Calibration
    fit_rows: int
    held_out_rows: int


def split_calibration(calibration: Any, share: float = HELD_OUT) -> Optional[Split]:
    """The last ``share`` of the calibration sequences (one at least; a batch is cut between its rows
    where the boundary falls inside it) apart from the rest; None (with a warning) where there are fewer
    than two sequences, or no data.

    >>> split = split_calibration([torch.zeros(2, 8, dtype=torch.long)] * 4)
    >>> split.fit_rows, split.held_out_rows
    (6, 2)
    """
    if calibration is None:
        return None
    batches = [_as_dict(batch) for batch in as_calibration(calibration).read()]
    total = sum(len(batch["input_ids"]) for batch in batches)
    if total < 2:
        warnings.warn("target=: one calibration sequence, so the budget ranks its mixes on the data they were "
                      "fitted on (a depth repair fits it best); pass more sequences to rank them on held-out ones",
                      stacklevel=4)
        return None
    held = max(1, round(total * share))
    fit, held_out, left = [], [], total - held  # left: the sequences still to go to ``fit``
    for batch in batches:
        rows = len(batch["input_ids"])
        taken = min(rows, left)
        left -= taken
        fit += [_rows(batch, slice(0, taken))] if taken else []
        held_out += [_rows(batch, slice(taken, rows))] if taken < rows else []
    return Split(Calibration(fit), Calibration(held_out), total - held, held)


def _as_dict(batch: Any) -> dict[str, torch.Tensor]:
    """A calibration batch as the dict a default :class:`Calibration` reads the same way."""
    ids = batch.inputs[0]
    out = {"input_ids": ids, "labels": ids if batch.target is None else batch.target}
    return out if batch.mask is None else {**out, "attention_mask": batch.mask.long()}


def _rows(batch: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
    return {name: tensor[rows] for name, tensor in batch.items()}


def next_token_loss(model: Any, calibration: Any) -> float:
    """Next-token cross-entropy of a causal LM, averaged over every predicted real token of the
    calibration batches (padded positions and ``-100`` labels left out).

    >>> next_token_loss(model, [ids])                                                  # doctest: +SKIP
    3.29
    """
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in as_calibration(calibration).read():
            ids = batch.inputs[0]
            labels = ids if batch.target is None else batch.target
            labels = labels if batch.mask is None else labels.masked_fill(~batch.mask, -100)
            tokens = int((labels[:, 1:] != -100).sum())  # causal_lm_loss is each batch's mean: weighted by these
            total += float(causal_lm_loss(model(ids, use_cache=False), labels)) * tokens
            count += tokens
    return total / max(count, 1)


__all__ = ["BUDGETS", "BUDGET_RECORDS", "DEPTH_SHARES", "EXPERT_SHARES", "Figure", "Mix", "Space", "check_target",
           "kept_fraction", "mixes", "mixes_in", "space_of", "variant", "prune_to_budget", "next_token_loss",
           "HELD_OUT", "Split", "split_calibration"]
