"""Passes and pipelines: ``GraphModule -> GraphModule`` steps, named, typed, printable and parseable.

A pass is a **frozen dataclass**: a class-level kebab-case ``name``, its options as typed fields (each
with a docstring), and ``__call__(gm) -> PassResult`` — torch's ``torch.fx.passes.infra.pass_base``
contract, so every pass drops straight into ``torch.fx.passes.infra.pass_manager.PassManager``. A pass
never edits its input: :meth:`Pass.apply` builds a new GraphModule, and ``PassResult.modified`` is
*computed* by comparing the output with the input (code, module attributes, tensor names, shapes,
dtypes and values), never declared by the pass.

Passes read the example inputs they need (to re-trace shapes) from the graph itself: the traced value
that :func:`fxprune.core.capture.capture` leaves on every placeholder (``node.meta["val"]``) becomes a zero
tensor of the same shape and dtype (:func:`placeholder_zeros`). So the input of a pipeline is a *captured*
GraphModule, and every pass returns one with fresh traced values, ready for the next pass.

A :class:`Pipeline` is a frozen tuple of passes. It parses from, and prints to, a one-line spec in the
style of MLIR / xDSL pass pipelines::

    prune-channels{sparsity=0.5,criterion=l1},fold-batchnorm
    prune-channels{sparsity=0.3,ignore=[fc,layer4.*]},dead-channels
    apply-plan{plan_json="{\\"format\\": ...}"}

Option values are parsed by the field's type (``float``, ``int``, ``bool`` as ``true``/``false``,
``str``, ``tuple[str, ...]`` as ``[a,b]``); a string with spaces or any of ``,{}[]="`` is written as a
JSON string. Printing omits options left at their default, so ``Pipeline.parse(str(p)) == p``.

>>> from fxprune import capture
>>> gm = capture(model, (x,)).gm                                                       # doctest: +SKIP
>>> pipeline = Pipeline.parse("fold-batchnorm,prune-channels{sparsity=0.5}")          # doctest: +SKIP
>>> result = pipeline(gm, hook=lambda p, before, after: print(p))                     # doctest: +SKIP
"""
from __future__ import annotations

import abc
import copy
import dataclasses
import json
import re
import typing
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Mapping, Optional, Sequence

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxprune.core.meta import PRUNED_PLAN_KEY
from fxprune.errors import CalibrationError, InvalidOptionError, PipelineError
from fxprune.stages import RunData

__all__ = ["Pass", "PassResult", "Pipeline", "register", "registered_passes", "placeholder_zeros",
           "refresh_values", "graph_changed"]

Hook = Callable[["Pass", fx.GraphModule, fx.GraphModule], None]

_KEBAB = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
_WORD = re.compile(r'[^\s,{}\[\]="]+')  # a name, or a value written without quotes
PASSES: dict[str, type["Pass"]] = {}


