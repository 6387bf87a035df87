"""Calibration: ``(GraphModule, batches) -> Statistics``, one more pure stage.

Calibration data is any iterable of batches — a ``DataLoader`` yielding ``(inputs, target)`` pairs,
plain tensors, tuples of model inputs, HuggingFace-style dicts — and :class:`Calibration` says which
part of a batch the model takes (``inputs=``), which part a loss compares with (``target=``) and how
many batches to read (``max_batches=``). :func:`iter_batches` turns it into model-input tuples.

Padding: a batch may say which of its ``(batch, sequence)`` positions are real tokens (``mask=``; by
default a dict batch's ``attention_mask``). The mask follows the tokens through the graph: at every
watched node, the positions whose dims are the batch's ``(batch, sequence)`` dims (a hidden state
``(batch, sequence, channels)``, a flattened ``(batch·sequence, channels)``, attention's ``(batch,
heads, sequence, ...)``) are read only where the mask is 1, and every statistic — moments, Gram
matrices, counts — sums over real tokens only and is normalised by their count (:func:`token_rows`).
The graph itself still computes the padded positions; for a causal model with the real tokens first in
each row (right padding) they never reach a real token, so statistics equal those of the unpadded
sequences (``fxprune.hf`` moves left-padded tokens first).

Statistics are gathered by running the captured graph (fx or export level alike) one batch at a time
with an ``fx.Interpreter``, which frees every activation after its last use: nothing holds more than
one batch of activations. What is kept are *sums* (:class:`Sums`): per channel of each watched node,
the element count, sum, sum of squares and sum of absolute values, and for chosen consumers (a conv
or linear) the Gram matrix ``XᵀX`` of their inputs as the weight sees them (a conv's unfolded
patches). Sums add over batches, and over ranks: when a ``torch.distributed`` process group is
initialised, :meth:`Sums.all_reduce` sums them with torch's own ``all_reduce``.

>>> calib = fxprune.Calibration(loader, inputs=0, max_batches=16)        # doctest: +SKIP
>>> result = fxprune.prune(model, (x,), criterion="wanda", calibration=calib)  # doctest: +SKIP
>>> stats = collect(analysis.gm, calib, calibration_sites(analysis))     # doctest: +SKIP
>>> stats.mean_abs("relu")                                                # doctest: +SKIP
tensor([0.41, 0.02, ...], dtype=torch.float64)
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Optional, Sequence, Union

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxprune.core.capture import MutableArgs
from fxprune.errors import CalibrationError, InvalidOptionError, NonFiniteActivationError
from fxprune.progress import progress_bar

Selector = Union[None, int, str, Sequence[Union[int, str]], Callable[[Any], Any]]


# --- batches --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Calibration:
    """Calibration data and how to read it.

    >>> Calibration(loader)                                   # (x, y) pairs: x is the input  # doctest: +SKIP
    >>> Calibration(hf_loader, inputs=("input_ids",), target="labels", max_batches=8)  # doctest: +SKIP
    """

    data: Iterable
    """Any iterable of batches; a one-shot iterator (a generator) can be read once only."""
    inputs: Selector = None
    """The model inputs of a batch: an index, a dict key, a sequence of them, or a callable
    ``batch -> tensor | tuple``. Default: a tensor batch is the input; a tuple's first item (all of
    its items when the graph takes more than one input, or the first item itself when that is a
    tuple); a dict's ``input_ids``."""
    target: Selector = None
    """What a loss compares the output with (``taylor`` and ``hessian``), read like ``inputs``.
    Default: a tuple's last item, a dict's ``labels``, none for a tensor batch."""
    max_batches: Optional[int] = None
    """Read at most this many batches (default: all)."""
    mask: Selector = None
    """Which ``(batch, sequence)`` positions of a batch are real tokens (1) and which are padding (0),
    read like ``inputs``. Default: a dict's ``attention_mask``, none otherwise. Padded positions are
    left out of every statistic."""

    def __post_init__(self) -> None:
        if self.max_batches is not None and (isinstance(self.max_batches, bool)
                                             or not isinstance(self.max_batches, int) or self.max_batches < 1):
            raise InvalidOptionError(f"max_batches must be a positive int or None, got {self.max_batches!r}")
        if isinstance(self.data, (torch.Tensor, str, bytes, Mapping)) or not isinstance(self.data, Iterable):
            raise CalibrationError(f"calibration data must be an iterable of batches (a DataLoader, a list "
                                   f"of tensors or tuples), got {type(self.data).__name__}")

    def batches(self, n_inputs: int = 1) -> Iterator[tuple]:
        """Model-input tuples, one per batch (see :func:`iter_batches`)."""
        for _, inputs, _ in self.pairs(n_inputs):
            yield inputs

    def pairs(self, n_inputs: int = 1, allow_empty: bool = False) -> Iterator[tuple[int, tuple, Any]]:
        """``(batch index, model inputs, target)`` per batch; at least one batch (unless
        ``allow_empty``: one rank of several may hold none) or a CalibrationError."""
        for index, inputs, target, _ in self.read(n_inputs, allow_empty):
            yield index, inputs, target

    def read(self, n_inputs: int = 1, allow_empty: bool = False) -> Iterator["Batch"]:
        """:meth:`pairs` with each batch's token mask (:func:`check_mask`: None when every position is
        a real token)."""
        index = 0
        for batch in self.data:  # not enumerate(): it keeps its last (index, batch) tuple alive
            if self.max_batches is not None and index >= self.max_batches:
                break
            inputs = _as_tuple(_select(batch, self.inputs, index, n_inputs, "inputs"), index, "inputs")
            mask = check_mask(_mask(batch, self.mask, index), inputs, index)
            yield Batch(index, inputs, _target(batch, self.target, index), mask)
            del batch, inputs, mask  # not held while the next batch is fetched
            index += 1
        if index == 0 and not allow_empty:
            raise empty_error(self.data)


