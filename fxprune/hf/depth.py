"""Depth in the HF adapter: remove whole decoder (or encoder) layers, and rewrite the config to match.

Asked for like a width, by config field: ``fxprune.hf.prune(model, inputs, sparsity={"num_hidden_layers":
0.25})`` removes a quarter of the layers (rounded). The model is exported, its layers found as residual
blocks of the graph (:mod:`fxprune.core.blocks`, every add a layer makes grouped under
``<layer list>.<i>``), scored on calibration data (``block_criterion``: ``block-influence``, ``angular``,
``sleb`` with next-token cross-entropy for a causal LM, ``iterative-influence``) and removed by the ``drop-blocks`` pass, with
its least-squares ``repair`` if asked. Then a fresh model of the same class is built from a config with

- ``num_hidden_layers`` (``n_layer``...) the layers kept;
- every per-layer list (a list with one entry per layer: ``layer_types``...) the kept layers' entries;
- MoE layer placement renumbered: ``mlp_only_layers`` mapped to the new indices, a
  ``decoder_sparse_step`` other than 1 written out as ``mlp_only_layers`` with step 1, and
  ``max_window_layers`` counted over the kept layers;

and loaded with the original tensors, the kept layers renumbered (``layers.5`` -> ``layers.4``), so each
layer is built with its new ``layer_idx`` and ``generate`` with a KV cache works. HF's forward is
compared with the pruned graph: a model whose layers are not ``y = x + f(x)`` (a post-norm layer such
as BERT's, with a LayerNorm after its adds) computes something else and is refused with a typed error.

>>> smaller = fxprune.hf.prune(model, (ids,), sparsity={"num_hidden_layers": 0.25},
...                            calibration=batches)                                  # doctest: +SKIP
>>> smaller.config.num_hidden_layers, smaller.config.fxprune["depth"]["dropped"]     # doctest: +SKIP
(22, [3, 4, 5, 6, 7, 26, 27, 28])
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from fxprune.core.blocks import Blocks, drop_blocks, find_blocks, zeroed_reference
from fxprune.core.verify import compare
from fxprune.data.block_criteria import DEFAULT_WALK, choose_blocks, repair as block_repair
from fxprune.core.capture import AUTO, capture, export
from fxprune.options import PruneOptions
from fxprune.errors import InvalidOptionError, UnsupportedModelError, VerificationError

DEPTH_FIELDS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass(frozen=True)
class DepthResult:
    """What :func:`prune_depth` returns."""

    model: Any
    """The HF model with fewer layers."""
    graph_module: Any
    """The pruned export-level graph it was checked against."""
    dropped: tuple[int, ...]
    """The original indices of the removed layers."""
    changes: Mapping[str, tuple[Any, Any]]
    record: Mapping[str, Any]
    """What ``config.fxprune["depth"]`` holds: criterion, dropped layers, scores, repairs, error."""


def split_depth(sparsity: Any) -> tuple[Optional[float], Any]:
    """``(layer ratio or None, the rest of sparsity)`` from ``fxprune.hf.prune``'s sparsity."""
    if not isinstance(sparsity, Mapping):
        return None, sparsity
    named = [k for k in sparsity if k in DEPTH_FIELDS]
    if not named:
        return None, sparsity
    ratio = sparsity[named[0]]
    PruneOptions(sparsity={named[0]: ratio})  # the check every ratio gets
    rest = {k: v for k, v in sparsity.items() if k not in DEPTH_FIELDS}
    return float(ratio), rest if rest else None


def layer_list(model: Any) -> tuple[str, int]:
    """The path of the ``ModuleList`` holding the model's layers, and how many there are."""
    count = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count and count:
            return name, count
    raise UnsupportedModelError(f"{type(model).__name__} has no ModuleList of config.num_hidden_layers "
                                f"({count}) layers: fxprune.hf cannot remove its layers")