# --- the pass contract --------------------------------------------------------------------------
@dataclass(frozen=True)
class Pass(PassBase):
    """A pure ``GraphModule -> GraphModule`` step; subclasses are frozen dataclasses.

    Subclasses set ``name``, declare their options as typed fields with defaults and docstrings,
    implement :meth:`apply`, and may check option values in :meth:`validate` (raising
    :class:`~fxprune.errors.InvalidOptionError`).
    """

    name: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False
    """True for passes that read calibration data (bound with :meth:`with_calibration`)."""

    def with_calibration(self, calibration: Any, source: Any = None) -> "Pass":
        """This pass with run-time data bound: ``calibration`` batches and ``source``, the graph the
        last pruning pass received. Passes that read no data return themselves."""
        return self

    def __post_init__(self) -> None:
        types = _field_types(type(self))
        for f in dataclasses.fields(self):  # normalise (int -> float, list -> tuple) or refuse
            object.__setattr__(self, f.name, _checked(self, f.name, types[f.name], getattr(self, f.name)))
        self.validate()

    def validate(self) -> None:
        """Check option values; called once the dataclass is built."""

    @abc.abstractmethod
    def apply(self, gm: fx.GraphModule) -> fx.GraphModule:
        """The new GraphModule; ``gm`` must be left exactly as it was."""

    def requires(self, graph_module: fx.GraphModule) -> None:
        """Passes re-trace shapes from the placeholders' traced values: the graph must be captured."""
        placeholder_zeros(graph_module)

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        out = self.apply(graph_module)
        return PassResult(out, graph_changed(graph_module, out))

    def __call__(self, graph_module: fx.GraphModule) -> PassResult:
        if not isinstance(graph_module, fx.GraphModule):
            raise PipelineError(f"pass {self.name!r} takes a GraphModule, got {type(graph_module).__name__}; "
                                f"capture it first: fxprune.core.capture.capture(model, inputs, level).gm")
        self.requires(graph_module)
        result = self.call(graph_module)
        self.ensures(result.graph_module)  # torch's PassBase hands ensures() the input, not the result
        return result

    def options(self, include_defaults: bool = False) -> dict[str, Any]:
        """The option values, in field order (only those differing from their default by default)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if include_defaults or not _is_default(f, getattr(self, f.name))}

    def spec(self, include_defaults: bool = False) -> str:
        """``name{option=value,...}``, what :meth:`Pipeline.parse` reads back."""
        options = self.options(include_defaults)
        if not options:
            return self.name
        return self.name + "{" + ",".join(f"{k}={format_value(v)}" for k, v in options.items()) + "}"

    def __str__(self) -> str:
        return self.spec()


def _is_default(f: dataclasses.Field, value: Any) -> bool:
    if f.default is not dataclasses.MISSING:
        return value == f.default
    if f.default_factory is not dataclasses.MISSING:
        return value == f.default_factory()
    return False


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass known to :meth:`Pipeline.parse` by its ``name``."""
    if not (isinstance(cls, type) and issubclass(cls, Pass) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"{cls!r} is not a Pass dataclass")
    if not _KEBAB.match(cls.name or ""):
        raise ValueError(f"pass {cls.__name__} needs a kebab-case class-level name, got {cls.name!r}")
    if cls.name in PASSES and PASSES[cls.name] is not cls:
        raise ValueError(f"pass name {cls.name!r} is taken by {PASSES[cls.name].__qualname__}")
    if not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        raise TypeError(f"pass {cls.name!r} must be a frozen dataclass")
    for f in dataclasses.fields(cls):
        _parser_for(cls, f.name, _field_types(cls)[f.name])  # an unsupported option type fails here
    PASSES[cls.name] = cls
    return cls


def registered_passes() -> dict[str, type[Pass]]:
    """Every registered pass by name (the library in ``fxprune.passes`` included: importing fxprune
    imports it, and its modules register themselves)."""
    return dict(PASSES)


# --- run-time data ------------------------------------------------------------------------------
def bind_run_data(p: "Pass", calibration: Any, source: Any = None) -> "Pass":
    """A copy of ``p`` carrying ``RunData(calibration, source)`` (read back with :func:`run_data`); the
    copy is not rebuilt, so its options are not checked again.

    >>> bound = bind_run_data(PruneChannels(criterion="wanda"), loader)   # doctest: +SKIP
    >>> run_data(bound).calibration is loader                             # doctest: +SKIP
    True
    """
    bound = copy.copy(p)
    object.__setattr__(bound, "_run_data", RunData(calibration, source=source))  # frozen: set past the guard
    return bound


def run_data(p: "Pass") -> RunData:
    """The data bound to ``p`` with :func:`bind_run_data` (an empty :class:`RunData` if none)."""
    return p.__dict__.get("_run_data", RunData())


# --- option types -------------------------------------------------------------------------------
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_str_tuple(tp: Any) -> bool:
    return typing.get_origin(tp) is tuple and typing.get_args(tp) in ((str, ...), (str, Ellipsis))