class Batch(NamedTuple):
    """One calibration batch as the stages read it."""

    index: int
    inputs: tuple
    target: Any
    mask: Optional[torch.Tensor]
    """``(batch, sequence)`` bool, True at real tokens; None when every position is one."""


def empty_error(data: Any) -> CalibrationError:
    once = " (a one-shot iterator such as a generator is empty once read: pass a list or a " \
           "DataLoader when the data is read more than once)" if isinstance(data, Iterator) else ""
    return CalibrationError(f"calibration data yielded no batches{once}")


def as_calibration(data: Any) -> Calibration:
    """``data`` itself if it is a :class:`Calibration`, else ``Calibration(data)``."""
    return data if isinstance(data, Calibration) else Calibration(data)


def iter_batches(data: Any, *, inputs: Selector = None, max_batches: Optional[int] = None,
                 n_inputs: int = 1) -> Iterator[tuple]:
    """The model-input tuple of each batch of ``data``; ``n_inputs`` is how many inputs the model takes.

    >>> loader = [(torch.randn(4, 3, 8, 8), torch.zeros(4)) for _ in range(3)]
    >>> [x[0].shape for x in iter_batches(loader, max_batches=2)]
    [torch.Size([4, 3, 8, 8]), torch.Size([4, 3, 8, 8])]
    """
    calibration = Calibration(data, inputs, None, max_batches) if not isinstance(data, Calibration) else data
    return calibration.batches(n_inputs)


def _select(batch: Any, selector: Selector, index: int, n_inputs: int, what: str) -> Any:
    if callable(selector):
        return selector(batch)
    if isinstance(selector, (list, tuple)):
        return tuple(_item(batch, s, index, what) for s in selector)
    if selector is not None:
        return _item(batch, selector, index, what)
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        return _item(batch, "input_ids", index, what)
    if isinstance(batch, (list, tuple)) and batch:
        if isinstance(batch[0], (list, tuple)):
            return batch[0]
        return batch[0] if n_inputs == 1 else tuple(batch[:n_inputs])
    raise CalibrationError(f"batch {index} is a {type(batch).__name__}; expected a tensor, a tuple or a "
                           f"dict (or say which part is the model input with inputs=)")


