"""Whole experts in the HF adapter: remove routed experts of a mixture-of-experts model with their router
rows, and rewrite ``num_experts`` / ``num_local_experts``.

Asked for by the config field the family uses: ``sparsity={"num_local_experts": 0.25}`` (Mixtral) or
``{"num_experts": 0.25}`` (Qwen2-MoE, Qwen3-MoE, OLMoE). Every MoE layer keeps the same number of
experts (the config holds one count), each its own best ones by ``expert_criterion``:

- ``reap`` (REAP): the mean, over the tokens routed to an expert, of its gate value times the norm of
  its output (router-weighted expert activation), on calibration data;
- ``frequency``: how many calibration tokens the router sends to it;
- ``weight-norm``: the Frobenius norm of its weights (data-free);
- ``random``: seeded, a baseline.

These read the modules through hooks on the routers; the same criteria on a captured graph, which
``drop-experts`` uses, are :mod:`fxprune.data.expert_criteria` (their scores are equal: the ranking and
the criterion check are shared from there).

The router's output dim shrinks (its rows of the removed experts go), the experts' stacked tensors lose
those experts, shared experts stay. Exact: the pruned model equals the original whose router never
picks a removed expert (their logits at ``-inf`` before the softmax and top-k, a forward hook on a copy
of each router), checked on the example and calibration inputs. ``num_experts_per_tok`` must not exceed
the experts kept (a typed error naming both).

>>> smaller = fxprune.hf.prune(mixtral, (ids,), sparsity={"num_local_experts": 0.25},
...                            calibration=batches, expert_criterion="reap")         # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional

import torch
import torch.nn.functional as F

from fxprune.data.calibration import as_calibration
from fxprune.data.expert_criteria import check_expert_criterion, lowest
from fxprune.options import EXPERT_CRITERIA, PruneOptions, keyed_by
from fxprune.errors import InvalidOptionError, UnsupportedModelError, VerificationError

EXPERT_FIELDS = ("num_experts", "num_local_experts")


@dataclass(frozen=True)
class ExpertResult:
    model: Any
    dropped: Mapping[str, tuple[int, ...]]
    """{MoE block path: the original indices of its removed experts}."""
    changes: Mapping[str, tuple[Any, Any]]
    record: Mapping[str, Any]


def split_experts(sparsity: Any) -> tuple[Optional[float], Any]:
    """``(expert ratio or None, the rest of sparsity)``."""
    if not isinstance(sparsity, Mapping) or not any(k in EXPERT_FIELDS for k in sparsity):
        return None, sparsity
    field = next(k for k in sparsity if k in EXPERT_FIELDS)
    PruneOptions(sparsity={field: sparsity[field]})  # the check every ratio gets
    rest = {k: v for k, v in sparsity.items() if k not in EXPERT_FIELDS}
    return float(sparsity[field]), rest if rest else None


def moe_blocks(model: Any) -> dict[str, Any]:
    """{path: block} of every block with a top-k router ``gate`` and stacked ``experts``."""
    out = {}
    for name, module in model.named_modules():
        gate, experts = getattr(module, "gate", None), getattr(module, "experts", None)
        if hasattr(gate, "top_k") and getattr(gate, "weight", None) is not None \
                and getattr(experts, "gate_up_proj", None) is not None:
            out[name] = module
    return out


def kernel_alignment(model: Any) -> int:
    """The multiple an MoE model's MLP widths must keep: stacked experts run through transformers'
    grouped matmul, which refuses rows that are not a multiple of 16 bytes (``strides should be multiple
    of 16 bytes``), so ``16 / itemsize`` channels (4 in fp32, 8 in bf16); 1 for a model without them."""
    return 16 // model.dtype.itemsize if moe_blocks(model) else 1


def _field(config: Any) -> str:
    saved = config.to_dict()
    for field in ("num_experts", "num_local_experts"):  # the name config.json uses
        if isinstance(saved.get(field), int):
            return field
    raise UnsupportedModelError(f"{type(config).__name__} has no num_experts / num_local_experts field")


# --- scores -----------------------------------------------------------------------------------------
def expert_scores(model: Any, batches: list[tuple], criterion: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """{MoE block path: one score per expert} (higher is kept)."""
    check_expert_criterion(criterion)
    return EXPERT_CRITERION_RECORDS[criterion](model, moe_blocks(model), batches, seed)


def _routed(model: Any, blocks: Mapping[str, Any], batches: list[tuple], reap: bool) -> dict[str, torch.Tensor]:
    """Per expert, the tokens routed to it and (``reap``) their summed gate x output norm."""
    sums = {p: torch.zeros(b.gate.weight.shape[0], 2, dtype=torch.float64) for p, b in blocks.items()}
    with _routing_hooks(blocks, sums, reap), torch.no_grad():
        for inputs in batches:
            model(*inputs, **_no_cache(model))
    return sums


def _reap(model: Any, blocks: Mapping[str, Any], batches: list[tuple], seed: int) -> dict[str, torch.Tensor]:
    return {p: s[:, 1] / s[:, 0].clamp(min=1) for p, s in _routed(model, blocks, batches, True).items()}


def _frequency(model: Any, blocks: Mapping[str, Any], batches: list[tuple], seed: int) -> dict[str, torch.Tensor]:
    return {p: s[:, 0] for p, s in _routed(model, blocks, batches, False).items()}


def _weight_norm(model: Any, blocks: Mapping[str, Any], batches: list[tuple], seed: int) -> dict[str, torch.Tensor]:
    return {p: _weight_norms(b.experts) for p, b in blocks.items()}


def _random(model: Any, blocks: Mapping[str, Any], batches: list[tuple], seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {p: torch.rand(b.gate.weight.shape[0], generator=generator) for p, b in blocks.items()}


#: Each expert criterion (named in :data:`fxprune.options.EXPERT_CRITERIA`) as ``(model, MoE blocks,
#: calibration batches, seed) -> {block: one score per expert}``.
EXPERT_CRITERION_RECORDS = keyed_by(EXPERT_CRITERIA, {"reap": _reap, "frequency": _frequency,
                                                      "weight-norm": _weight_norm, "random": _random},
                                    "expert criteria")


def _no_cache(model: Any) -> dict:
    import inspect
    return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}


def _weight_norms(experts: Any) -> torch.Tensor:
    up = experts.gate_up_proj.detach().float().flatten(1).pow(2).sum(1)
    down = experts.down_proj.detach().float().flatten(1).pow(2).sum(1)
    return (up + down).sqrt()


@contextlib.contextmanager
def _routing_hooks(blocks: Mapping[str, Any], sums: Mapping[str, torch.Tensor], reap: bool) -> Iterator[None]:
    """Forward hooks on the routers (removed on exit: the model is left as it was)."""
    handles = [block.gate.register_forward_hook(_observer(block, sums[path], reap)) for path, block in blocks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _observer(block: Any, sums: torch.Tensor, reap: bool):
    def hook(router: Any, args: tuple, output: tuple) -> None:
        hidden = args[0].reshape(-1, router.weight.shape[1])
        _, weights, indices = output
        for expert in indices.unique().tolist():
            token, slot = torch.where(indices == expert)
            sums[expert, 0] += token.numel()
            if reap:
                norm = _expert_output(block.experts, expert, hidden[token]).float().norm(dim=-1)
                sums[expert, 1] += float((weights[token, slot].float() * norm).sum())
    return hook


def _expert_output(experts: Any, expert: int, x: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, experts.gate_up_proj[expert]).chunk(2, dim=-1)
    return F.linear(experts.act_fn(gate) * up, experts.down_proj[expert])


# --- pruning ------------------------------------------------------------------------------------------
def prune_experts(model: Any, inputs: tuple, ratio: float, calibration: Any = None, criterion: str = "reap",
                  seed: int = 0, tolerance: Optional[float] = None) -> ExpertResult:
    """``model`` with ``round(ratio · experts)`` routed experts removed from every MoE layer."""
    blocks = moe_blocks(model)
    if not blocks:
        raise UnsupportedModelError(f"{type(model).__name__} has no mixture-of-experts block with a top-k router")
    field = _field(model.config)
    total = getattr(model.config, field)
    drop = round(ratio * total)
    kept = total - drop
    top_k = getattr(model.config, "num_experts_per_tok", 1)
    if kept < max(top_k, 1):
        raise InvalidOptionError(f"{field}={total} with ratio {ratio} keeps {kept} experts, fewer than "
                                 f"num_experts_per_tok={top_k}: keep at least {top_k}")
    batches = [inputs] if calibration is None else list(as_calibration(calibration).batches(len(inputs)))
    scores = expert_scores(model, batches, criterion, seed)
    dropped = {p: tuple(lowest(s, drop)) for p, s in scores.items()}
    config = copy.deepcopy(model.config)
    setattr(config, field, kept)
    new = _rebuild(model, config, dropped)
    error = _check(model, new, dropped, batches[:2] + [inputs], tolerance)
    record = {"criterion": criterion, "dropped": {p: list(d) for p, d in dropped.items()},
              "max_abs_error_vs_reference": error}
    return ExpertResult(new, dropped, {field: (total, kept)}, record)


def _rebuild(model: Any, config: Any, dropped: Mapping[str, tuple[int, ...]]) -> Any:
    from transformers.initialization import no_init_weights
    sliced = {}
    for path, removed in dropped.items():
        keep = torch.tensor([i for i in range(config_experts(model, path)) if i not in removed])
        for key in (f"{path}.gate.weight", f"{path}.experts.gate_up_proj", f"{path}.experts.down_proj"):
            sliced[key] = keep
    state = {k: (v.index_select(0, sliced[k].to(v.device)) if k in sliced else v).detach().clone()
             for k, v in model.state_dict().items()}
    with no_init_weights():
        new = type(model)._from_config(config, dtype=model.dtype)
    new.load_state_dict(state, strict=True)
    new.tie_weights()  # tied embeddings stay one tensor
    return new.to(model.device).eval()


def config_experts(model: Any, path: str) -> int:
    return model.get_submodule(path).gate.weight.shape[0]


def reference(model: Any, dropped: Mapping[str, tuple[int, ...]]) -> Any:
    """A copy of ``model`` whose routers never pick a removed expert (its logit at -inf before the top-k)."""
    ref = copy.deepcopy(model)
    for path, removed in dropped.items():
        ref.get_submodule(path).gate.register_forward_hook(_masked(list(removed)))
    return ref


def _masked(removed: list[int]):
    def hook(router: Any, args: tuple, output: tuple) -> tuple:
        logits = F.linear(args[0].reshape(-1, router.weight.shape[1]), router.weight)
        logits[:, removed] = float("-inf")
        probs = torch.softmax(logits, dtype=torch.float, dim=-1)
        top, index = torch.topk(probs, router.top_k, dim=-1)
        if getattr(router, "norm_topk_prob", True):  # Mixtral always renormalises
            top = top / top.sum(dim=-1, keepdim=True)
        return logits, top.to(output[1].dtype), index
    return hook


def _check(model: Any, new: Any, dropped: Mapping[str, tuple[int, ...]], batches: list[tuple],
           tolerance: Optional[float]) -> float:
    """The pruned model against the reference, with indices mapped: never a model that differs."""
    ref = reference(model, dropped)
    error = 0.0
    with torch.no_grad():
        for inputs in batches:
            a = ref(*inputs, **_no_cache(ref)).logits.float()
            b = new(*inputs, **_no_cache(new)).logits.float()
            error = max(error, float((a - b).abs().max()))
            limit = tolerance if tolerance is not None else 1e-4 * max(1.0, float(a.abs().max()))
            if not error <= limit:
                raise VerificationError(f"the model without experts {dict(dropped)} differs from the original whose "
                                        f"router never picks them by {error:.3g} (tolerance {limit:.3g})")
    return error


__all__ = ["EXPERT_FIELDS", "EXPERT_CRITERIA", "ExpertResult", "split_experts", "moe_blocks", "kernel_alignment",
           "expert_scores",
           "prune_experts", "reference"]
