"""Block-sequential calibration: carry every batch's activations forward through a graph once.

``reconstruct`` refits the consumers of dropped channels in graph order, each on the inputs the
*pruned* model really produces (earlier layers already refitted) against the original model's
outputs. Rerunning both graphs from their inputs for every refitted layer costs ``layers × batches``
graph runs — quadratic in depth (962 s on a 30-layer, 135 M-parameter LLM). The sequential scheme of
SparseGPT, Wanda and FLAP runs each node once per batch instead: a :class:`Walk` holds, for every
calibration batch, the *live* values of a graph (computed, with users still to run) and advances all
batches together to the next point of interest; values no later node reads are dropped as it goes.
Between two stops the weights may change (a layer refitted), and what runs afterwards sees them.

Cost: each node of each graph runs once per batch, so calibration + recovery is linear in depth.
Memory: the live values of every batch at once — for a decoder, a hidden state (and the rotary
tables and mask it carries) per batch, what SparseGPT holds too.

The per-block API, for a pipeline that holds one block at a time (streaming a checkpoint from disk):
a *block* is any GraphModule (one decoder layer exported alone), its inputs a list of per-batch
argument tuples; :func:`refit_block` gathers each fit's moments, refits the pruned block's weights in
place, and returns both blocks' outputs, the next block's inputs.

>>> outs_original, outs_pruned, layers = refit_block(original_block, pruned_block, fits,
...                                                  inputs_original, inputs_pruned)   # doctest: +SKIP

Whole graphs go through the same engine (:func:`walk_moments`): the whole model is one block.

Weights from elsewhere: given a *weight source* (``weights=``, ``target -> tensor``), a walk holds no
``get_attr`` value: each node's weights are fetched just before it runs (once for every batch) and
dropped after, so a graph whose parameters live on the ``meta`` device runs with one weight in memory
at a time (:mod:`fxprune.hf.layerwise` reads them from a checkpoint's shards). A :class:`Spill` moves
the large values a walk carries far ahead (a decoder's residual stream) into memory-mapped files.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import os
import tempfile

import torch
import torch.fx as fx

from fxprune.core.capture import MutableArgs
from fxprune.data.calibration import Site, Statistics, Sums, check_finite
from fxprune.errors import CalibrationError, NonFiniteActivationError


class _Step(MutableArgs, fx.Interpreter):
    """Runs single nodes of a graph on an environment it is given (one per batch)."""


class _OnDevice(_Step):
    """A graph captured on the ``meta`` device run on ``device``: the device its factory calls
    (``arange``) and metadata checks name is the batches'."""

    def __init__(self, gm: fx.GraphModule, device: torch.device):
        super().__init__(gm)
        self.device = device

    def fetch_args_kwargs_from_env(self, n: fx.Node) -> tuple:
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        return _on_device(args, self.device), _on_device(kwargs, self.device)


def _on_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.device) and value.type == "meta":
        return device
    if isinstance(value, list):
        return [_on_device(v, device) for v in value]
    if type(value) is tuple:
        return tuple(_on_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _on_device(v, device) for k, v in value.items()}
    return value


#: ``get_attr`` target -> its tensor: where a walk reads weights when the graph does not hold them.
WeightSource = Callable[[str], torch.Tensor]


@dataclass(frozen=True)
class Spill:
    """Values a walk carries at least ``distance`` nodes ahead and of at least ``min_bytes`` (per
    batch) are copied into memory-mapped files under ``directory`` (pages the kernel may write back
    and drop, not anonymous memory): the carried activations need not fit in memory."""

    directory: str
    min_bytes: int = 1 << 20
    distance: int = 16

    def store(self, value: torch.Tensor) -> torch.Tensor:
        fd, path = tempfile.mkstemp(prefix="walk-", suffix=".bin", dir=self.directory)
        os.close(fd)
        try:
            nbytes = value.numel() * value.element_size()
            with open(path, "wb") as f:
                f.truncate(nbytes)
            mapped = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
        finally:
            os.unlink(path)  # the mapping keeps the pages; the name goes now (nothing left on a crash)
        out = mapped.view(value.dtype).view(value.shape)
        out.copy_(value)
        return out


