"""Layer by layer with data: the data-aware criteria and ``reconstruct`` on a checkpoint read from disk.

:func:`fxprune.hf.prune_checkpoint` with ``calibration=`` runs what :func:`fxprune.hf.prune`
runs in memory, on a model whose weights stay in the shards. The whole model is exported on the
``meta`` device (shapes, no weights) and the calibration batches walk that graph node by node, every
batch together (:class:`fxprune.data.sequential.Walk`): a node's weights are read from the shards just
before it runs and dropped after it ran, so one tensor is in memory at a time beside the carried
activations (a decoder's residual stream per batch, moved to memory-mapped files when large: a
:class:`~fxprune.data.sequential.Spill`). Two walks:

1. **statistics** (skipped when an interrupted run left its plan): the per-channel moments the
   criterion reads (:func:`~fxprune.data.sequential.walk_statistics`, the same sums
   :func:`fxprune.data.calibration.collect` gathers in memory), then scores and the plan exactly as
   in memory (:func:`~fxprune.hf.checkpoint.make_checkpoint_plan`).
2. **reconstruct** (with ``recover=``): the original graph and the pruned one (rewritten on the meta
   device) walk together as :func:`fxprune.data.recovery.reconstruct` walks them — each refitted layer
   fits the inputs the *pruned* model produces to the original's outputs — and a unit (a decoder
   layer's shard) is written as soon as its last layer is refitted, its refitted weights then
   dropped. Without ``recover=`` the units are written as on the data-free path.

Across ranks: under ``torch.distributed`` every rank walks its share of the batches (batch ``i`` on
rank ``i % world``); the moments are :class:`~fxprune.data.calibration.Sums` all-reduced at each
statistic and each refit, so every rank holds the same plan and the same refitted weights, and rank
0 alone writes. ``device=``: batches and each weight are moved there before a node runs; what is
written comes back to the CPU.

Resume: an interrupted run's ``plan.json`` spares the statistics walk; the reconstruct walk runs
again from the first layer (the refits are recomputed: each is the same), and the units finished
before are not written again.
"""
from __future__ import annotations

import contextlib
import copy
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.fx as fx

from fxprune.core.graph import tensor_at
from fxprune.data.calibration import check_batch, eval_mode, placeholder_shapes
from fxprune.data.sequential import Spill, walk_moments, walk_statistics
from fxprune.errors import CalibrationError, InvalidOptionError

#: The recovery steps the disk path runs (``compensate-bias`` and ``recalibrate-batchnorm`` read
#: whole-graph statistics or BatchNorms, which no decoder checkpoint has: refused with a typed error).
LAYERWISE_RECOVERY = ("reconstruct",)


# --- options -----------------------------------------------------------------------------------------
def check_device(device: Any) -> torch.device:
    """``device=`` as a ``torch.device``; one this machine lacks is an ``InvalidOptionError``."""
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidOptionError(f"device={device!r} is not a torch device (use 'cpu' or 'cuda')") from exc
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise InvalidOptionError(f"device={device!r}: CUDA is not available on this machine (torch "
                                 f"{torch.__version__}, built with CUDA {torch.version.cuda}); use device='cpu'")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise InvalidOptionError(f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    if chosen.type not in ("cpu", "cuda"):
        raise InvalidOptionError(f"device={device!r}: the disk path runs layers on 'cpu' or 'cuda'")
    return chosen


def recovery_of(recover: Any) -> tuple[tuple[str, ...], dict[str, dict[str, Any]]]:
    """``recover=`` as :func:`fxprune.hf.prune` reads it (reconstruct's ridge defaults to 1), limited
    to :data:`LAYERWISE_RECOVERY`."""
    from fxprune.hf.in_memory import _recovery
    steps, options = _recovery(recover)
    refused = [s for s in steps if s not in LAYERWISE_RECOVERY]
    if refused:
        raise InvalidOptionError(f"prune_checkpoint runs the recovery steps {LAYERWISE_RECOVERY} layer by layer, "
                                 f"got {refused[0]!r} (use fxprune.hf.prune on a model that fits in memory)")
    return steps, options


# --- ranks ---------------------------------------------------------------------------------------------
def rank_and_world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast_text(text: Optional[str], device: torch.device) -> Optional[str]:
    """Rank 0's ``text`` (or None) on every rank, as UTF-8 bytes in a tensor (nothing pickled)."""
    rank, world = rank_and_world()
    if world == 1:
        return text
    dist = torch.distributed
    where = device if dist.get_backend() == "nccl" else torch.device("cpu")
    data = (text or "").encode() if rank == 0 else b""
    size = torch.tensor([len(data) if text is not None or rank else -1], dtype=torch.long, device=where)
    dist.broadcast(size, 0)
    if int(size) < 0:
        return None
    buffer = torch.zeros(int(size), dtype=torch.uint8, device=where)
    if rank == 0 and data:
        buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buffer, 0)
    return bytes(buffer.cpu().tolist()).decode()