def _checked(p: Pass, option: str, tp: Any, value: Any) -> Any:
    """``value`` as the field's type (int -> float, list -> tuple) or InvalidOptionError."""
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if _is_str_tuple(tp) and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    if tp in (float, int, str, bool) and isinstance(value, tp) and (tp is bool or not isinstance(value, bool)):
        return value
    raise InvalidOptionError(f"option {option!r} of pass {p.name!r} must be {_type_name(tp)}, got {value!r}")


def _type_name(tp: Any) -> str:
    names = {float: "a float", int: "an int", bool: "true or false", str: "a string"}
    return "a list of strings" if _is_str_tuple(tp) else names.get(tp, repr(tp))


def _parser_for(cls: type, option: str, tp: Any) -> Callable[[Any], Any]:
    parsers: dict[Any, Callable[[Any], Any]] = {float: _parse_float, int: _parse_int, bool: _parse_bool,
                                                str: _parse_str}
    if tp in parsers:
        return parsers[tp]
    if _is_str_tuple(tp):
        return _parse_str_tuple
    raise TypeError(f"option {option!r} of {cls.__name__} has type {tp!r}; a pass option is a float, "
                    f"int, bool, str or tuple[str, ...]")


def _scalar(raw: Any, what: str) -> str:
    if not isinstance(raw, str):
        raise ValueError(f"expected {what}, got a list")
    return raw


def _parse_float(raw: Any) -> float:
    return float(_scalar(raw, "a float"))


def _parse_int(raw: Any) -> int:
    return int(_scalar(raw, "an int"))


def _parse_bool(raw: Any) -> bool:
    text = _scalar(raw, "true or false").lower()
    if text not in ("true", "false"):
        raise ValueError("expected true or false")
    return text == "true"


def _parse_str(raw: Any) -> str:
    return _scalar(raw, "a string")


def _parse_str_tuple(raw: Any) -> tuple[str, ...]:
    return tuple(raw) if isinstance(raw, list) else (raw,)