class Walk:
    """Every calibration batch advanced through ``gm`` together, each node run once per batch.

    >>> walk = Walk(gm, [(x0,), (x1,)])                               # doctest: +SKIP
    >>> ys = walk.values_at("linear_3")  # runs every batch up to and including linear_3
    >>> walk.run_before("linear_4")      # up to, not including, linear_4 (its weight may change now)
    >>> outputs = walk.finish()          # per batch, the graph's outputs
    """

    def __init__(self, gm: fx.GraphModule, batches: Sequence[tuple], keep: Sequence[str] = (),
                 weights: Optional[WeightSource] = None, spill: Optional[Spill] = None):
        self.gm = gm
        self.position = 0
        self.done: set[fx.Node] = set()
        self.keep = set(keep)
        """Nodes whose values stay until :meth:`release` (a fit reads them after the walk passed)."""
        self.weights, self.spill = weights, spill
        self._index_graph()
        self.envs = [self._start(batch, index) for index, batch in enumerate(batches)]
        self.runner = _Step(gm) if weights is None else _OnDevice(gm, _batch_device(batches))

    def _start(self, batch: tuple, index: int) -> dict:
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if len(batch) != len(placeholders):
            raise CalibrationError(f"calibration batch {index} has {len(batch)} inputs, the graph takes "
                                   f"{len(placeholders)}")
        return dict(zip(placeholders, batch))

    def run_before(self, name: str) -> None:
        """Run every batch up to, not including, node ``name``."""
        index = self._index(name)
        if self.nodes[index] in self.done:
            raise CalibrationError(f"node {name!r} has already run: stops must come in graph order")
        self._advance(index)

    def values_at(self, name: str) -> list[Any]:
        """Run every batch through node ``name`` (if not yet run) and return its value per batch."""
        index = self._index(name)
        node = self.nodes[index]
        if node not in self.done:
            self._advance(index + 1)
        if any(node not in env for env in self.envs):
            raise CalibrationError(f"the value of node {name!r} was already released")
        for batch, env in enumerate(self.envs):
            check_finite(node, env[node], batch)
        return [env[node] for env in self.envs]

    def release(self, name: str) -> None:
        """Drop a kept value once read (it is dropped at once if the walk is past its last user)."""
        self.keep.discard(name)
        node = self.nodes[self._index(name)]
        if self.last_use.get(node, -1) < self.position:
            for env in self.envs:
                env.pop(node, None)

    def finish(self) -> list[Any]:
        """Run to the end; the output node's value per batch."""
        self._sync()
        self._advance(len(self.nodes))
        output = next(n for n in reversed(self.nodes) if n.op == "output")
        return [env[output] for env in self.envs]

    def _index_graph(self) -> None:
        self.nodes = list(self.gm.graph.nodes)
        self.order = {n.name: i for i, n in enumerate(self.nodes)}
        self.last_use = _last_uses(self.nodes)

    def _sync(self) -> None:
        """A refit may add nodes (an export-level layer given a bias reads it from a new ``get_attr``
        beside its weight): index the graph again and resume from its first node not yet run."""
        if len(self.gm.graph.nodes) == len(self.nodes):
            return
        self._index_graph()
        self.position = next((i for i, n in enumerate(self.nodes) if n not in self.done), len(self.nodes))

    def _index(self, name: str) -> int:
        self._sync()
        if name not in self.order:
            raise CalibrationError(f"graph has no node {name!r}")
        return self.order[name]

    def _advance(self, stop: int) -> None:
        for position in range(self.position, stop):
            node = self.nodes[position]
            if node in self.done:
                continue
            if self.weights is not None and node.op == "get_attr":
                self.done.add(node)  # fetched by its users, when they run
                continue
            attrs = self._fetch(node)
            for index, env in enumerate(self.envs):
                env.update(attrs)
                env[node] = self._spilled(self._run(node, env, index), position)
                for attr in attrs:
                    env.pop(attr, None)
                self._free(node, position, env)
            self.done.add(node)
        self.position = max(self.position, stop)

    def _fetch(self, node: fx.Node) -> dict[fx.Node, torch.Tensor]:
        """The weights ``node`` reads, from the weight source (once for every batch)."""
        if self.weights is None:
            return {}
        return {a: self.weights(str(a.target)) for a in node.all_input_nodes if a.op == "get_attr"}

    def _spilled(self, value: Any, position: int) -> Any:
        spill = self.spill
        node = self.nodes[position]
        if spill is None or not isinstance(value, torch.Tensor) or value.device.type != "cpu" or not value.numel() \
                or value.numel() * value.element_size() < spill.min_bytes \
                or self.last_use.get(node, position) - position < spill.distance:
            return value
        return spill.store(value)

    def _run(self, node: fx.Node, env: dict, index: int) -> Any:
        if node.op == "placeholder":
            return env[node]
        if node.op == "output":
            return torch.fx.node.map_arg(node.args[0], lambda n: env[n])
        self.runner.env = env
        try:
            value = self.runner.run_node(node)
        except NonFiniteActivationError:
            raise
        except Exception as exc:
            raise CalibrationError(f"calibration batch {index} fails at node {node.name!r}: "
                                   f"{type(exc).__name__}: {str(exc).strip()[:300]}") from exc
        return value

    def _free(self, node: fx.Node, position: int, env: dict) -> None:
        """Drop the values whose last user is ``node`` (the sequential scheme's memory bound)."""
        for arg in node.all_input_nodes:
            if self.last_use.get(arg) == position and arg.name not in self.keep:
                env.pop(arg, None)