def _item(batch: Any, key: Union[int, str], index: int, what: str) -> Any:
    try:
        return batch[key]
    except (KeyError, IndexError, TypeError) as exc:
        keys = list(batch) if isinstance(batch, Mapping) else f"{type(batch).__name__} of length " \
            f"{len(batch) if hasattr(batch, '__len__') else '?'}"
        raise CalibrationError(f"batch {index} has no item {key!r} for {what}= (it has {keys})") from exc


def _target(batch: Any, selector: Selector, index: int) -> Any:
    if selector is not None:
        return _select(batch, selector, index, 1, "target")
    if isinstance(batch, Mapping):
        return batch.get("labels")
    if isinstance(batch, (list, tuple)) and len(batch) > 1:
        return batch[-1]
    return None


def _mask(batch: Any, selector: Selector, index: int) -> Any:
    if selector is not None:
        return _select(batch, selector, index, 1, "mask")
    return batch.get("attention_mask") if isinstance(batch, Mapping) else None


def check_mask(mask: Any, inputs: tuple, index: int, ids_name: str = "input 0") -> Optional[torch.Tensor]:
    """A batch's token mask as a bool ``(batch, sequence)`` tensor, or None when it pads nothing. It
    must be a 0/1 tensor of the first input's ``(batch, sequence)`` shape: else a CalibrationError
    naming the batch and the tensor."""
    if mask is None:
        return None
    first = inputs[0] if inputs else None
    want = list(first.shape[:2]) if isinstance(first, torch.Tensor) and first.dim() >= 2 else None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or want is None or list(mask.shape) != want:
        raise CalibrationError(f"calibration batch {index}: attention_mask of shape "
                               f"{list(getattr(mask, 'shape', [])) if isinstance(mask, torch.Tensor) else _describe(mask)} "
                               f"does not match {ids_name} {list(first.shape) if isinstance(first, torch.Tensor) else '?'} "
                               f"(its (batch, sequence) dims)")
    if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        raise CalibrationError(f"calibration batch {index}: attention_mask must hold 0 (padding) and 1 "
                               f"(real token), got a {mask.dtype} tensor with other values")
    mask = mask.bool()
    if not bool(mask.any()):
        raise CalibrationError(f"calibration batch {index}: attention_mask marks no real token")
    return None if bool(mask.all()) else mask


def token_rows(mask: Optional[torch.Tensor], value: torch.Tensor, channel_dim: Optional[int], node: str,
               index: int) -> Optional[torch.Tensor]:
    """Which positions of ``value`` (its dims but ``channel_dim``, flattened in order) are real tokens,
    following the batch's ``(batch, sequence)`` mask to this node; None when the batch pads nothing.

    The positions are read as ``(batch, sequence)``, ``(batch·sequence)`` or ``(batch, ..., sequence,
    ...)`` with the sequence size found once after the batch dim; any other layout is a
    CalibrationError naming the node (a padded batch is never read as if it were not).

    >>> token_rows(torch.tensor([[True, False]]), torch.zeros(1, 2, 5), 2, "h", 0)
    tensor([ True, False])
    """
    if mask is None:
        return None
    shape = list(value.shape)
    rest = shape[:channel_dim % len(shape)] + shape[channel_dim % len(shape) + 1:] if channel_dim is not None \
        else shape
    batch, seq = mask.shape
    mask = mask.to(value.device)
    if rest == [batch, seq] or rest == [batch * seq]:
        return mask.reshape(-1)
    later = [d for d in range(1, len(rest)) if rest[d] == seq]
    if len(rest) >= 3 and rest[0] == batch and len(later) == 1:
        view = [batch] + [seq if d == later[0] else 1 for d in range(1, len(rest))]
        return mask.reshape(view).expand(rest).reshape(-1)
    raise CalibrationError(f"calibration batch {index} is padded (attention_mask of shape [{batch}, {seq}]), and "
                           f"node {node!r} of shape {shape} has no (batch, sequence) positions to follow it to: "
                           f"pass unpadded batches")


