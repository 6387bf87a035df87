"""What calibration, recovery and real checkpoints need from the HF adapter.

- **Data**: a HF model is exported with ``input_ids`` as its one input; calibration batches are token
  tensors of any batch size or HF dict batches (``input_ids``; ``labels`` for a loss). Token ids are
  checked against the vocabulary before any graph runs. The gradient criteria (``taylor``, ``hessian``)
  get a next-token cross-entropy (:func:`causal_lm_loss`) when the user gives no ``loss_fn``.
- **Recovered weights**: recovery changes the pruned graph's weights and may give a layer a bias;
  :func:`recovered_sources` reads them back by their state_dict names (:func:`graph_sources`: any pruned
  graph's tensors, which the rebuilt model takes without a copy) and :func:`bias_flags` finds the
  config flag that gives the HF class that bias (LLaMA's ``mlp_bias`` / ``attention_bias``); the other
  biases the flag adds are zero. No flag: a typed error naming the tensor.
- **Ties**: ``_from_config`` builds untied tensors; :func:`retie` ties them again as the config says,
  so a pruned model never has more parameters than its original.
- **dtype**: bf16 / fp16 graphs and rebuilt models round differently; :func:`tolerance` scales with the
  dtype's machine epsilon (fp32 keeps the old 1e-4).

>>> flags = bias_flags(model, ["model.layers.0.mlp.down_proj.bias"])          # doctest: +SKIP
{'mlp_bias': True}
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.fx as fx

from fxprune.data.calibration import Calibration
from fxprune.errors import CalibrationError, ConfigMismatchError

#: Config flags that give a class's layers biases, tried in order for a bias recovery created.
BIAS_FLAGS = ("mlp_bias", "attention_bias", "bias", "use_bias")



def tolerance(dtype: torch.dtype, scale: float) -> float:
    """How far the rebuilt model may differ from the pruned graph: 1e-4 in fp32, and for half types 8
    machine epsilons (bf16: 0.031), relative to the outputs' largest magnitude."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    return max(1e-4, 8 * eps) * max(1.0, scale)


def retie(new: Any, original: Any) -> None:
    """Tie ``new``'s tensors as its config says (``_from_config`` under ``no_init_weights`` leaves the
    LM head a separate copy of the embedding); a tie the original has and ``new`` lacks is a bug."""
    if getattr(new.config, "tie_word_embeddings", False) and hasattr(new, "tie_weights"):
        new.tie_weights()
    if _count(new) > _count(original):
        raise ConfigMismatchError(f"the rebuilt {type(new).__name__} has {_count(new)} parameters, more than "
                                  f"the original's {_count(original)}: a tied tensor came back untied")


def _count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() lists a tied tensor once


def graph_sources(graph: fx.GraphModule, names: set[str]) -> dict[str, Callable[[], torch.Tensor]]:
    """Every tensor the pruned graph holds under a state_dict name in ``names``, each read (a detached
    view, no copy) when written.

    >>> graph_sources(gm, {"fc.weight"})["fc.weight"]().shape      # doctest: +SKIP
    torch.Size([48, 64])
    """
    return {name: tensor.detach for name, tensor in list(graph.named_parameters()) + list(graph.named_buffers())
            if name in names}


def recovered_sources(graph: fx.GraphModule, names: set[str]) -> dict[str, Callable[[], torch.Tensor]]:
    """Where the rebuilt model reads what recovery changed: :func:`graph_sources`, and each layer's bias
    as the graph's layer node reads it (recovery may have added one under another attribute name),
    under ``<layer>.bias``; each read when written."""
    out = graph_sources(graph, names)
    for weight, bias in _layer_biases(graph):
        out[f"{weight.rpartition('.')[0]}.bias"] = _attr(graph, bias).detach
    return out


_LAYER_OPS = (torch.ops.aten.linear.default, torch.ops.aten.conv2d.default, torch.ops.aten.conv1d.default)


