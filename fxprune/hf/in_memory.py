"""The in-memory route of :mod:`fxprune.hf`: a ``PreTrainedModel`` in memory pruned into a smaller one of the
same class (:func:`prune`, :func:`prune_with_result`); the package's ``__init__`` re-exports it beside the
disk-to-disk route (:mod:`fxprune.hf.checkpoint`), which imports its helpers from here.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import math
import types
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from fxprune import stages
from fxprune.core.channels import Dropped
from fxprune.core.analysis import Analysis
from fxprune.core.capture import AUTO, as_inputs, export, propagate_values, without_cache
from fxprune.core.purity import leaves_models_untouched
from fxprune.core.select import check_patterns, select
from fxprune.data.criteria import DATA_CRITERIA, GRADIENT_CRITERIA, Criterion
from fxprune.data.recovery import RECOVERY_STEPS, recovery_steps
from fxprune.errors import (CalibrationError, ConfigMismatchError, ExampleInputError, InvalidOptionError,
                            TrainingModeError, UnsupportedModelError, VerificationError)
from fxprune.hf import budget, calibrated, policy as hf_policy, structure
from fxprune.hf.experts import kernel_alignment
from fxprune.core.plan import Plan
from fxprune.options import PruneOptions, Sparsity, public_fields, route_fields
from fxprune.progress import stage_bar
from fxprune.stages import PruneResult, RunData, check_run, criterion_name, make_plan

FORMAT = "fxprune.hf/1"


@dataclass(frozen=True)
class HFPruneResult:
    """What :func:`prune_with_result` returns: the HF model and the export-level result it came from."""

    model: Any
    """The pruned ``PreTrainedModel`` (same class as the input, new config)."""
    result: PruneResult
    """The export-level pruning: ``result.plan``, ``result.graph_module``, ``result.analysis``. ``model``
    holds ``result.graph_module``'s tensors themselves (one copy of the pruned weights, not two): copy
    one before changing the other's weights in place."""
    changes: Mapping[str, tuple[Any, Any]]
    """{config field: (before, after)}."""
    max_abs_error: float
    """The largest difference between the HF model's outputs and the pruned graph's (example inputs)."""
    depth: Any = None
    """The layers removed (:class:`fxprune.hf.depth.DepthResult`), when ``sparsity`` named a depth field."""
    request: Optional[PruneOptions] = None
    """Every option of the run: what :attr:`plan` records (the layers', experts' and budget's beside the
    widths')."""

    @property
    def plan(self) -> Optional[Plan]:
        """The widths' plan, recording :attr:`request`; a run that pruned no width has a plan of no tensor."""
        if self.result is None:
            return Plan({}, {}, (), self.request) if self.request is not None else None
        if self.request is None:
            return self.result.plan
        return dataclasses.replace(self.result.plan, options=self.request)


def prune(model: Any, example_inputs: Any, sparsity: Optional[Sparsity] = None,
          criterion: Optional[Criterion] = None, *, hf_compatible: bool = True, layer_indices: str = "own",
          **options: Any) -> Any:
    """Prune a ``PreTrainedModel`` and return a new one of the same class; ``model`` is untouched.

    Args:
        model: a ``transformers.PreTrainedModel`` in eval mode.
        example_inputs: a tensor or tuple of tensors for ``model.forward``'s leading arguments
            (``input_ids``, ``pixel_values``...).
        sparsity: fraction of each kind of width to drop, or a mapping: ``{config field: ratio}`` for
            one kind of width (``{"intermediate_size": 0.5, "num_attention_heads": 0.25}``: the
            kinds not named, the hidden size here, are kept), ``{module pattern: ratio}``, or both.
        criterion: as in :func:`fxprune.prune`. Default: ``"energy"`` with ``calibration`` (the best
            measured on a real LLM, ``benchmarks/bench_llm.py``), else ``"group_magnitude"``, which
            warns on a causal LM with the figure that benchmark measured.
        hf_compatible: make only plans a config can hold (:mod:`fxprune.hf.policy`). With False, the
            ordinary policy selects, and a plan no config can hold raises ``ConfigMismatchError``.
        layer_indices: ``"own"`` (each layer keeps its best units at the common count) or
            ``"shared"`` (the same indices in every layer, from the layers' summed scores).
        options: every option of :func:`fxprune.prune` (the fields of :class:`~fxprune.options.PruneOptions`,
            or ``options=PruneOptions(...)``); those this route cannot honour (``capture="fx"``,
            ``prune_outputs``, ``propagate_bias``) are refused. Also ``dynamic_shapes`` (default: dynamic
            batch and sequence), ``tolerance`` (default: by the model's dtype), ``progress``.
        calibration: token batches (``(batch, sequence)`` id tensors of any batch size, or dicts with
            ``input_ids``) for the data-aware criteria and ``recover=``; ids are checked against the
            vocabulary. A dict batch's ``attention_mask`` marks padding, left out of every statistic
            (activation moments, wanda/flap, Gram matrices of ``reconstruct``, the loss of
            ``taylor``/``hessian``): the real tokens of each row are moved first (the graph takes ids
            alone; a causal LM's real tokens then see their unpadded sequence), so a padded batch
            gives the statistics of its sequences given one by one. Non-causal models refuse padding.
        loss_fn: ``taylor`` / ``hessian``: default, the next-token cross-entropy on the batch's ids.
        recover: recovery steps after pruning, as in :func:`fxprune.prune` (``"reconstruct"``,
            ``"compensate-bias"``), or ``{step: {option: value}}`` (reconstruct's ``ridge`` defaults to 1
            here, measured: :data:`LLM_STEP_OPTIONS`): they run on the pruned graph, block-sequentially (linear in depth),
            and the returned model carries the recovered weights; a bias recovery adds is held through
            the config flag that gives the class one (``mlp_bias``, ``attention_bias``) or refused.

    >>> fxprune.hf.prune(model, (ids,), {"intermediate_size": 0.3}, "l2", round_to=64)   # doctest: +SKIP
    """
    return prune_with_result(model, example_inputs, sparsity, criterion, hf_compatible=hf_compatible,
                             layer_indices=layer_indices, **options).model


