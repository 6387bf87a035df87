"""The HF-compatible selection policy: only plans that a HuggingFace config can hold.

A config holds one number per kind of width — ``hidden_size``, ``intermediate_size`` (GPT-2's
``n_inner``, the MoE widths), ``num_attention_heads`` / ``num_key_value_heads`` with a ``head_dim`` —
and HF's modules rebuild every layer from it. So this policy, on by default in :mod:`fxprune.hf`:

- sorts the groups of an export-level analysis (captured with ``split_axis="outer"``, whose attention
  units are whole key/value heads, each with its ``num_attention_heads / num_key_value_heads`` query
  heads, so GQA's ratio holds by construction) into *kinds*: corresponding groups of every layer (the
  same parameters with the layer index replaced by ``*``), matched to the config field their width is;
- keeps one count per kind in every layer: the mean of what the ordinary selection (sparsity, a mapping,
  global ranking, round_to, min_keep, ignore) asks of its groups, raised to cover frozen units; a kind
  with a frozen group, or with no config field, stays whole;
- never prunes inside a head: ``head_dim``, the rotary frequencies HF recomputes from it and the
  attention scale ``head_dim ** -0.5`` stay as they were. Where a config derives ``head_dim`` from
  ``hidden_size / num_attention_heads`` (GPT-2, BERT, ViT) dropping heads must drop ``head_dim`` hidden
  units per head, so the two counts are tied (and heads stay whole when the hidden size cannot shrink);
- picks indices per layer at that count (``layer_indices="own"``), or the same indices in every layer
  from the layers' mean-normalised scores summed (``"shared"``).

Each decision carries the constraint that shaped it; :mod:`fxprune.hf` writes them into the plan.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from fxprune.core.channels import Dropped
from fxprune.core.analysis import Analysis
from fxprune.errors import InvalidOptionError
from fxprune.core.groups import Group
from fxprune.core.select import round_up_units
from fxprune.options import PruneOptions

LAYER_INDICES = ("own", "shared")
INTERMEDIATE_FIELDS = ("intermediate_size", "n_inner", "ffn_dim", "moe_intermediate_size",
                       "shared_expert_intermediate_size")
#: Fields that are the width of one module, by the name HF gives it: where two fields have the same size
#: (Qwen1.5-MoE-A2.7B: ``intermediate_size`` = ``shared_expert_intermediate_size`` = 5632) the size alone
#: would name the shared expert ``intermediate_size``, a field no module of an all-MoE model reads.
FIELD_MODULES = {"shared_expert_intermediate_size": ".shared_expert."}
HEADS = "num_attention_heads"
HIDDEN = "hidden_size"
_LAYER = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class Attention:
    """What a config says of its attention: head counts and whether ``head_dim`` is its own field."""

    heads: int
    kv_heads: int
    head_dim: int
    explicit_head_dim: bool
    """False where HF derives ``head_dim = hidden_size // num_attention_heads``."""

    @property
    def per_unit(self) -> int:
        """Query heads per unit (a key/value head and the query heads that read it)."""
        return self.heads // self.kv_heads


@dataclass(frozen=True)
class Kind:
    """Corresponding groups of every layer, and the config field their width is."""

    field: str
    """A config field (``"intermediate_size"``...), ``"num_attention_heads"`` for heads, or ``""``."""
    groups: tuple[Group, ...]

    @property
    def size(self) -> int:
        return self.groups[0].size


@dataclass(frozen=True)
class Decision:
    """One kind's width in every layer, and why."""

    kind: Kind
    keep: int
    reason: str


def layer_key(key: str) -> tuple[str, Optional[int]]:
    """``"model.layers.3.mlp.up_proj.weight"`` -> ``("model.layers.*.mlp.up_proj.weight", 3)``."""
    match = _LAYER.search(key)
    if match is None:
        return key, None
    return key[:match.start()] + ".*." + key[match.end():], int(match.group(1))


def _signature(group: Group) -> tuple[tuple, bool]:
    """The group's members with layer indices blanked, and whether it lies in one layer."""
    members, layers = [], set()
    for m in group.members:
        pattern, index = layer_key(m.key)
        members.append((pattern, m.dim))
        layers.add(index)
    return tuple(sorted(members)), len(layers) == 1 and None not in layers


def kinds(analysis: Analysis, config: Any, attention: Optional[Attention]) -> list[Kind]:
    """Group the analysis' groups into kinds, each matched to the config field its width is."""
    by_signature: dict[tuple, list[Group]] = {}
    for group in analysis.groups:
        signature, per_layer = _signature(group)
        by_signature.setdefault((signature, per_layer), []).append(group)
    out = []
    for (_, per_layer), groups in by_signature.items():
        out.append(Kind(_field(analysis, groups[0], per_layer, config, attention), tuple(groups)))
    return out