def _layer_biases(graph: fx.GraphModule) -> list[tuple[str, str]]:
    """(weight target, bias target) of every ATen linear/conv node that reads both from attributes."""
    out = []
    for node in graph.graph.nodes:
        if node.op != "call_function" or node.target not in _LAYER_OPS or len(node.args) < 3:
            continue
        weight, bias = node.args[1], node.args[2]
        if isinstance(weight, fx.Node) and isinstance(bias, fx.Node) and weight.op == bias.op == "get_attr":
            out.append((str(weight.target), str(bias.target)))
    return out


def _attr(graph: fx.GraphModule, target: str) -> torch.Tensor:
    owner, _, name = target.rpartition(".")
    return getattr(graph.get_submodule(owner) if owner else graph, name)


def bias_flags(model: Any, new_keys: Sequence[str]) -> dict[str, bool]:
    """The config flags (:data:`BIAS_FLAGS`) under which ``type(model)`` has every tensor of
    ``new_keys``; probed on the meta device. ``ConfigMismatchError`` naming the key where none does."""
    if not new_keys:
        return {}
    flags: dict[str, bool] = {}
    for flag in BIAS_FLAGS:
        if getattr(model.config, flag, None) is False and not _all_present(model, flags, new_keys):
            flags[flag] = True
    if not _all_present(model, flags, new_keys):
        missing = [k for k in new_keys if k not in _names(model, flags)]
        have = [f for f in BIAS_FLAGS if hasattr(model.config, f)]
        raise ConfigMismatchError(
            f"recovery gave {missing[0]!r} a bias that {type(model).__name__} has no config flag for "
            f"(flags tried: {have or list(BIAS_FLAGS)}); use recover=('reconstruct',) without "
            f"'compensate-bias', or a class whose config has such a flag")
    return {f: v for f, v in flags.items() if _needed(model, flags, f, new_keys)}


def _names(model: Any, flags: Mapping[str, bool]) -> set[str]:
    probe = copy.deepcopy(model.config)
    for flag, value in flags.items():
        setattr(probe, flag, value)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return set(type(model)(probe).state_dict())


def _all_present(model: Any, flags: Mapping[str, bool], keys: Sequence[str]) -> bool:
    return bool(flags) and set(keys) <= _names(model, flags)


def _needed(model: Any, flags: Mapping[str, bool], flag: str, keys: Sequence[str]) -> bool:
    """A flag is kept only if the keys are not all present without it (fewer zero biases)."""
    rest = {f: v for f, v in flags.items() if f != flag}
    return not (rest and set(keys) <= _names(model, rest))


# --- calibration data ---------------------------------------------------------------------------------------
def token_calibration(calibration: Any, vocab_size: Optional[int], causal: bool = True) -> Any:
    """Calibration read as ``input_ids`` batches (a dict batch's ``input_ids``; a tuple's first item),
    each checked against the vocabulary: a token id the embedding cannot look up is a typed error
    naming the batch, before any graph runs.

    A dict batch's ``attention_mask`` marks padding, which is left out of every statistic
    (:mod:`fxprune.data.calibration`). The exported graph takes ``input_ids`` alone, so in each row
    the real tokens are moved first, in their order (a left-padded row becomes right-padded; trailing
    padding is cut): for a causal LM a real token then sees exactly the tokens of its unpadded
    sequence, and the statistics equal those of the sequences given one by one. The loss of
    ``taylor`` / ``hessian`` ignores padded positions (their labels are -100). A non-causal model
    (every token attends to every other) is refused a padded batch."""
    if calibration is None or isinstance(calibration, Calibration):
        return calibration
    return Calibration(_Checked(calibration, vocab_size, causal), inputs=_input_ids, target=_labels,
                       mask=_attention_mask)