def barrier() -> None:
    if rank_and_world()[1] > 1:
        torch.distributed.barrier()


# --- batches ---------------------------------------------------------------------------------------------
def rank_batches(gm: fx.GraphModule, calibration: Any, vocab_size: Optional[int], device: torch.device
                 ) -> tuple[list[tuple], int]:
    """This rank's calibration batches (batch ``i`` on rank ``i % world``), checked as in memory
    (token ids against the vocabulary, shapes against the graph), on ``device``; and the total count."""
    from fxprune.hf import calibrated
    rank, world = rank_and_world()
    expected = placeholder_shapes(gm)
    mine, total = [], 0
    for index, inputs, _, mask in calibrated.token_calibration(calibration, vocab_size).read(len(expected)):
        if mask is not None:  # the walks here sum every position: padding would enter the statistics
            raise CalibrationError(f"calibration batch {index} is padded (its attention_mask has zeros): "
                                   f"prune_checkpoint takes unpadded token batches (pack the text into "
                                   f"full-length rows), or use fxprune.hf.prune, which masks padding")
        check_batch(inputs, expected, index)
        if index % world == rank:
            mine.append(tuple(x.to(device) for x in inputs))
        total += 1
    if not mine:
        raise CalibrationError(f"rank {rank} of {world} gets no calibration batch ({total} batches): give at "
                               f"least one batch per rank")
    return mine, total


# --- weights read from the shards ------------------------------------------------------------------------
@contextlib.contextmanager
def _parameters_on_meta():
    """Build a model with its parameters on the ``meta`` device and its buffers real (what
    ``__init__`` computes: rotary frequencies)."""
    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: Any) -> None:
        if param is not None and not param.is_meta:
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def computed_buffers(model: Any) -> dict[str, torch.Tensor]:
    """The buffers no shard holds (non-persistent: LLaMA's ``rotary_emb.inv_freq``), as the class's
    ``__init__`` computes them from the config; parameters are never allocated."""
    from transformers.initialization import no_init_weights
    stored = set(model.state_dict())
    wanted = [name for name, _ in model.named_buffers() if name not in stored]
    if not wanted:
        return {}
    with _parameters_on_meta(), no_init_weights():
        built = type(model)._from_config(copy.deepcopy(model.config), dtype=model.dtype)
    buffers = dict(built.named_buffers())
    return {name: buffers[name].detach().clone() for name in wanted}


@dataclass
class Weights:
    """The weight sources of the two walks: the original tensors read from the shards, and the pruned
    graph's (a refitted weight the graph holds, else the original sliced per the plan)."""

    shards: Any
    ties: Mapping[str, str]
    buffers: Mapping[str, torch.Tensor]
    device: torch.device
    cut: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None
    """``(key, tensor) -> tensor`` with the plan's kept indices (set once the plan exists)."""
    pruned_gm: Optional[fx.GraphModule] = None

    def original(self, target: str) -> torch.Tensor:
        if target in self.buffers:
            return self.buffers[target].to(self.device)
        return self.shards.read(self.stored(target)).to(self.device)

    def stored(self, key: str) -> str:
        return key if key in self.shards.shapes else self.ties.get(key, key)

    def pruned(self, target: str) -> torch.Tensor:
        held = tensor_at(self.pruned_gm, target)
        if not held.is_meta:  # refitted (or a bias a refit created)
            return held.to(self.device)
        return self.sliced(target)

    def sliced(self, key: str) -> torch.Tensor:
        if key in self.buffers:
            value = self.buffers[key]
        else:
            value = self.shards.read(self.stored(key))
        return self.cut(key, value).to(self.device)