def format_value(value: Any) -> str:
    """An option value as the spec writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return value if _WORD.fullmatch(value) else json.dumps(value)


# --- the spec grammar ---------------------------------------------------------------------------
class _Reader:
    """``pipeline := pass (',' pass)*``; ``pass := NAME ['{' option (',' option)* '}']``;
    ``option := KEY '=' value``; ``value := scalar | '[' scalar (',' scalar)* ']'``;
    ``scalar := bare | json-string``."""

    def __init__(self, text: str):
        self.text, self.at = text, 0

    def fail(self, what: str) -> PipelineError:
        return PipelineError(f"bad pipeline spec at column {self.at}: {what}\n  {self.text}\n  "
                             f"{' ' * self.at}^")

    def skip(self) -> None:
        while self.at < len(self.text) and self.text[self.at].isspace():
            self.at += 1

    def peek(self) -> str:
        self.skip()
        return self.text[self.at: self.at + 1]

    def expect(self, char: str) -> None:
        if self.peek() != char:
            raise self.fail(f"expected {char!r}")
        self.at += 1

    def word(self, what: str) -> str:
        self.skip()
        m = _WORD.match(self.text, self.at)
        if not m:
            raise self.fail(f"expected {what}")
        self.at = m.end()
        return m.group()

    def scalar(self) -> str:
        if self.peek() != '"':
            return self.word("a value")
        try:
            value, self.at = json.JSONDecoder().raw_decode(self.text, self.at)
        except ValueError as exc:
            raise self.fail(f"unterminated or malformed string ({exc.msg})") from None
        return value

    def value(self) -> Any:
        if self.peek() != "[":
            return self.scalar()
        self.expect("[")
        items = [] if self.peek() == "]" else self.items(self.scalar)
        self.expect("]")
        return items

    def items(self, read: Callable[[], Any]) -> list:
        out = [read()]
        while self.peek() == ",":
            self.at += 1
            out.append(read())
        return out

    def option(self) -> tuple[str, Any]:
        key = self.word("an option name")
        self.expect("=")
        return key, self.value()

    def one_pass(self) -> tuple[str, list[tuple[str, Any]]]:
        name = self.word("a pass name")
        if self.peek() != "{":
            return name, []
        self.expect("{")
        options = [] if self.peek() == "}" else self.items(self.option)
        self.expect("}")
        return name, options

    def pipeline(self) -> list[tuple[str, list[tuple[str, Any]]]]:
        if not self.peek():
            return []
        passes = self.items(self.one_pass)
        if self.peek():
            raise self.fail("expected ',' or the end of the spec")
        return passes


def build_pass(name: str, raw_options: Sequence[tuple[str, Any]],
               registry: Optional[Mapping[str, type[Pass]]] = None) -> Pass:
    """The pass ``name`` with options parsed from their spec text; PipelineError names what is wrong."""
    registry = registered_passes() if registry is None else registry
    if name not in registry:
        raise PipelineError(f"unknown pass {name!r}; known passes: {sorted(registry)}")
    cls = registry[name]
    types = _field_types(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, raw in raw_options:
        if key not in known:
            raise PipelineError(f"pass {name!r} has no option {key!r}; its options: {known}")
        if key in kwargs:
            raise PipelineError(f"option {key!r} of pass {name!r} is given twice")
        kwargs[key] = _parse_option(cls, key, types[key], raw)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise PipelineError(f"pass {name!r} needs option(s) {missing}")
    try:
        return cls(**kwargs)
    except InvalidOptionError as exc:
        raise PipelineError(f"pass {name!r}: {exc}") from exc


def _parse_option(cls: type[Pass], key: str, tp: Any, raw: Any) -> Any:
    try:
        return _parser_for(cls, key, tp)(raw)
    except ValueError as exc:
        raise PipelineError(f"option {key!r} of pass {cls.name!r} expects {_type_name(tp)}, got "
                            f"{raw!r} ({exc})") from None


# --- pipelines ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pipeline:
    """Passes run in order, each on the previous one's output; itself a pass for ``PassManager``.

    >>> p = Pipeline.parse("prune-channels{sparsity=0.5,criterion=l2},fold-batchnorm")   # doctest: +SKIP
    >>> str(p)                                                                             # doctest: +SKIP
    'prune-channels{sparsity=0.5,criterion=l2},fold-batchnorm'
    """

    passes: tuple[Pass, ...] = ()
    """The passes, in the order they run."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "passes", tuple(self.passes))
        for p in self.passes:
            if not isinstance(p, Pass):
                raise PipelineError(f"a pipeline holds Pass instances, got {p!r}")

    @classmethod
    def parse(cls, spec: str, registry: Optional[Mapping[str, type[Pass]]] = None) -> "Pipeline":
        """Read ``"name{option=value,...},name,..."``; unknown names and ill-typed options are refused."""
        if not isinstance(spec, str):
            raise PipelineError(f"a pipeline spec is a string, got {type(spec).__name__}")
        return cls(tuple(build_pass(name, options, registry) for name, options in _Reader(spec).pipeline()))

    def spec(self, include_defaults: bool = False) -> str:
        return ",".join(p.spec(include_defaults) for p in self.passes)

    def __str__(self) -> str:
        return self.spec()

    def __iter__(self) -> Iterator[Pass]:
        return iter(self.passes)

    def __len__(self) -> int:
        return len(self.passes)

    def __call__(self, gm: fx.GraphModule, hook: Optional[Hook] = None, calibration: Any = None) -> PassResult:
        """Run every pass; ``hook(pass_, before, after)`` sees each step. A failure names the pass
        and the passes that ran before it (the original error is the ``__cause__``). An empty
        pipeline returns its input, unmodified. ``calibration`` (any iterable of batches) is handed
        to the passes that read data (recovery), with the graph the last pruning pass received."""
        needy = [str(p) for p in self.passes if p.needs_calibration]
        if needy and calibration is None:
            raise CalibrationError(f"pass {needy[0]!r} needs calibration data: pipeline(gm, calibration=loader)")
        modified, source = False, gm
        for index, p in enumerate(self.passes):
            before = gm
            try:
                result = p.with_calibration(calibration, source)(before) if p.needs_calibration else p(before)
            except Exception as exc:
                raise self._failure(index, exc) from exc
            if result.graph_module.meta.get(PRUNED_PLAN_KEY) != getattr(before, "meta", {}).get(PRUNED_PLAN_KEY):
                source = before  # a pruning pass ran: recovery compares with its input
            gm, modified = result.graph_module, modified or result.modified
            if hook is not None:
                hook(p, before, gm)
        return PassResult(gm, modified)

    def _failure(self, index: int, exc: Exception) -> PipelineError:
        done = [str(p) for p in self.passes[:index]]
        after = f"after {done}" if done else "as the first pass"
        kind = type(exc).__name__
        error = PipelineError(f"pass {str(self.passes[index])!r} (#{index + 1} of {len(self.passes)}) "
                              f"failed {after}: {kind}: {exc}")
        error.pass_ = self.passes[index]  # type: ignore[attr-defined]
        error.completed = self.passes[:index]  # type: ignore[attr-defined]
        return error