#: Options whose only value on this route is fixed: a HuggingFace model is pruned at the export level,
#: its outputs (logits, hidden states) keep their widths, and its classes hold no folded biases.
ROUTE_VALUES = {"capture": "export", "prune_outputs": False, "propagate_bias": False}


def hf_options(options: Optional[PruneOptions], given: Mapping[str, Any], hf_compatible: bool) -> PruneOptions:
    """The options of an HF run: the user's, with the values this route fixes; a value it cannot
    honour is an ``InvalidOptionError`` naming it, never silently replaced."""
    wanted = PruneOptions.build(options, **given)
    defaults = PruneOptions()
    route = {**ROUTE_VALUES, **({"split_axis": "outer"} if hf_compatible else {})}
    for name, value in route.items():
        chosen = getattr(wanted, name)
        asked = given.get(name) is not None or chosen != getattr(defaults, name)  # not just the default
        if chosen != value and asked:
            raise InvalidOptionError(
                f"fxprune.hf cannot honour {name}={chosen!r}" + (" with hf_compatible=True" if name == "split_axis"
                                                                 else "") + f": this route uses {value!r}")
    return wanted.replace(**route)


@leaves_models_untouched
def prune_with_result(model: Any, example_inputs: Any, sparsity: Optional[Sparsity] = None,
                      criterion: Optional[Criterion] = None, *, hf_compatible: bool = True,
                      layer_indices: str = "own", options: Optional[PruneOptions] = None,
                      dynamic_shapes: Any = AUTO, tolerance: Optional[float] = None, progress: bool = False,
                      calibration: Any = None, loss_fn: Optional[Callable] = None, recover: Sequence[str] = (),
                      **option_fields: Any) -> HFPruneResult:
    """:func:`prune`, also returning the plan, the pruned graph and what changed in the config.

    Whole structures (issue 19): ``sparsity`` may name ``num_hidden_layers`` (layers, by the
    ``block_criterion`` option on ``calibration``, ``block_repair``: :mod:`fxprune.hf.depth`) and
    ``num_experts`` / ``num_local_experts`` (by ``expert_criterion``: :mod:`fxprune.hf.experts`) beside
    widths; the ``target`` option (``{"params": f}``, ``{"active_params": f}`` on MoE models, ``{"macs": f}``)
    chooses the mix of depth, experts and width instead (:mod:`fxprune.hf.budget`). These are options like any other (:class:`~fxprune.options.PruneOptions`),
    recorded in the plan; one set to no effect (``expert_criterion`` with no expert count asked) is refused."""
    _check_model(model)
    if getattr(model, "main_input_name", "input_ids") == "input_ids":  # token batches (not a ViT's pixels)
        calibration = calibrated.token_calibration(calibration, getattr(model.config, "vocab_size", None),
                                                   _is_causal_lm(model) or bool(getattr(model.config, "is_decoder",
                                                                                        False)))
    named = criterion if isinstance(criterion, str) or criterion is None else criterion_name(criterion)
    asked = hf_options(options, {"sparsity": sparsity, "criterion": named, **option_fields}, hf_compatible)
    _check_whole_structures(asked, structure.split(asked.sparsity), sparsity is not None)
    inputs = as_inputs(example_inputs)
    whole = route_fields()
    widths = functools.partial(
        _prune_widths, example_inputs=example_inputs, criterion=criterion, hf_compatible=hf_compatible,
        layer_indices=layer_indices, options=options.replace(**_defaults(whole)) if options is not None else None,
        dynamic_shapes=dynamic_shapes, tolerance=tolerance, progress=progress, loss_fn=loss_fn, recover=recover,
        **{k: v for k, v in option_fields.items() if k not in whole})

    def run(sparsity: Sparsity, data: Any) -> HFPruneResult:  # the budget fits its mixes on part of the data
        return _structures_then_widths(model, sparsity, asked, inputs, data,
                                       dict(dynamic_shapes=dynamic_shapes, tolerance=tolerance),
                                       functools.partial(widths, calibration=data))

    if asked.target is None:
        return _recorded(run(asked.sparsity, calibration), asked, asked.sparsity)
    out, chosen = budget.prune_to_budget(model, inputs, asked.target, calibration, run, _whole_options(asked),
                                         fits_weights=bool(asked.block_repair or recover))
    return _recorded(out, asked, chosen)