def spill_for(directory: Optional[Any], min_bytes: Optional[int]) -> tuple[Optional[Spill], Any]:
    """A :class:`Spill` into ``directory`` (a temporary one by default) when ``min_bytes`` is set;
    and what to close when done."""
    if min_bytes is None:
        return None, contextlib.nullcontext()
    if isinstance(min_bytes, bool) or not isinstance(min_bytes, int) or min_bytes < 0:
        raise InvalidOptionError(f"spill_bytes must be an int >= 0 or None, got {min_bytes!r}")
    holder = tempfile.TemporaryDirectory(prefix="fxprune-walk-", dir=None if directory is None else str(directory))
    return Spill(holder.name, min_bytes), holder


# --- walk 1: statistics -----------------------------------------------------------------------------------
def statistics(analysis: Any, batches: Sequence[tuple], weights: Weights, spill: Optional[Spill],
               criterion: str) -> Any:
    """``criterion``'s evidence (:class:`fxprune.data.criteria.Evidence`: the moments, and the Gram
    matrices a criterion such as ``energy`` reads) from one walk of the original graph, weights read
    from the shards."""
    from fxprune.data.calibration import calibration_sites
    from fxprune.data.criteria import CRITERION_SPECS, Evidence
    grams = CRITERION_SPECS[criterion].grams
    with torch.no_grad(), eval_mode(analysis.gm):
        stats = walk_statistics(analysis.gm, batches, calibration_sites(analysis), weights.original, spill,
                                grams(analysis) if grams is not None else ())
    return Evidence(statistics=stats)


# --- walk 2: reconstruct, writing units as they are finished -------------------------------------------------
@dataclass
class UnitWriter:
    """Writes each unit once every refitted layer in it is done (rank 0; the others only drop)."""

    units: Sequence[Any]
    write: Callable[[Any, Callable[[str], torch.Tensor]], None]
    tensor_of: Callable[[str], torch.Tensor]
    fits: Mapping[str, set]
    """{unit name: weight keys of the layers refitted in it}."""
    done: set = field(default_factory=set)
    """Units written (or finished by an interrupted run)."""
    refitted: dict = field(default_factory=dict)
    """{state_dict key: tensor} of refitted weights and their biases not yet written."""
    release: Callable[[str], None] = lambda key: None
    position: int = 0

    def flush(self, everything: bool = False) -> None:
        """Write the units from the next one on while each is complete (all of them at the end)."""
        while self.position < len(self.units):
            unit = self.units[self.position]
            if not everything and not self.fits.get(unit.name, set()) <= set(self.refitted):
                return
            if unit.name not in self.done:
                self.write(unit, self.value)
                self.done.add(unit.name)
            for key in unit.keys:
                if self.refitted.pop(key, None) is not None:
                    self.release(key)
            self.position += 1

    def value(self, key: str) -> torch.Tensor:
        return self.refitted[key].cpu() if key in self.refitted else self.tensor_of(key)