class _Checked:
    """An iterable of batches whose token ids are checked as they are read (re-iterable if the data is);
    padded dict batches come out with their real tokens first."""

    def __init__(self, data: Any, vocab_size: Optional[int], causal: bool = True):
        if isinstance(data, (torch.Tensor, str, bytes, Mapping)):
            raise CalibrationError(f"calibration data must be an iterable of batches (a list of token "
                                   f"tensors or of dicts with 'input_ids'), got {type(data).__name__}")
        self.data, self.vocab_size, self.causal = data, vocab_size, causal

    def __iter__(self):
        for index, batch in enumerate(self.data):
            ids = _input_ids(batch)
            _check_ids(ids, index)
            mask = _check_mask(batch, index, self.causal)
            _check_vocab(ids if mask is None else ids[mask], self.vocab_size, index)  # padding may hold any id
            yield batch if mask is None else _real_tokens_first(ids, mask)


def _input_ids(batch: Any) -> torch.Tensor:
    if isinstance(batch, Mapping):
        return batch["input_ids"]
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _attention_mask(batch: Any) -> Optional[torch.Tensor]:
    return batch.get("attention_mask") if isinstance(batch, Mapping) else None


def _labels(batch: Any) -> torch.Tensor:
    """The next-token targets: the ids, -100 (ignored by the loss) at padded positions."""
    ids, mask = _input_ids(batch), _attention_mask(batch)
    return ids if mask is None else ids.masked_fill(~mask.bool(), -100)


def _check_ids(ids: Any, index: int) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 2:
        raise CalibrationError(f"calibration batch {index}: input_ids must be a (batch, sequence) tensor of "
                               f"token ids, got {_describe(ids)}")


def _check_vocab(ids: torch.Tensor, vocab_size: Optional[int], index: int) -> None:
    if vocab_size is not None and ids.numel() and (int(ids.max()) >= vocab_size or int(ids.min()) < 0):
        raise CalibrationError(f"calibration batch {index}: input_ids holds token id {int(ids.max())}, "
                               f"outside the model's vocabulary of {vocab_size} (another tokenizer?)")


def _check_mask(batch: Any, index: int, causal: bool) -> Optional[torch.Tensor]:
    """The batch's bool mask where it pads some position (None where it pads none), checked: the
    shape of input_ids, 0/1 values; a padded batch for a non-causal model is refused."""
    from fxprune.data.calibration import check_mask
    if not isinstance(batch, Mapping) or batch.get("attention_mask") is None:
        return None
    mask = check_mask(batch["attention_mask"], (batch["input_ids"],), index, "input_ids")
    if mask is not None and not causal:
        raise CalibrationError(f"calibration batch {index}: attention_mask has padded positions, and every "
                               f"token of this (non-causal) model attends to them: the exported graph takes "
                               f"input_ids alone, so pass unpadded windows of equal length")
    return mask


def _real_tokens_first(ids: torch.Tensor, mask: torch.Tensor) -> dict:
    """Each row's real tokens first, in order, then its padding (id 0); columns no row fills are cut
    (at least 2 kept: an exported dynamic sequence starts at 2)."""
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices  # real (0) before pad (1)
    real = mask.gather(1, order)
    length = max(int(real.sum(1).max()), min(2, ids.shape[1]))
    ids = ids.gather(1, order).masked_fill(~real, 0)[:, :length]
    return {"input_ids": ids, "attention_mask": real[:, :length].long()}


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return type(value).__name__


def causal_lm_loss(output: Any, target: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of a causal LM's logits (the graph's first output) on the batch's ids,
    averaged over the positions whose label is not -100 (padding)."""
    logits = output[0] if isinstance(output, (tuple, list)) else getattr(output, "logits", output)
    labels = target[:, 1:].reshape(-1)  # -100 at padded positions: not predicted
    total = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels,
                                              reduction="sum")
    return total / (labels != -100).sum().clamp_min(1)  # the mean over real tokens (0 where none)


__all__ = ["tolerance", "retie", "graph_sources", "recovered_sources", "bias_flags", "token_calibration",
           "causal_lm_loss"]