def _as_tuple(value: Any, index: int, what: str) -> tuple:
    items = (value,) if isinstance(value, torch.Tensor) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, torch.Tensor) for v in items):
        raise CalibrationError(f"batch {index}: {what} must be a tensor or a tuple of tensors, got "
                               f"{_describe(value)}")
    return tuple(items)


def _describe(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__}[{', '.join(type(v).__name__ for v in value)}]"
    return type(value).__name__


# --- sums -----------------------------------------------------------------------------------------
@dataclass
class Sums:
    """Named float64 sums that add over batches and over ``torch.distributed`` ranks: the reusable
    accumulator of every statistic (counts, moments, Gram matrices, gradients).

    >>> s = Sums(); s.add("x", torch.ones(3)); s.add("x", torch.ones(3)); s["x"]
    tensor([2., 2., 2.], dtype=torch.float64)
    """

    values: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().to(torch.float64)
        if name in self.values:
            self.values[name] += value
        else:
            self.values[name] = value.clone()

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.values[name]

    def __contains__(self, name: str) -> bool:
        return name in self.values

    def all_reduce(self) -> "Sums":
        """Sum over ranks when a process group is initialised (every rank must call it with the same
        names); a no-op otherwise. Returns ``self``."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self
        for name in sorted(self.values):  # same order on every rank
            torch.distributed.all_reduce(self.values[name], op=torch.distributed.ReduceOp.SUM)
        return self


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


# --- what is watched ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Site:
    """A node's output watched along one channel dim."""

    node: str
    dim: int
    channels: int


@dataclass(frozen=True)
class GramSite:
    """A consumer (conv or linear) whose input Gram matrix is gathered, as its weight sees the input:
    ``features`` columns (a conv's ``C_in * kernel`` unfolded patch)."""

    node: str
    """The consumer node."""
    input: str
    """The node feeding it."""
    channel_dim: int
    weight: str
    """The consumer's weight (state_dict key)."""
    features: int
    unfold: Optional[dict] = None
    """For a conv: ``kernel_size, dilation, padding, stride`` of ``F.unfold``; None for a linear."""


@dataclass(frozen=True)
class Statistics:
    """Sums gathered over calibration batches, read as per-channel moments and Gram matrices.

    >>> stats.mean("conv1"), stats.var("relu"), stats.gram("fc").shape    # doctest: +SKIP
    """

    sums: Sums
    sites: Mapping[str, Site]
    grams: Mapping[str, GramSite]
    batches: int

    def count(self, node: str) -> torch.Tensor:
        return self.sums[f"{node}:count"]

    def mean(self, node: str) -> torch.Tensor:
        return self.sums[f"{node}:sum"] / self.count(node).clamp_min(1)

    def mean_sq(self, node: str) -> torch.Tensor:
        return self.sums[f"{node}:sq"] / self.count(node).clamp_min(1)

    def mean_abs(self, node: str) -> torch.Tensor:
        return self.sums[f"{node}:abs"] / self.count(node).clamp_min(1)

    def var(self, node: str) -> torch.Tensor:
        """Unbiased per-channel variance (``n / (n-1)`` times the second central moment)."""
        n = self.count(node)
        return ((self.mean_sq(node) - self.mean(node) ** 2).clamp_min(0) * n / (n - 1).clamp_min(1))

    def l2(self, node: str) -> torch.Tensor:
        """Per-channel L2 norm over every element seen (Wanda's ``‖X_j‖₂``)."""
        return self.sums[f"{node}:sq"].sqrt()

    def gram(self, node: str) -> torch.Tensor:
        """``XᵀX`` summed over every row the consumer ``node`` saw (divide by :meth:`rows` for a mean)."""
        return self.sums[f"{node}:gram"]

    def rows(self, node: str) -> torch.Tensor:
        return self.sums[f"{node}:rows"]