def _batch_device(batches: Sequence[tuple]) -> torch.device:
    for batch in batches:
        for x in batch:
            if isinstance(x, torch.Tensor):
                return x.device
    return torch.device("cpu")


def _last_uses(nodes: Sequence[fx.Node]) -> dict[fx.Node, int]:
    order = {n: i for i, n in enumerate(nodes)}
    return {n: max((order[u] for u in n.users), default=order[n]) for n in nodes}


# --- moments of refitted layers, in one walk -----------------------------------------------------------
@dataclass(frozen=True)
class Stop:
    """One layer to refit: where its target (original graph) and its input (pruned graph) are."""

    target: str
    """The original graph's node whose output the refitted layer must reproduce."""
    input: str
    """The pruned graph's node feeding the layer."""
    consumer: str
    """The pruned graph's layer node: the walk stops before it while its weight is refitted."""


def walk_moments(original: fx.GraphModule, pruned: fx.GraphModule, stops: Sequence[Stop],
                 batches: Sequence[tuple], refit: Callable[[Stop, list, list], Any],
                 batches_pruned: Optional[Sequence[tuple]] = None,
                 weights: tuple[Optional[WeightSource], Optional[WeightSource]] = (None, None),
                 spill: Optional[Spill] = None, finish: bool = True) -> tuple[list[Any], list, list]:
    """For each stop in the pruned graph's order: walk both graphs to it, call ``refit(stop, targets,
    inputs)`` (per batch: the original layer's output, the pruned layer's input) — it may change the
    pruned graph's weights — and go on. Returns the ``refit`` results and both graphs' outputs.
    ``weights``: the original's and the pruned graph's weight sources (see :class:`Walk`); with
    ``finish=False`` the walks stop after the last stop (no outputs: an LM's logits are not computed).

    >>> reports, outs_o, outs_p = walk_moments(gm, pruned_gm, stops, [(x,)], refit)   # doctest: +SKIP
    """
    ordered = sorted(stops, key=lambda s: _position(pruned, s.consumer))
    walk_o = Walk(original, batches, keep=[s.target for s in ordered], weights=weights[0], spill=spill)
    walk_p = Walk(pruned, batches if batches_pruned is None else batches_pruned, weights=weights[1], spill=spill)
    results = []
    for stop in ordered:
        walk_p.run_before(stop.consumer)
        targets = walk_o.values_at(stop.target)
        inputs = walk_p.values_at(stop.input)
        results.append(refit(stop, targets, inputs))
        walk_o.release(stop.target)
        del targets, inputs
    if not finish:
        return results, [], []
    return results, walk_o.finish(), walk_p.finish()