#: The options of whole structures, and what each needs the sparsity (or the budget's mix) to remove.
WHOLE_OPTIONS = {"block_criterion": "layer count", "block_repair": "layer count", "expert_criterion": "expert count"}


def _whole_options(asked: PruneOptions) -> dict[str, tuple[Any, str]]:
    """``{option: (value, what it needs removed)}`` of the layers' and experts' options the call set."""
    return {name: (getattr(asked, name), what) for name, what in WHOLE_OPTIONS.items()
            if getattr(asked, name) != public_fields()[name].default}


def _defaults(names: Sequence[str]) -> dict[str, Any]:
    return {name: public_fields()[name].default for name in names}


def _check_whole_structures(asked: PruneOptions, wanted: structure.Structure, sparsity_given: bool) -> None:
    """A whole-structure option set to no effect is refused, by name: never ignored."""
    if asked.target is not None:
        if sparsity_given or wanted.any:
            raise InvalidOptionError(f"target={dict(asked.target)!r} chooses the sparsity itself: give target or "
                                     f"sparsity, not both")
        return  # the budget checks these options against its mixes (budget.prune_to_budget)
    asks = {"layer count": wanted.layers is not None, "expert count": wanted.experts is not None}
    for name, (value, what) in _whole_options(asked).items():
        if not asks[what]:
            raise InvalidOptionError(f"fxprune.hf: {name}={value!r} has no effect: the sparsity names no {what} "
                                     f"({', '.join(structure.FIELDS[what])}) and no target is given")


def _structures_then_widths(model: Any, sparsity: Sparsity, asked: PruneOptions, inputs: tuple, calibration: Any,
                            steps: Mapping[str, Any], widths: Callable[..., HFPruneResult]) -> HFPruneResult:
    """Layers and experts first (:mod:`fxprune.hf.structure`), then widths on the smaller model."""
    wanted = structure.split(sparsity)
    if not wanted.any:
        return widths(model, sparsity)
    return structure.run(model, wanted, inputs, calibration, asked, steps, widths, _adapter())


def _recorded(out: HFPruneResult, asked: PruneOptions, sparsity: Sparsity) -> HFPruneResult:
    """The plan (and ``config.fxprune``) record the whole request: the widths' options with the sparsity
    asked (or the budget's choice), the layers', experts' and budget's options; a run with no width to
    prune still has a plan, of no tensor."""
    base = out.result.plan.options if out.result is not None else asked
    request = base.replace(sparsity=sparsity, **{name: getattr(asked, name) for name in route_fields()})
    out.model.config.fxprune = {**out.model.config.fxprune,
                                "options": {k: v for k, v in request.to_dict().items() if k != "hf"}}
    return dataclasses.replace(out, request=request)