def conv_unfold(gm: fx.GraphModule, node: fx.Node) -> Optional[dict]:
    """``F.unfold`` arguments of a 2-D, ungrouped conv node at either level (None for other convs)."""
    if node.op == "call_module":
        conv = gm.get_submodule(str(node.target))
        if not isinstance(conv, torch.nn.Conv2d) or conv.groups != 1 or conv.padding_mode != "zeros" \
                or isinstance(conv.padding, str):
            return None
        return dict(kernel_size=conv.kernel_size, dilation=conv.dilation, padding=conv.padding,
                    stride=conv.stride)
    if node.target is not torch.ops.aten.conv2d.default:
        return None
    args = list(node.args) + [None] * (7 - len(node.args))
    weight = node.args[1].meta["val"]
    stride, padding, dilation, groups = (args[3] or [1, 1]), (args[4] or [0, 0]), (args[5] or [1, 1]), args[6] or 1
    if groups != 1 or isinstance(padding, str):
        return None
    return dict(kernel_size=tuple(weight.shape[2:]), dilation=tuple(dilation), padding=tuple(padding),
                stride=tuple(stride))


def gram_features(x: torch.Tensor, site: GramSite) -> torch.Tensor:
    """The consumer's input as rows of the features its weight multiplies: ``(rows, features)``."""
    if site.unfold is not None:
        patches = F.unfold(x, **site.unfold)  # (N, C*kh*kw, L)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.movedim(site.channel_dim, -1).reshape(-1, x.shape[site.channel_dim])


def real_feature_rows(mask: torch.Tensor, value: torch.Tensor, site: GramSite, index: int) -> torch.Tensor:
    """The rows of :func:`gram_features` that are real tokens (a conv's unfolded patches are not
    token positions: a padded batch there is a CalibrationError)."""
    if site.unfold is not None:
        raise CalibrationError(f"calibration batch {index} is padded (attention_mask), and node {site.node!r} is "
                               f"a convolution whose patches are not token positions: pass unpadded batches")
    return token_rows(mask, value, site.channel_dim, site.input, index)


# --- running the graph ----------------------------------------------------------------------------
class _AllWatched(Exception):
    """Raised once every watched node has run: what follows them (an LM's head) is not computed."""


class _Watcher(MutableArgs, fx.Interpreter):
    """Runs the graph and hands every watched node's value to ``observe``, up to the last watched node."""

    def __init__(self, gm: fx.GraphModule, watched: set[str], observe: Callable[[fx.Node, Any], None]):
        super().__init__(gm)
        self.watched, self.observe = watched, observe
        self.pending = watched & {n.name for n in gm.graph.nodes}
        self.extra_traceback = False  # errors keep their one-line message

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n.name in self.watched:
            self.observe(n, value)
            self.pending.discard(n.name)
            if not self.pending:
                raise _AllWatched
        return value


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode for the duration (BatchNorm must not update its running statistics, dropout must not
    drop), every module's own flag restored after: calibration never changes the model."""
    flags = [(m, m.training) for m in module.modules()]
    for m, _ in flags:  # not module.eval(): torch.export's module refuses it
        m.training = False
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def placeholder_shapes(gm: fx.GraphModule) -> list[Optional[tuple]]:
    """The traced shape of each placeholder (None where unknown); symbolic sizes become None."""
    from fxprune.core.capture import DYNAMIC_DIMS
    out = []
    for node in gm.graph.find_nodes(op="placeholder"):
        value = node.meta.get("val", node.meta.get("tensor_meta"))
        shape = getattr(value, "shape", None)
        dynamic = node.meta.get(DYNAMIC_DIMS, ())  # traced symbolic by export, then made concrete
        out.append(None if shape is None else tuple(s if isinstance(s, int) and i not in dynamic else None
                                                    for i, s in enumerate(shape)))
    return out