def _position(gm: fx.GraphModule, name: str) -> int:
    for index, node in enumerate(gm.graph.nodes):
        if node.name == name:
            return index
    raise CalibrationError(f"the pruned graph has no node {name!r}")


def refit_block(original: fx.GraphModule, pruned: fx.GraphModule, stops: Sequence[Stop],
                inputs_original: Sequence[tuple], inputs_pruned: Sequence[tuple],
                refit: Callable[[Stop, list, list], Any]) -> tuple[list[Any], list[Any], list[Any]]:
    """One block of a block-by-block pipeline: refit ``pruned``'s layers at ``stops`` (``refit`` as in
    :func:`walk_moments`, e.g. :func:`fxprune.data.recovery.reconstruct`'s least squares), given both
    blocks' inputs per batch; returns both blocks' outputs per batch (the next block's inputs) and the
    ``refit`` results.

    >>> outs_o, outs_p, reports = refit_block(block, pruned_block, stops, xs, xs_pruned, refit)  # doctest: +SKIP
    """
    results, outs_o, outs_p = walk_moments(original, pruned, stops, inputs_original, refit, inputs_pruned)
    return outs_o, outs_p, results


def walk_statistics(gm: fx.GraphModule, batches: Sequence[tuple], sites: Sequence[Site],
                    weights: Optional[WeightSource] = None, spill: Optional[Spill] = None,
                    grams: Sequence[Any] = ()) -> Statistics:
    """The per-channel moments (and input Gram matrices at ``grams``) :func:`fxprune.data.calibration.collect`
    gathers at ``sites``, from one walk of every batch together (each weight fetched once, not once per
    batch), summed over the batches in order and over ``torch.distributed`` ranks.

    >>> stats = walk_statistics(analysis.gm, [(ids,)], calibration_sites(analysis), weights=read)  # doctest: +SKIP
    """
    from fxprune.data import calibration as calib
    sums = Sums()
    for site in sites:
        calib._zero_moments(sums, site)
    for gram in grams:
        sums.add(f"{gram.node}:gram", torch.zeros(gram.features, gram.features))  # as collect()
        sums.add(f"{gram.node}:rows", torch.zeros(()))
    sums.values = {k: v.to(_batch_device(batches)) for k, v in sums.values.items()}  # summed where the batches run
    walk = Walk(gm, batches, weights=weights, spill=spill)
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    observed = [(site.node, site, calib._add_moments) for site in sites]
    observed += [(gram.input, gram, calib._add_gram) for gram in grams]
    for node, item, add in sorted(observed, key=lambda entry: order[entry[0]]):
        for value in walk.values_at(node):
            add(sums, item, value)
    sums.add(":batches", torch.tensor(float(len(batches))))
    sums.all_reduce()
    sums.values = {k: v.cpu() for k, v in sums.values.items()}
    return Statistics(sums, {s.node: s for s in sites}, {g.node: g for g in grams},
                      int(sums[":batches"].item()))


def chunks(items: Sequence[torch.Tensor], rows: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Aligned slices of ``rows`` samples of several per-batch tensors (bounds float64 temporaries)."""
    size = items[0].shape[0]
    for start in range(0, size, max(1, rows)):
        yield tuple(x[start:start + rows] for x in items)


__all__ = ["Walk", "Stop", "Spill", "WeightSource", "walk_moments", "walk_statistics", "refit_block"]