def _field(analysis: Analysis, group: Group, per_layer: bool, config: Any,
           attention: Optional[Attention]) -> str:
    if not per_layer:
        return HIDDEN if group.size == getattr(config, HIDDEN, None) else ""
    if attention is not None and group.size == attention.kv_heads and _rows_per_unit(analysis, group) >= \
            attention.head_dim:
        return HEADS
    for name in INTERMEDIATE_FIELDS:
        if group.size == intermediate_of(config, name) and name in _candidate_fields(group, config):
            return name
    return ""


def _candidate_fields(group: Group, config: Any) -> tuple[str, ...]:
    """The fields a per-layer group may be: its module's field (:data:`FIELD_MODULES`) where the config has
    it and the group lies inside that module, else any field but those.

    >>> # a group of model.layers.*.mlp.shared_expert.{gate,up,down}_proj on a Qwen2-MoE config
    >>> _candidate_fields(shared_expert_group, qwen2_moe_config)                       # doctest: +SKIP
    ('shared_expert_intermediate_size',)
    """
    own = tuple(name for name, module in FIELD_MODULES.items()
                if hasattr(config, name) and all(module in m.key for m in group.members))
    return own or tuple(name for name in INTERMEDIATE_FIELDS if name not in FIELD_MODULES)


def intermediate_of(config: Any, name: str) -> Optional[int]:
    """The width a config gives an intermediate field (GPT-2's ``n_inner=None`` means 4 x hidden)."""
    if name == "n_inner" and hasattr(config, "n_inner") and config.n_inner is None:
        return 4 * config.hidden_size
    return getattr(config, name, None)