def check_batch(inputs: tuple, expected: list[Optional[tuple]], index: int) -> None:
    """A batch must match the example inputs in count, rank and every size but the batch dim."""
    if len(inputs) != len(expected):
        raise CalibrationError(f"batch {index} has {len(inputs)} model inputs; the graph takes "
                               f"{len(expected)} (say which part of a batch is the input with inputs=)")
    for position, (x, shape) in enumerate(zip(inputs, expected)):
        if shape is None:
            continue
        if x.numel() == 0:  # it would add nothing to the statistics: every score zero, the kept set arbitrary
            raise CalibrationError(f"batch {index} input {position} has shape {tuple(x.shape)}: no rows to "
                                   f"calibrate on")
        same = x.dim() == len(shape) and all(e is None or d == 0 or s == e
                                             for d, (s, e) in enumerate(zip(x.shape, shape)))
        if not same:
            raise CalibrationError(f"batch {index} input {position} has shape {tuple(x.shape)}; the example "
                                   f"inputs have {tuple('*' if e is None else e for e in shape)} (only the "
                                   f"batch dim may differ)")


def run_batches(gm: fx.GraphModule, calibration: Any, watched: set[str],
                observe: Callable[..., None], progress: bool = False, with_mask: bool = False) -> int:
    """Run ``gm`` on every calibration batch under ``no_grad`` and eval mode, calling
    ``observe(batch index, node, value)`` on each watched node (with ``with_mask``: also the batch's
    token mask, :attr:`Batch.mask`, as a fourth argument); returns the number of batches read.

    A batch of the wrong shape, or one the graph raises on, is a :class:`CalibrationError` naming the
    batch; NaN or infinite values at a watched node are a :class:`NonFiniteActivationError` naming it.
    """
    calibration = as_calibration(calibration)
    expected = placeholder_shapes(gm)
    device = _device_of(gm)
    batches = 0
    with torch.no_grad(), eval_mode(gm):
        read = calibration.read(len(expected), allow_empty=is_distributed())  # checked over all ranks
        for index, inputs, _, mask in progress_bar(read, progress, desc="calibration", unit="batch",
                                                    total=calibration.max_batches):
            check_batch(inputs, expected, index)
            for chunk, part in split_masked(inputs, mask, fixed_batch_size(gm), index):

                def watch(node: fx.Node, value: Any, index: int = index, part: Any = part) -> None:
                    check_finite(node, value, index)
                    observe(index, node, value, part) if with_mask else observe(index, node, value)

                _run_one(gm, tuple(x.to(device) for x in chunk), watched, watch, index)
            del inputs, chunk, mask, part  # one batch at a time: none is held while the next is fetched
            batches += 1
    return batches


def fixed_batch_size(gm: fx.GraphModule) -> Optional[int]:
    """The batch size an export-level graph is specialised to (None at the fx level, or when the
    batch dim is dynamic)."""
    from fxprune.core.capture import graph_level
    shapes = placeholder_shapes(gm)
    if graph_level(gm) != "export" or not shapes or not shapes[0]:
        return None
    return shapes[0][0]


def split_batch(inputs: tuple, size: Optional[int], index: int) -> Iterator[tuple]:
    """``inputs`` as chunks of ``size`` rows (all sums, so chunking changes no statistic)."""
    rows = inputs[0].shape[0] if inputs and inputs[0].dim() else None
    if size is None or rows is None or rows == size:
        yield inputs
        return
    if rows % size:
        raise CalibrationError(f"calibration batch {index} has {rows} rows; the export-level graph is "
                               f"specialised to batch size {size}: use batches of a multiple of {size}, "
                               f"or capture with a dynamic batch dim")
    for start in range(0, rows, size):
        yield tuple(x[start:start + size] for x in inputs)


def split_masked(inputs: tuple, mask: Optional[torch.Tensor], size: Optional[int],
                 index: int) -> Iterator[tuple[tuple, Optional[torch.Tensor]]]:
    """:func:`split_batch` with the batch's token mask split alike."""
    if mask is None:
        for chunk in split_batch(inputs, size, index):
            yield chunk, None
        return
    for chunk in split_batch(inputs + (mask,), size, index):
        yield chunk[:-1], None if bool(chunk[-1].all()) else chunk[-1]