def _prune_widths(model: Any, sparsity: Optional[Sparsity], example_inputs: Any, criterion: Optional[Criterion],
                  *, hf_compatible: bool, layer_indices: str, options: Optional[PruneOptions], dynamic_shapes: Any,
                  tolerance: Optional[float], progress: bool, calibration: Any, loss_fn: Optional[Callable],
                  recover: Sequence[str], **option_fields: Any) -> HFPruneResult:
    """Widths only: export, match, score, the HF policy's selection, rewrite, rebuild."""
    if layer_indices not in hf_policy.LAYER_INDICES:
        raise InvalidOptionError(f"layer_indices must be one of {hf_policy.LAYER_INDICES}, got {layer_indices!r}")
    named = criterion if isinstance(criterion, str) or criterion is None else criterion_name(criterion)
    if named is None and calibration is not None and options is None:
        named = CALIBRATED_CRITERION
    options = hf_options(options, {"sparsity": sparsity, "criterion": named, **option_fields}, hf_compatible)
    scorer = criterion if callable(criterion) else None
    _warn_weight_criterion(model, scorer or options.criterion)
    if loss_fn is None and options.criterion in GRADIENT_CRITERIA and scorer is None:
        loss_fn = calibrated.causal_lm_loss
    data = RunData(calibration, loss_fn, None, progress)
    check_run(options, scorer, data)
    steps, step_options = _recovery(recover)
    if steps and calibration is None:
        raise CalibrationError(f"recover={list(steps)} needs calibration data: pass calibration= (token batches)")
    recovery = _Recovery(steps, calibration, progress, step_options)
    widths, module_sparsity = hf_policy.split_width_ratios(options.sparsity)
    # an MoE model's widths stay a multiple its experts' kernel accepts, as if round_to asked it
    selection = options.replace(sparsity=module_sparsity, round_to=math.lcm(options.round_to, kernel_alignment(model)))
    inputs = as_inputs(example_inputs)
    _check_input_dtype(model, inputs)
    with stage_bar(progress, 3, "fxprune.hf") as step:
        program = export(_without_cache(model), inputs, _dynamic_shapes(model, inputs, dynamic_shapes))
        step("export")
        analysis = stages.analyze(program, inputs, options)
        del program  # the analysis holds its own graph module: the exported program's graph is freed
        check_patterns(analysis.groups, selection)
        attention = _attention(model)  # builds a probe on the meta device: once per call
        kinds = hf_policy.kinds(analysis, model.config, attention)
        hf_policy.check_width_ratios(widths, kinds)
        asked = _groups_to_score(kinds, widths, selection, hf_compatible)
        scores = stages.score(analysis, options, scorer, data, asked)
        step("match and score")
        attempt = functools.partial(_prune_and_rebuild, model, analysis, scores, selection, options, widths,
                                    attention, inputs, hf_compatible, layer_indices, tolerance, recovery)
        try:
            out = attempt({})
        except HiddenSizeReadError as exc:  # Gemma: retry with the residual stream whole, saying why
            out = attempt({hf_policy.HIDDEN: str(exc)})
        step("rewrite and rebuild")
    return out


def _groups_to_score(kinds: list[hf_policy.Kind], widths: Mapping[str, float], selection: PruneOptions,
                     hf_compatible: bool) -> Optional[list]:
    """The groups of the kinds ``widths`` asks for, where only those can lose units (config fields
    alone, one width per kind, no global ranking); None (every group) otherwise. A kind kept whole
    needs no scores: scoring the residual stream of an LLM reads its every consumer, the LM head too."""
    if not hf_compatible or not widths or selection.sparsity or selection.global_ranking:
        return None
    return [g for k in kinds if k.field in widths for g in k.groups]


def _adapter() -> types.SimpleNamespace:
    """The steps fxprune.hf.structure and fxprune.hf.depth share with this module (handed in, so they
    do not import it back)."""
    return types.SimpleNamespace(without_cache=_without_cache, dynamic_shapes=_dynamic_shapes,
                                 check_outputs=_check_outputs, result=HFPruneResult, format=FORMAT)


class HiddenSizeReadError(VerificationError):
    """The rebuilt model differs only because its forward reads ``hidden_size`` as a number."""


def _prune_and_rebuild(model: Any, analysis: Analysis, scores: Mapping[str, torch.Tensor],
                       selection: PruneOptions, options: PruneOptions, widths: Mapping[str, float],
                       attention: Optional[hf_policy.Attention], inputs: tuple, hf_compatible: bool,
                       layer_indices: str, tolerance: Optional[float], recovery: "_Recovery",
                       whole_fields: Mapping[str, str]) -> HFPruneResult:
    notes: dict[str, str] = {}
    selector = functools.partial(_select, widths=widths, config=model.config, hf_compatible=hf_compatible,
                                 layer_indices=layer_indices, attention=attention, whole_fields=whole_fields,
                                 notes=notes)
    drop = selector(analysis, scores, selection)
    options = options.replace(hf={"hf_compatible": hf_compatible, "layer_indices": layer_indices,
                                  "constraints": notes})
    plan = make_plan(analysis, drop, options)
    structural = stages.rewrite_graph(analysis, drop, inputs, options)
    graph, reports = recovery.run(analysis, drop, structural, inputs)
    config, changes = new_config(model, analysis, drop, attention)
    pruned = _rebuild(model, config, analysis, plan, graph, recovered=bool(reports))
    try:
        error = _check_outputs(pruned, graph, inputs, tolerance)
    except VerificationError as exc:
        if hf_compatible and hf_policy.HIDDEN in changes and not whole_fields:
            raise HiddenSizeReadError(
                f"kept whole: {type(model).__name__}'s forward reads hidden_size as a number, not only as "
                f"a shape (Gemma scales its embeddings by sqrt(hidden_size)), so a config with a smaller "
                f"hidden_size computes something else ({exc})") from exc
        raise
    pruned.config.fxprune = _record(plan, changes, notes, error)
    result = PruneResult(graph, plan, analysis, drop, inputs, reports, structural if reports else None)
    return HFPruneResult(pruned, result, changes, error)