def _rows_per_unit(analysis: Analysis, group: Group) -> int:
    producers = [m for m in group.members if m.producer]
    return min(analysis.tensor(m.key).shape[m.dim] // group.size for m in producers) if producers else 0


WIDTH_FIELDS = (HIDDEN, HEADS, *INTERMEDIATE_FIELDS)
"""The config fields a sparsity mapping may name as keys: one ratio for that kind of width."""


def split_width_ratios(sparsity: Any) -> tuple[dict[str, float], Any]:
    """``({config field: ratio}, what the ordinary selection gets)`` from ``fxprune.hf.prune``'s sparsity:
    a mapping's config-field keys (:data:`WIDTH_FIELDS`) ask for one kind of width; its other keys are
    module patterns; a mapping of fields only leaves every other kind whole."""
    if not isinstance(sparsity, Mapping):
        return {}, sparsity
    widths = {k: v for k, v in sparsity.items() if k in WIDTH_FIELDS}
    rest = {k: v for k, v in sparsity.items() if k not in WIDTH_FIELDS}
    return widths, rest if rest or not widths else 0.0


def check_width_ratios(widths: Mapping[str, float], kinds_: list[Kind]) -> None:
    """A field no kind of this model is (``n_inner`` on LLaMA): say which fields it has."""
    present = sorted({k.field for k in kinds_ if k.field})
    for field in widths:
        if field not in present:
            raise InvalidOptionError(f"sparsity names config field {field!r}, which no prunable width of this "
                                     f"model is; its fields: {present}")


def decide(kinds_: list[Kind], requested: Mapping[str, int], options: PruneOptions,
           attention: Optional[Attention], whole_fields: Optional[Mapping[str, str]] = None,
           widths: Optional[Mapping[str, float]] = None) -> list[Decision]:
    """One kept count per kind. ``requested``: the count the ordinary options would keep per group;
    ``whole_fields``: {config field: why it must stay as it is}; ``widths``: {config field: ratio}
    asked for a kind directly."""
    whole_fields, widths = whole_fields or {}, widths or {}
    decisions = {id(k): Decision(k, k.size, whole_fields[k.field]) if k.field in whole_fields
                 else _decide(k, requested, options, widths.get(k.field), _unit_channels(k, attention))
                 for k in kinds_}
    if attention is not None and not attention.explicit_head_dim:
        _tie_heads_to_hidden(kinds_, decisions, requested, options, attention)
    elif attention is not None:
        _hidden_by_whole_heads(kinds_, decisions, attention)
    return [decisions[id(k)] for k in kinds_]


def _unit_channels(kind: Kind, attention: Optional[Attention]) -> int:
    """Channels one unit of ``kind`` is in a key/value projection: ``round_to`` counts channels."""
    return attention.head_dim if attention is not None and kind.field == HEADS else 1


def _decide(kind: Kind, requested: Mapping[str, int], options: PruneOptions, ratio: Optional[float] = None,
            unit_channels: int = 1) -> Decision:
    whole = [g for g in kind.groups if not g.prunable]
    size = kind.size
    if len(kind.groups) == len(whole):
        return Decision(kind, size, "frozen" if not whole[0].reasons else f"frozen: {whole[0].reasons[0]}")
    if whole:
        return Decision(kind, size, f"kept whole in every layer: {whole[0].name} is frozen "
                                    f"({whole[0].reasons[0] if whole[0].reasons else 'frozen'})")
    if not kind.field:
        return Decision(kind, size, "kept whole: no config field holds a per-layer width of "
                                    f"{size} here")
    asked = [requested.get(g.name, size) for g in kind.groups] if ratio is None else [size * (1 - ratio)]
    keep = _rounded_keep(sum(asked) / len(asked), kind, options, unit_channels)
    what = f"{kind.field}={keep}" if kind.field != HEADS else f"{keep} of {size} key/value heads"
    how = "asked" if len(set(asked)) == 1 else f"the mean of the per-layer widths asked, {sorted(set(asked))}"
    how = f"{kind.field}: {ratio:g} asked" if ratio is not None else how
    return Decision(kind, keep, f"{what} in every layer ({how}); whole heads, head_dim and rotary "
                                f"frequencies unchanged" if kind.field == HEADS else
                    f"{what} in every layer ({how}): a config holds one {kind.field}")


def _rounded_keep(mean: float, kind: Kind, options: PruneOptions, unit_channels: int) -> int:
    keep = round_up_units(int(math.floor(mean + 0.5)), options.round_to, unit_channels)
    frozen = max(len(g.frozen_units) for g in kind.groups)
    return min(kind.size, max(keep, options.min_keep, frozen))


def _tie_heads_to_hidden(kinds_: list[Kind], decisions: dict, requested: Mapping[str, int],
                         options: PruneOptions, attention: Attention) -> None:
    """``head_dim = hidden_size / num_attention_heads``: kept hidden = kept heads x head_dim."""
    heads = [k for k in kinds_ if k.field == HEADS]
    hidden = [k for k in kinds_ if k.field == HIDDEN]
    width = attention.per_unit * attention.head_dim
    hidden_free = bool(hidden) and decisions[id(hidden[0])].keep < hidden[0].size
    for kind in heads:
        d = decisions[id(kind)]
        if not hidden_free:
            why = decisions[id(hidden[0])].reason if hidden else "no hidden-size group"
            decisions[id(kind)] = Decision(kind, kind.size, f"kept whole: the config derives head_dim = "
                                                            f"hidden_size / num_attention_heads, and hidden_size "
                                                            f"is kept ({why})")
            continue
        frozen = max(len(g.frozen_units) for g in hidden[0].groups)
        keep = max(d.keep, -(-frozen // width))
        decisions[id(kind)] = Decision(kind, keep, d.reason + f"; hidden_size follows: {keep} heads x "
                                                              f"head_dim {attention.head_dim}")
    if hidden_free and heads:
        keep = decisions[id(heads[0])].keep * width
        decisions[id(hidden[0])] = Decision(hidden[0], keep, f"hidden_size={keep}: the config derives "
                                            f"head_dim = hidden_size / num_attention_heads, so hidden_size "
                                            f"= kept heads x head_dim {attention.head_dim}")


def _hidden_by_whole_heads(kinds_: list[Kind], decisions: dict, attention: Attention) -> None:
    """A pruned ``hidden_size`` is rounded up to a multiple of the query heads kept: transformers refuses
    any other (``LlamaConfig.validate``: "hidden size is not a multiple of the number of attention heads",
    even with ``head_dim`` written), and one rule for every family keeps the configs alike."""
    hidden = [k for k in kinds_ if k.field == HIDDEN and decisions[id(k)].keep < k.size]
    heads = [decisions[id(k)].keep for k in kinds_ if k.field == HEADS]
    query_heads = (heads[0] if heads else attention.kv_heads) * attention.per_unit
    for kind in hidden:
        d = decisions[id(kind)]
        keep = min(kind.size, -(-d.keep // query_heads) * query_heads)
        if keep != d.keep:
            decisions[id(kind)] = Decision(kind, keep, f"{HIDDEN}={keep} in every layer (rounded up from "
                                                       f"{d.keep} to a multiple of the {query_heads} query heads "
                                                       f"kept, which transformers requires)")


def requested_keeps(analysis: Analysis, drop: Dropped) -> dict[str, int]:
    """How many units each group keeps under a drop mask (the ordinary selection's wish)."""
    out = {}
    for g in analysis.groups:
        units = torch.tensor(g.units, dtype=torch.long)
        out[g.name] = g.size - (int(drop[units].sum()) if g.units else 0)
    return out


def drop_counts(decisions: list[Decision]) -> dict[str, int]:
    """{group name: units to drop} for :func:`fxprune.core.select.select`'s ``counts`` hook."""
    return {g.name: g.size - d.keep for d in decisions for g in d.kind.groups if g.prunable}


def shared_scores(decisions: list[Decision], scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every group of a kind gets the kind's summed mean-normalised scores: the same indices per layer."""
    out = dict(scores)
    for d in decisions:
        present = [g for g in d.kind.groups if g.name in scores]
        if len(present) < 2:
            continue
        total = sum(scores[g.name] / scores[g.name].mean().clamp_min(1e-12) for g in present)
        for g in present:
            out[g.name] = total
    return out