def _run_one(gm: fx.GraphModule, inputs: tuple, watched: set[str], watch: Callable, index: int) -> None:
    try:
        _Watcher(gm, watched, watch).run(*inputs)
    except _AllWatched:
        pass
    except NonFiniteActivationError:
        raise
    except Exception as exc:
        shapes = [tuple(x.shape) for x in inputs]
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CalibrationError(f"the model rejects calibration batch {index} (inputs of shapes {shapes}): "
                               f"{type(exc).__name__}: {first}") from exc


def check_finite(node: fx.Node, value: Any, index: int) -> None:
    if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(value.isfinite().all()):
        from fxprune.core.graph import describe_target
        raise NonFiniteActivationError(f"calibration batch {index} gives non-finite values at node "
                                       f"{node.name!r} ({describe_target(node)})")


def _device_of(gm: fx.GraphModule) -> torch.device:
    for tensor in list(gm.parameters()) + list(gm.buffers()):
        return tensor.device
    return torch.device("cpu")


# --- collecting statistics ------------------------------------------------------------------------
def collect(gm: fx.GraphModule, calibration: Any, sites: Sequence[Site] = (),
            grams: Sequence[GramSite] = (), progress: bool = False) -> Statistics:
    """Per-channel moments at ``sites`` and input Gram matrices at ``grams``, summed over every batch
    (and over ranks when a process group is initialised).

    >>> stats = collect(analysis.gm, loader, calibration_sites(analysis))   # doctest: +SKIP
    """
    sums = Sums()
    by_node: dict[str, list] = {}
    for site in sites:
        _zero_moments(sums, site)
        by_node.setdefault(site.node, []).append(site)
    for gram in grams:
        sums.add(f"{gram.node}:gram", torch.zeros(gram.features, gram.features))
        sums.add(f"{gram.node}:rows", torch.zeros(()))
        by_node.setdefault(gram.input, []).append(gram)

    def observe(index: int, node: fx.Node, value: Any, mask: Optional[torch.Tensor]) -> None:
        for item in by_node[node.name]:
            (_add_moments if isinstance(item, Site) else _add_gram)(sums, item, value, mask, index)

    sums.add(":batches", torch.zeros(()))
    local = run_batches(gm, calibration, set(by_node), observe, progress, with_mask=True)
    sums.add(":batches", torch.tensor(float(local)))
    sums.all_reduce()
    if sums[":batches"].item() == 0:
        raise empty_error(as_calibration(calibration).data)
    sums.values = {k: v.cpu() for k, v in sums.values.items()}  # small, and read beside CPU scores
    return Statistics(sums, {s.node: s for s in sites}, {g.node: g for g in grams},
                      int(sums[":batches"].item()))


def _zero_moments(sums: Sums, site: Site) -> None:
    for part in ("sum", "sq", "abs"):
        sums.add(f"{site.node}:{part}", torch.zeros(site.channels))
    sums.add(f"{site.node}:count", torch.zeros(()))


def _add_moments(sums: Sums, site: Site, value: torch.Tensor, mask: Optional[torch.Tensor] = None,
                 index: int = 0) -> None:
    """Per-channel sums over the real tokens' positions (all positions when ``mask`` is None)."""
    x = value.detach().movedim(site.dim, 0).reshape(site.channels, -1)
    real = token_rows(mask, value, site.dim, site.node, index)
    x = (x if real is None else x[:, real]).double()
    sums.add(f"{site.node}:sum", x.sum(1))
    sums.add(f"{site.node}:sq", (x * x).sum(1))
    sums.add(f"{site.node}:abs", x.abs().sum(1))
    sums.add(f"{site.node}:count", torch.tensor(float(x.shape[1])))


def _add_gram(sums: Sums, site: GramSite, value: torch.Tensor, mask: Optional[torch.Tensor] = None,
              index: int = 0) -> None:
    rows = gram_features(value.detach().double(), site)
    rows = rows if mask is None else rows[real_feature_rows(mask, value, site, index)]
    sums.add(f"{site.node}:gram", rows.T @ rows)
    sums.add(f"{site.node}:rows", torch.tensor(float(rows.shape[0])))