# --- input checks ---------------------------------------------------------------------------------
def _transformers():
    try:
        import transformers
    except ImportError as exc:  # an optional dependency
        raise ImportError("fxprune.hf needs transformers: pip install 'fxprune[hf]'") from exc
    return transformers


def _check_model(model: Any) -> None:
    transformers = _transformers()
    if not isinstance(model, transformers.PreTrainedModel):
        raise UnsupportedModelError(f"fxprune.hf prunes a transformers PreTrainedModel, got "
                                    f"{type(model).__name__}; use fxprune.prune for other models")
    if model.training:
        raise TrainingModeError(f"{type(model).__name__} is in training mode: its dropout would be "
                                f"exported into the graph. Call model.eval() first.")


#: The criterion with calibration when none is named: the best rows of ``benchmarks/bench_llm.py`` on
#: SmolLM2-135M (20% of the MLP: 1.21x dense against wanda's 1.24x; plus one of 3 KV groups: 1.66x
#: against wanda's 8.13x).
CALIBRATED_CRITERION = "energy"


def _warn_weight_criterion(model: Any, criterion: Criterion) -> None:
    """A weight criterion on a causal LM warns with the figure the benchmark measured."""
    if isinstance(criterion, str) and criterion not in DATA_CRITERIA and _is_causal_lm(model):
        warnings.warn(f"criterion {criterion!r} ranks units without data; on a real LLM a data-free "
                      f"criterion is catastrophic: {LLM_MEASURED}. Pass calibration= (token batches) for {CALIBRATED_CRITERION!r}.",
                      UserWarning, stacklevel=6)  # the caller of prune_with_result (past its wrapper)


#: The figure the magnitude warning quotes (written from benchmarks/bench_llm.md by hand).
LLM_MEASURED = ("on SmolLM2-135M-Instruct, 20% of the MLP width pruned by magnitude multiplied held-out "
                "perplexity by 11,366 ('energy' with 8x128 calibration tokens: 1.21x; benchmarks/bench_llm.md)")


def _is_causal_lm(model: Any) -> bool:
    return type(model).__name__.endswith("ForCausalLM") or type(model).__name__.endswith("LMHeadModel")


def _check_input_dtype(model: Any, inputs: tuple) -> None:
    """A floating example input must have the model's dtype (a bf16 model given fp32 pixel_values)."""
    for index, x in enumerate(inputs):
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != model.dtype:
            raise ExampleInputError(f"example input {index} is {x.dtype}, the model {model.dtype}: cast it "
                                    f"(x.to({model.dtype})) so the graph is traced at the model's precision")


@dataclass(frozen=True)
class _Recovery:
    """``recover=`` steps and their data, run on the pruned graph before the HF model is rebuilt."""

    steps: tuple
    calibration: Any
    progress: bool
    options: Mapping[str, Mapping[str, Any]]
    """Per step, its options (``reconstruct``: ``ridge``)."""

    def run(self, analysis: Analysis, drop: torch.Tensor, graph: torch.nn.Module, inputs: tuple) -> tuple:
        if not self.steps:
            return graph, ()
        reports, recovered = [], graph
        for name in self.steps:
            recovered, report = RECOVERY_STEPS[name].run(analysis, drop, recovered, self.calibration, self.progress,
                                                         **self.options.get(name, {}))
            reports.append(report)
        propagate_values(recovered, inputs, rewritten=True)
        return recovered, tuple(reports)


#: Step options this route defaults to, from ``benchmarks/bench_llm.md`` (SmolLM2, 20% of the MLP,
#: 8x128 calibration tokens): reconstruct's ridge 1e-3 overfits (14.65x dense: each down_proj has more
#: inputs than the calibration has tokens), 1 pulls the fit toward the kept weights enough (1.20x, from
#: 1.24x without reconstruct), 10 too much (1.28x).
LLM_STEP_OPTIONS = {"reconstruct": {"ridge": 1.0}}


def _recovery(recover: Any) -> tuple[tuple[str, ...], dict[str, dict[str, Any]]]:
    """``recover=`` as step names and per-step options: names, or ``{name: {option: value}}``
    (``{"reconstruct": {"ridge": 1.0}}``); options not given take :data:`LLM_STEP_OPTIONS`."""
    names = tuple(recover) if isinstance(recover, Mapping) else recover
    steps = recovery_steps(names)
    given = {step: dict(recover[name] or {}) for step, name in zip(steps, recover)} \
        if isinstance(recover, Mapping) else {}
    return steps, {step: {**LLM_STEP_OPTIONS.get(step, {}), **given.get(step, {})} for step in steps}


def _without_cache(model: Any) -> Any:
    """A view of the model whose ``forward`` passes ``use_cache=False`` (:func:`fxprune.core.capture.without_cache`)."""
    return without_cache(model)