# --- helpers the passes share -------------------------------------------------------------------
def _traced_value(node: fx.Node) -> Any:
    for key in ("val", "tensor_meta"):
        if node.meta.get(key) is not None:
            return node.meta[key]
    raise PipelineError(f"placeholder {node.name!r} has no traced value (node.meta['val']); capture the "
                        f"graph first: fxprune.core.capture.capture(model, example_inputs, level).gm")


def _zeros_like(node: fx.Node, value: Any) -> Any:
    if not hasattr(value, "shape"):
        return value  # a non-tensor input (an int) is passed as traced
    shape = tuple(value.shape)
    if not all(isinstance(s, int) for s in shape):
        raise PipelineError(f"placeholder {node.name!r} has a symbolic shape {shape}; fxprune passes "
                            f"need static shapes")
    return torch.zeros(shape, dtype=value.dtype, device=getattr(value, "device", "cpu"))


def placeholder_zeros(gm: fx.GraphModule) -> tuple:
    """Zero tensors shaped like the placeholders' traced values: the inputs a pass re-traces with.

    Fake values cannot feed the fake-tensor propagation of a new mode, and the values do not matter
    for shapes, so zeros of the same shape, dtype and device stand in for the example inputs.
    """
    return tuple(_zeros_like(n, _traced_value(n)) for n in gm.graph.find_nodes(op="placeholder"))


def record_plan(gm: fx.GraphModule, plan: Any) -> fx.GraphModule:
    """Record on ``gm`` (a pruning pass's own new output) the plan that pruned it."""
    gm.meta[PRUNED_PLAN_KEY] = plan.to_json(indent=None)
    return gm


def refresh_values(gm: fx.GraphModule) -> fx.GraphModule:
    """Record fresh traced values on ``gm`` (a pass's own new output) from its placeholders'."""
    from fxprune.core.capture import propagate_values
    propagate_values(gm, placeholder_zeros(gm), rewritten=True)
    return gm


def graph_changed(before: torch.nn.Module, after: torch.nn.Module) -> bool:
    """Whether a pass changed anything: code, module attributes, or any tensor's name, shape, dtype
    or value. Cheap checks first; values are compared only when everything else is equal."""
    if getattr(before, "code", None) != getattr(after, "code", None):
        return True
    if _module_lines(before) != _module_lines(after):
        return True
    a, b = _tensors(before), _tensors(after)
    if a.keys() != b.keys():
        return True
    if any(a[k].shape != b[k].shape or a[k].dtype != b[k].dtype for k in a):
        return True
    return not all(torch.equal(a[k], b[k]) for k in a)


def _module_lines(module: torch.nn.Module) -> list[str]:
    """Every submodule's class and size attributes (the root's class name is not the model's)."""
    return [f"{n}: {type(m).__name__}({m.extra_repr()})" for n, m in module.named_modules() if n]


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = dict(module.named_parameters(remove_duplicate=False))
    out.update(module.named_buffers(remove_duplicate=False))
    return {k: v.detach() for k, v in out.items()}