def prune_depth(model: Any, inputs: tuple, ratio: float, adapter: Any, calibration: Any = None,
                criterion: str = "block-influence", repair: Union[bool, str] = False, dynamic_shapes: Any = AUTO,
                tolerance: Optional[float] = None) -> DepthResult:
    """``model`` with ``round(ratio · layers)`` layers removed (see the module docstring). ``adapter``:
    the HF adapter's shared steps (``without_cache``, ``dynamic_shapes``, ``check_outputs``), handed in
    by :mod:`fxprune.hf` so that this module does not import it back."""
    path, total = layer_list(model)
    count = round(ratio * total)
    program = export(adapter.without_cache(model), inputs, adapter.dynamic_shapes(model, inputs, dynamic_shapes))
    gm = capture(program, inputs).gm
    found = _layer_blocks(model, gm, path, total)
    loss = _causal_lm_loss if _is_causal_lm(model) else None
    data = calibration if calibration is not None else [inputs]
    names, scores = choose_blocks(gm, found, data, count, criterion, loss)
    chosen = found.pick(names)
    pruned = drop_blocks(gm, chosen)
    walk = DEFAULT_WALK if repair is True else repair  # True: the default walk
    repairs = block_repair(gm, pruned, found, chosen, data, walk=walk) if repair else []
    dropped = tuple(sorted(int(n.rsplit(".", 1)[1]) for n in names))
    _check_gone(model, pruned, path, dropped)
    record = {"criterion": criterion, "dropped": list(dropped), "scores": scores,
              "repair": walk or None, "repairs": [str(r) for r in repairs]}
    exact = compare(zeroed_reference(gm, chosen), pruned, inputs, True, tolerance) if not repair else None
    if exact is not None and not exact.passed:
        raise VerificationError(f"dropping layers {list(dropped)}: {exact}")
    config, changes = depth_config(model.config, [i for i in range(total) if i not in dropped])
    new = _rebuild(model, config, path, dropped, pruned)
    try:
        error = adapter.check_outputs(new, pruned, inputs, tolerance)
    except VerificationError as exc:
        raise UnsupportedModelError(
            f"{type(model).__name__}: a model without layers {list(dropped)} computes something else than the "
            f"graph without their residual branches ({exc}); its layers are not y = x + f(x) (a post-norm "
            f"layer normalises after its adds), so fxprune.hf cannot remove them") from exc
    record["max_abs_error_vs_graph"] = error
    return DepthResult(new, pruned, dropped, changes, record)


def _check_gone(model: Any, pruned: Any, path: str, dropped: Sequence[int]) -> None:
    """A removed layer must leave nothing behind: a tensor still read (a post-norm LayerNorm after the
    adds) means the layer is more than its residual branches, and no config could hold what is left."""
    prefixes = tuple(f"{path}.{i}." for i in dropped)
    left = [k for k in pruned.state_dict() if k.startswith(prefixes)]
    if left:
        raise UnsupportedModelError(
            f"{type(model).__name__}: removing the residual branches of layers {list(dropped)} leaves {left[0]!r} "
            f"in use (a post-norm layer normalises after its adds: it is not y = x + f(x)), so fxprune.hf "
            f"cannot remove whole layers of this model")


def _layer_blocks(model: Any, gm: Any, path: str, total: int) -> Blocks:
    """The graph's residual blocks that are whole layers (``<path>.<i>``); every layer must be one."""
    found = find_blocks(gm, _layer_owner(path))
    layers = [f"{path}.{i}" for i in range(total)]
    missing = [n for n in layers if n not in found.names]
    if missing:
        why = dict(found.rejected).get(missing[0], "no residual add y = x + f(x) found in it")
        raise UnsupportedModelError(f"{type(model).__name__}: layer {missing[0]!r} is not a removable residual "
                                    f"block ({why})")
    return Blocks(tuple(b for b in found.blocks if b.name in layers), found.rejected)


def _layer_owner(path: str):
    pattern = re.compile(rf"^{re.escape(path)}\.(\d+)(\.|$)")

    def owner(module: str) -> str:
        match = pattern.match(module)
        return f"{path}.{match.group(1)}" if match else module

    return owner