def _dynamic_shapes(model: Any, inputs: tuple, dynamic_shapes: Any) -> Any:
    """The default marks batch and sequence dynamic; a learned position table bounds the sequence."""
    if dynamic_shapes != AUTO:
        return dynamic_shapes
    from fxprune.core.capture import default_dynamic_shapes
    spec = default_dynamic_shapes(inputs)
    limit = getattr(model.config, "max_position_embeddings", None)
    if spec is None or not isinstance(limit, int):
        return spec
    return tuple(_bounded(s, limit) for s in spec)


def _bounded(spec: Optional[dict], limit: int) -> Optional[dict]:
    if spec is None or 1 not in spec:
        return spec
    return {**spec, 1: torch.export.Dim(spec[1].__name__, min=1, max=limit)}


def _attention(model: Any) -> Optional[hf_policy.Attention]:
    config = model.config
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not isinstance(heads, int) or not isinstance(hidden, int):
        return None
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return hf_policy.Attention(heads, kv, head_dim, _honours_head_dim(model, head_dim))


def _honours_head_dim(model: Any, head_dim: int) -> bool:
    """Whether the modules read ``config.head_dim`` (LLaMA, Qwen, Mistral, Phi-3, Gemma) rather than
    derive it from ``hidden_size / num_attention_heads`` (GPT-2, BERT, ViT): build the model on the meta
    device with another ``head_dim`` and see whether any tensor changes shape."""
    probe = copy.deepcopy(model.config)
    probe.head_dim = head_dim * 2
    try:
        with torch.device("meta"):
            other = type(model)(probe)
    except Exception:  # a class that cannot be built with another head_dim does not honour it
        return False
    before = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return any(before.get(k) != tuple(v.shape) for k, v in other.state_dict().items())


# --- selection ------------------------------------------------------------------------------------
def _select(analysis: Analysis, scores: Mapping[str, torch.Tensor], options: PruneOptions, *,
            widths: Mapping[str, float], config: Any, hf_compatible: bool, layer_indices: str,
            attention: Optional[hf_policy.Attention], whole_fields: Mapping[str, str],
            notes: dict[str, str]) -> torch.Tensor:
    """A stage selector (:data:`fxprune.stages.Selector`): the ordinary selection, then one count per
    kind a config can hold; ``notes`` receives the constraint that shaped each group."""
    wished = select(analysis, scores, options)
    if not hf_compatible:
        return wished
    kinds = hf_policy.kinds(analysis, config, attention)
    decisions = hf_policy.decide(kinds, hf_policy.requested_keeps(analysis, wished), options, attention,
                                 whole_fields, widths)
    if layer_indices == "shared":
        scores = hf_policy.shared_scores(decisions, scores)
    notes.update({g.name: d.reason for d in decisions for g in d.kind.groups})
    return select(analysis, scores, options, hf_policy.drop_counts(decisions))


# --- the new config ---------------------------------------------------------------------------------
def new_config(model: Any, analysis: Analysis, drop: Dropped,
               attention: Optional[hf_policy.Attention]) -> tuple[Any, dict[str, tuple[Any, Any]]]:
    """The config that holds the plan, and what changed; ``ConfigMismatchError`` where none can."""
    config = copy.deepcopy(model.config)
    kept = hf_policy.requested_keeps(analysis, drop)
    changes: dict[str, tuple[Any, Any]] = {}
    for kind in hf_policy.kinds(analysis, config, attention):
        widths = {g.name: kept[g.name] for g in kind.groups}
        if all(w == kind.size for w in widths.values()):
            continue
        width = _common_width(kind, widths)
        for field, value in _fields(kind, width, model.config, attention).items():
            changes[field] = (_value(model.config, field), value)
    for field, (_, value) in changes.items():
        setattr(config, field, value)
    if {"num_attention_heads", "hidden_size"} & changes.keys() and attention is not None \
            and attention.explicit_head_dim:
        config.head_dim = attention.head_dim  # Qwen2, Phi-3, Mixtral derive it from both unless it is written
    _check_config(config)
    return config, changes


def _check_config(config: Any) -> None:
    """transformers' own checks of the new config, before anything is written (LLaMA's refuses a
    hidden size that is not a multiple of the head count, even with head_dim written)."""
    try:
        config.validate()
    except Exception as exc:  # transformers raises its own validation errors
        cause = exc.__cause__ or exc
        raise ConfigMismatchError(f"transformers refuses the pruned config: {str(cause).strip()[:300]} "
                                  f"(choose a sparsity whose widths it accepts)") from exc