def calibration_sites(analysis: Any, groups: Optional[Sequence[Any]] = None) -> list[Site]:
    """The nodes whose channels the criteria read: each producer's output and each consumer's input
    (conv/linear, from the analysis' weighted consumers), along their channel dim — only where some of
    those channels can be pruned (no scores are asked of frozen units: an LM's logits, 49,152 channels
    wide, would cost more to sum than the rest of the model's sites together); of ``groups`` only
    when given (a caller that scores those alone: the residual stream's dozens of sites are not summed)."""
    nodes = {n.name: n for n in analysis.gm.graph.nodes}
    free = free_classes(analysis, groups)
    out: dict[tuple[str, int], Site] = {}
    for producer in analysis.producers:
        ids = analysis.params[producer.key][producer.dim]
        dim = _channel_dim(analysis, nodes[producer.node], ids) if any_free(analysis, ids, free) else None
        if dim is not None:
            out.setdefault((producer.node, dim), _site(nodes[producer.node], dim))
    for consumer in analysis.weighted_consumers:
        ids = analysis.params[consumer.weight][consumer.in_dim]
        if consumer.input in nodes and any_free(analysis, ids, free):
            out.setdefault((consumer.input, consumer.channel_dim), _site(nodes[consumer.input], consumer.channel_dim))
    return _one_per_node(list(out.values()))


def free_classes(analysis: Any, groups: Optional[Sequence[Any]] = None) -> torch.Tensor:
    """The class ids of every unit a selection may drop (in a prunable group, not frozen), of
    ``groups`` only when given."""
    chosen = analysis.groups if groups is None else groups
    free = [u for g in chosen for u in sorted(set(g.units) - set(g.frozen_units))]
    return torch.tensor(free, dtype=torch.long)


def any_free(analysis: Any, ids: torch.Tensor, free: torch.Tensor) -> bool:
    return bool(torch.isin(analysis.solution.root[ids], free).any())


def _one_per_node(sites: list[Site]) -> list[Site]:
    """Keep one dim per node (the first): a site is named by its node."""
    seen: dict[str, Site] = {}
    for site in sites:
        seen.setdefault(site.node, site)
    return list(seen.values())


def _site(node: fx.Node, dim: int) -> Site:
    from fxprune.core.graph import meta_value
    return Site(node.name, dim, int(meta_value(node).shape[dim]))


def _channel_dim(analysis: Any, node: fx.Node, ids: torch.Tensor) -> Optional[int]:
    """The dim of ``node``'s output holding the channels ``ids`` (same classes), if any."""
    value = analysis.env.get(node)
    if not isinstance(value, tuple):
        return None
    root = analysis.solution.root
    want = root[ids]
    for dim, arr in enumerate(value):
        if isinstance(arr, torch.Tensor) and arr.numel() == ids.numel() and torch.equal(root[arr], want):
            return dim
    return None


def gram_sites(analysis: Any, nodes: Optional[Iterable[str]] = None) -> list[GramSite]:
    """Gram sites for the analysis' conv/linear consumers (all of them, or those named in ``nodes``);
    grouped and non-2-D convs are left out (their weight does not see one unfolded patch)."""
    by_name = {n.name: n for n in analysis.gm.graph.nodes}
    wanted = None if nodes is None else set(nodes)
    out = []
    for consumer in analysis.weighted_consumers:
        if wanted is not None and consumer.node not in wanted:
            continue
        site = _gram_site(analysis, by_name[consumer.node], consumer)
        if site is not None:
            out.append(site)
    return out


def _gram_site(analysis: Any, node: fx.Node, consumer: Any) -> Optional[GramSite]:
    weight = analysis.tensor(consumer.weight)
    if weight.dim() == 2 and consumer.in_dim == 1:
        return GramSite(node.name, consumer.input, consumer.channel_dim, consumer.weight, weight.shape[1])
    if weight.dim() != 4 or consumer.in_dim != 1:
        return None
    unfold = conv_unfold(analysis.gm, node)
    if unfold is None:
        return None
    return GramSite(node.name, consumer.input, consumer.channel_dim, consumer.weight,
                    weight.shape[1] * math.prod(weight.shape[2:]), unfold)