def _is_causal_lm(model: Any) -> bool:
    return type(model).__name__.endswith("ForCausalLM") or type(model).__name__.endswith("LMHeadModel")


def _causal_lm_loss(outputs: Any, inputs: tuple, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Next-token cross-entropy of a causal LM's logits on its own input ids (SLEB's loss); padded
    positions (``mask`` False) are not predicted."""
    logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]
    ids = inputs[0] if mask is None else inputs[0].masked_fill(~mask.to(inputs[0].device), -100)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


# --- the config -------------------------------------------------------------------------------------
def depth_config(config: Any, kept: Sequence[int]) -> tuple[Any, dict[str, tuple[Any, Any]]]:
    """A copy of ``config`` for the layers ``kept`` (original indices), and what changed."""
    total = config.num_hidden_layers
    if not kept:
        raise InvalidOptionError(f"removing all {total} layers leaves no model: keep at least one")
    new = copy.deepcopy(config)
    changes: dict[str, tuple[Any, Any]] = {"num_hidden_layers": (total, len(kept))}
    for field, value in vars(config).items():
        if isinstance(value, (list, tuple)) and len(value) == total and field != "fxprune":
            changes[field] = (list(value), [value[i] for i in kept])
    changes.update(_moe_placement(config, kept))
    for field, (_, value) in changes.items():
        setattr(new, field, value)
    return new, changes


def _moe_placement(config: Any, kept: Sequence[int]) -> dict[str, tuple[Any, Any]]:
    """Which kept layers are dense, renumbered; a sparse step other than 1 written out per layer."""
    changes: dict[str, tuple[Any, Any]] = {}
    index = {old: new for new, old in enumerate(kept)}
    dense = list(getattr(config, "mlp_only_layers", None) or [])
    step = getattr(config, "decoder_sparse_step", None)
    if isinstance(step, int) and step > 1:
        dense = sorted(set(dense) | {i for i in range(config.num_hidden_layers) if (i + 1) % step})
        changes["decoder_sparse_step"] = (step, 1)
    if hasattr(config, "mlp_only_layers"):
        new = [index[i] for i in dense if i in index]
        if new != list(config.mlp_only_layers or []):
            changes["mlp_only_layers"] = (list(config.mlp_only_layers or []), new)
    window = getattr(config, "max_window_layers", None)
    if isinstance(window, int):
        changes["max_window_layers"] = (window, sum(1 for i in kept if i < window))
    return {k: v for k, v in changes.items() if v[0] != v[1]}


# --- the new model -----------------------------------------------------------------------------------
def _rebuild(model: Any, config: Any, path: str, dropped: Sequence[int], pruned: Any) -> Any:
    """A fresh model of ``model``'s class from ``config``, loaded with the kept layers renumbered and
    every tensor the pruned graph changed (a repaired layer) taken from it."""
    from transformers.initialization import no_init_weights
    graph_state = pruned.state_dict()
    state = {}
    for key, tensor in model.state_dict().items():
        name = renumbered(key, path, dropped)
        if name is not None:
            state[name] = graph_state.get(key, tensor).detach().clone()
    with no_init_weights():
        new = type(model)._from_config(config, dtype=model.dtype)
    new.load_state_dict(state, strict=True)
    new.tie_weights()  # tied embeddings stay one tensor (loading fills both names with equal copies)
    return new.to(model.device).eval()


def renumbered(key: str, path: str, dropped: Sequence[int]) -> Optional[str]:
    """``key`` with its layer index renumbered past the dropped layers (None: a dropped layer's)."""
    prefix = path + "."
    if not key.startswith(prefix):
        return key
    index, _, rest = key[len(prefix):].partition(".")
    old = int(index)
    if old in dropped:
        return None
    return f"{prefix}{old - sum(1 for d in dropped if d < old)}.{rest}"


__all__ = ["DEPTH_FIELDS", "DepthResult", "split_depth", "layer_list", "prune_depth", "depth_config", "renumbered"]