def _common_width(kind: hf_policy.Kind, widths: Mapping[str, int]) -> int:
    if not kind.field:
        name, width = next((n, w) for n, w in widths.items() if w != kind.size)
        raise ConfigMismatchError(
            f"group {name!r} was pruned from {kind.size} to {width} units, a width no field of the "
            f"config holds (e.g. a part of each attention head); use hf_compatible=True, which prunes "
            f"whole heads and only widths a config holds")
    if len(set(widths.values())) > 1:
        shown = ", ".join(f"{n}: {w}" for n, w in list(widths.items())[:4])
        raise ConfigMismatchError(
            f"{kind.field} would differ between layers ({shown}; of {kind.size}), and a config holds one "
            f"{kind.field}: use hf_compatible=True (one width per kind, the default), or the same ratio "
            f"for every layer")
    return next(iter(widths.values()))


def _fields(kind: hf_policy.Kind, width: int, config: Any,
            attention: Optional[hf_policy.Attention]) -> dict[str, int]:
    if kind.field != hf_policy.HEADS:
        return {kind.field: width}
    fields = {"num_attention_heads": width * attention.per_unit}
    if getattr(config, "num_key_value_heads", None) is not None:
        fields["num_key_value_heads"] = width
    return fields


def _value(config: Any, field: str) -> Any:
    return hf_policy.intermediate_of(config, field) if field in hf_policy.INTERMEDIATE_FIELDS else \
        getattr(config, field)


# --- the new model --------------------------------------------------------------------------------
def _rebuild(model: Any, config: Any, analysis: Analysis, plan, graph: torch.nn.Module, recovered: bool = False) -> Any:
    """A fresh model of the same class from ``config`` that takes the pruned ``graph``'s tensors by their
    state_dict names, each without a copy where dtype and device match: the graph's tensors are new
    (never the user's), so the model and the graph share one copy of the pruned weights instead of
    holding two (the rebuild doubled the pruned model's memory, in fp32 and bf16 alike). A name the
    graph does not hold (a buffer the forward never reads) is the original's sliced per the plan,
    copied. With ``recovered``, also the biases recovery added, through the config flag that holds them."""
    from transformers.initialization import no_init_weights  # skips the random init we overwrite
    original = model.state_dict()
    sources = {key: functools.partial(sliced_tensor, tensor, plan.kept_indices.get(analysis.aliases.get(key, key), {}))
               for key, tensor in original.items()}
    shared = (calibrated.recovered_sources if recovered else calibrated.graph_sources)(graph, set(original))
    # a tied name (the LM head of a tied embedding) reads the tensor the graph holds under its other name
    shared.update({alias: shared[name] for alias, name in analysis.aliases.items()
                   if name in shared and alias in original and alias not in shared})
    sources.update(shared)
    if recovered:
        flags = calibrated.bias_flags(model, [k for k in sources if k not in original])
        config = copy.deepcopy(config)
        for flag, value in flags.items():
            setattr(config, flag, value)
    try:
        with no_init_weights():
            new = type(model)._from_config(config, dtype=model.dtype)
    except Exception as exc:
        raise UnsupportedModelError(f"{type(model).__name__}.from_config could not rebuild the model from "
                                    f"the pruned config: {type(exc).__name__}: {str(exc)[:300]}") from exc
    _write_state(new, sources, set(shared), zero_biases=recovered, name=type(model).__name__)
    calibrated.retie(new, model)
    return new.to(model.device).eval()


def _write_state(new: Any, sources: Mapping[str, Callable[[], torch.Tensor]], shared: set[str], zero_biases: bool,
                 name: str) -> None:
    """Every tensor of ``new`` written from its source, one at a time: a source in ``shared`` (the pruned
    graph's) is taken as it is where it fits (:func:`_fits`), any other copied; a bias a recovery flag
    added and recovery did not set is zero. Names or shapes that differ are a :class:`ConfigMismatchError`."""
    expected = new.state_dict()
    added = {k for k in expected if k not in sources and zero_biases and k.endswith(".bias")}
    differ = sorted((set(expected) - added) ^ set(sources))
    if differ:
        raise ConfigMismatchError(f"the rebuilt {name} and the pruned state_dict name different tensors, "
                                  f"first {differ[:3]}")
    with torch.no_grad():
        for key, target in expected.items():
            if key in added:
                target.zero_()
                continue
            value = sources[key]()
            if tuple(value.shape) != tuple(target.shape):
                raise ConfigMismatchError(
                    f"the pruned config builds {key!r} of shape {list(target.shape)}, the plan keeps "
                    f"{list(value.shape)}: {name}'s config cannot hold this plan (use hf_compatible=True)")
            if key in shared and _fits(value, target):
                _take(new, key, value)
            else:
                target.copy_(value)
            del value


def _fits(value: torch.Tensor, target: torch.Tensor) -> bool:
    """Whether ``value`` can stand in for ``target`` as it is: same dtype and device, contiguous and the
    whole of its storage (safetensors, behind ``save_pretrained``, writes contiguous tensors that share
    no memory; a view would also keep the rest of its storage alive)."""
    whole = value.untyped_storage().nbytes() == value.numel() * value.element_size()
    return value.dtype == target.dtype and value.device == target.device and value.is_contiguous() and whole