def reconstruct_walk(analysis: Any, pruned: fx.GraphModule, stops: Mapping[Any, Any], batches: Sequence[tuple],
                     weights: Weights, writer: UnitWriter, ridge: float, spill: Optional[Spill],
                     progress: bool = False) -> list:
    """Walk the original graph and the pruned one together, refitting each stop's layer in place
    (:func:`fxprune.data.recovery.refit_layer`), handing the refitted tensors to ``writer`` and
    writing every unit that is complete; returns the per-layer reports."""
    from fxprune.data.recovery import refit_layer
    from fxprune.progress import progress_bar
    bar = progress_bar(None, progress, desc="reconstruct", unit="layer", total=len(stops))

    def refit(stop: Any, targets: list, inputs: list) -> Any:
        writer.flush()  # the units finished by earlier stops (their layers have run by now)
        fit = stops[stop]
        _materialise(pruned, fit.consumer.weight, weights.sliced(fit.consumer.weight))
        if fit.consumer.bias is not None:
            _materialise(pruned, fit.consumer.bias, weights.sliced(fit.consumer.bias))
        report = refit_layer(pruned, fit, targets, inputs, ridge)
        weight, bias = _refitted(pruned, fit)
        writer.refitted.update({fit.consumer.weight: weight, f"{fit.consumer.weight.rpartition('.')[0]}.bias": bias})
        if bar is not None:
            bar.update(1)
        return report

    with torch.no_grad(), eval_mode(analysis.gm), eval_mode(pruned):
        reports, _, _ = walk_moments(analysis.gm, pruned, list(stops), batches, refit,
                                     weights=(weights.original, weights.pruned), spill=spill, finish=False)
    writer.flush(everything=True)
    if bar is not None:
        bar.close()
    return reports


def _materialise(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    """Set the graph's (meta) parameter ``target`` to a real tensor a refit can write into."""
    owner_name, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    setattr(owner, name, torch.nn.Parameter(value.clone(), requires_grad=False))


def _refitted(gm: fx.GraphModule, fit: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The refitted weight and the bias its layer node now reads (a refit may have created it)."""
    node = next(n for n in gm.graph.nodes if n.name == fit.consumer.node)
    bias = node.args[2]
    return (tensor_at(gm, fit.consumer.weight).detach().clone(), tensor_at(gm, str(bias.target)).detach().clone())


def dematerialise(gm: fx.GraphModule, key: str) -> None:
    """Drop a written refitted tensor from the graph (a meta tensor of its shape stays): memory holds
    the layers being refitted, never all of them."""
    for node in gm.graph.nodes:
        if node.op == "get_attr" and _layer_key(gm, node) == key:
            held = tensor_at(gm, str(node.target))
            owner_name, _, name = str(node.target).rpartition(".")
            owner = gm.get_submodule(owner_name) if owner_name else gm
            setattr(owner, name, torch.nn.Parameter(torch.empty(held.shape, dtype=held.dtype, device="meta"),
                                                    requires_grad=False))


def _layer_key(gm: fx.GraphModule, node: fx.Node) -> str:
    """The state_dict key a get_attr node's tensor is written under: its target, or ``<layer>.bias``
    for a bias a refit registered under another name."""
    target = str(node.target)
    for user in node.users:
        if len(user.args) > 2 and user.args[2] is node and isinstance(user.args[1], fx.Node):
            return f"{str(user.args[1].target).rpartition('.')[0]}.bias"
    return target


def bias_keys(stops: Mapping[Any, Any]) -> list[str]:
    """The biases reconstruct gives layers that had none (a config flag must hold them)."""
    return [f"{f.consumer.weight.rpartition('.')[0]}.bias" for f in stops.values() if f.consumer.bias is None]


def unit_fits(units: Sequence[Any], stops: Mapping[Any, Any]) -> dict[str, set]:
    weights = {f.consumer.weight for f in stops.values()}
    out: dict[str, set] = {}
    for unit in units:
        keys = {k for k in unit.keys if k in weights}
        keys |= {f"{k.rpartition('.')[0]}.bias" for k in keys}
        if keys:
            out[unit.name] = keys
    return out


def example_ids(batches: Sequence[tuple]) -> tuple:
    """An example input for rewriting the meta graph (its shapes only are read)."""
    return (batches[0][0][:1].cpu(),)


__all__ = ["check_device", "recovery_of", "computed_buffers", "Weights", "UnitWriter", "statistics",
           "reconstruct_walk", "rank_batches", "broadcast_text", "LAYERWISE_RECOVERY"]