def _take(model: torch.nn.Module, key: str, value: torch.Tensor) -> None:
    """``model``'s tensor ``key`` becomes ``value``'s storage: a new Parameter over it (as trainable as
    the one it replaces) for a parameter, ``value`` itself for a buffer.

    >>> _take(model, "lm_head.weight", graph_weight)   # doctest: +SKIP
    """
    owner, _, attr = key.rpartition(".")
    module = model.get_submodule(owner)
    if attr in module._parameters:  # (state_dict()'s tensors are detached: their requires_grad is False)
        module._parameters[attr] = torch.nn.Parameter(value, requires_grad=module._parameters[attr].requires_grad)
    else:
        module._buffers[attr] = value


def sliced_tensor(tensor: torch.Tensor, dims: Mapping[int, Sequence[int]]) -> torch.Tensor:
    """``tensor`` with the kept indices of each of its pruned ``dims`` selected (a detached view if none)."""
    for dim, index in sorted(dims.items()):
        tensor = tensor.index_select(int(dim), torch.tensor(list(index), dtype=torch.long, device=tensor.device))
    return tensor.detach()


def sliced_state_dict(state: Mapping[str, torch.Tensor], kept: Mapping[str, Mapping[int, Sequence[int]]],
                      aliases: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Every tensor of ``state`` with the plan's kept indices selected (each sliced tensor a new one; an
    unsliced one a detached view of ``state``'s)."""
    return {key: sliced_tensor(tensor, kept.get(aliases.get(key, key), {})) for key, tensor in state.items()}


def _check_outputs(pruned: Any, graph: torch.nn.Module, inputs: tuple, tolerance: Optional[float]) -> float:
    """The HF model must compute what the pruned graph computes (never a model that runs but differs)."""
    with torch.no_grad():
        ours = _leaves(_without_cache(pruned)(*inputs))
        theirs = _leaves(graph(*inputs))
    if len(ours) != len(theirs):
        raise VerificationError(f"the rebuilt model returns {len(ours)} tensors, the pruned graph "
                                f"{len(theirs)}")
    shapes = [(tuple(a.shape), tuple(b.shape)) for a, b in zip(ours, theirs) if a.shape != b.shape]
    if shapes:
        raise VerificationError(f"the rebuilt model returns a tensor of shape {shapes[0][0]}, the pruned graph "
                                f"{shapes[0][1]}")
    error = max((_max_abs(a, b) for a, b in zip(ours, theirs) if a.numel()), default=0.0)
    scale = max((_max_abs(b) for b in theirs if b.numel()), default=1.0)
    limit = tolerance if tolerance is not None else calibrated.tolerance(pruned.dtype, scale)
    if not error <= limit:
        raise VerificationError(f"the rebuilt {type(pruned).__name__} differs from the pruned graph by "
                                f"{error:.3g} (tolerance {limit:.3g}); this is a bug in fxprune.hf")
    return error


def _max_abs(a: torch.Tensor, b: Optional[torch.Tensor] = None, rows: int = 8) -> float:
    """``max |a - b|`` (or ``max |a|``) in float32, a few rows at a time: an LM's logits are never
    copied whole in float32 beside themselves (in bf16 that copy outweighed the rest of the check; 8
    rows of a 49,152-token vocabulary are 1.5 MB a temporary, 64 rows were 12.6 MB, four temporaries).

    >>> _max_abs(torch.ones(3, 4), torch.zeros(3, 4))
    1.0
    """
    a = a.reshape(-1, a.shape[-1]) if a.dim() > 1 else a.reshape(1, -1)
    pairs = zip(a.split(rows), b.reshape(a.shape).split(rows)) if b is not None else ((x, None) for x in a.split(rows))
    return max(float((x.float() if y is None else x.float() - y.float()).abs().max()) for x, y in pairs)


def _leaves(output: Any) -> list[torch.Tensor]:
    values = output.to_tuple() if hasattr(output, "to_tuple") else output
    return [x for x in torch.utils._pytree.tree_leaves(values) if isinstance(x, torch.Tensor)]


def _record(plan, changes: Mapping[str, tuple[Any, Any]], notes: Mapping[str, str], error: float) -> dict:
    """What ``config.fxprune`` holds (JSON, saved in config.json): what changed and why."""
    return {"format": FORMAT,
            "changes": {k: [a, b] for k, a, b in ((k, *v) for k, v in changes.items())},
            "groups": {g.name: [g.size, g.kept] for g in plan.groups if g.kept < g.size},
            "constraints": dict(notes),
            "options": {k: v for k, v in plan.options.to_dict().items() if k != "hf"},
            "max_abs_error_vs_graph": error}


__all__ = ["prune", "prune_with_result", "HFPruneResult", "new_config", "sliced_state_dict"]
