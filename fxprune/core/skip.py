"""Run a graph with some residual blocks skipped, without building a graph per choice.

SLEB asks, at each greedy step, what the model computes with the blocks already chosen and one more
candidate skipped, for every candidate. Building a new GraphModule per candidate (copy the graph, drop
the dead code, recompile) and running it from the start costs a graph rebuild and a whole forward pass
per candidate. Here the one captured graph is interpreted instead:

- a skipped block's adds take their shortcut's value, and nodes that only fed a skipped branch are
  not run (the values that reach the output are the same ops on the same inputs as in the graph
  :func:`fxprune.core.blocks.skipping` builds, so the outputs are bit-identical);
- everything before a candidate's input node is the same with or without the candidate, so the graph
  runs once up to the last candidate, keeping the values still needed at each candidate's input (the
  residual stream, the rotary tables, the mask: a few tensors), and each candidate resumes from there.

A step then costs one forward pass plus, per candidate, the layers after it (about half a forward on
average), and no graph is copied or compiled.

>>> runner = SkipRunner(gm, find_blocks(gm))                                          # doctest: +SKIP
>>> for name, outputs in runner.trials((x,), ["layers.5"], ["layers.2", "layers.7"]): # doctest: +SKIP
...     print(name, outputs.logits.shape)
"""
from __future__ import annotations

import operator
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.fx as fx

from fxprune.core.blocks import Blocks
from fxprune.core.capture import MutableArgs

#: Python's in-place operators (an ``x += y`` traced at the fx level mutates ``x``).
INPLACE = frozenset({operator.iadd, operator.isub, operator.imul, operator.itruediv})

Env = dict[fx.Node, Any]


class SkipRunner(MutableArgs, fx.Interpreter):
    """Interprets ``gm`` (either level) with blocks of ``found`` skipped; see the module docstring."""

    def __init__(self, gm: fx.GraphModule, found: Blocks) -> None:
        super().__init__(gm)
        self.extra_traceback = False
        self.order = list(gm.graph.nodes)
        self.position = {n: i for i, n in enumerate(self.order)}
        self.named = {n.name: n for n in self.order}
        self.blocks = {b.name: b for b in found.blocks}
        self.body = sum(1 for n in self.order if n.op == "placeholder")  # fx puts the inputs first
        # values an in-place op edits: copied where a saved value is handed to more than one run
        self.mutated = {a for n in self.order if _mutates(n) for a in n.all_input_nodes}

    def trials(self, inputs: tuple, chosen: Sequence[str], candidates: Sequence[str]) -> Iterator[tuple[str, Any]]:
        """``(candidate, outputs)`` for each candidate: the graph run on ``inputs`` without the blocks
        ``chosen`` and without that candidate."""
        base = self.aliases(chosen)
        starts = {name: self.start(name) for name in candidates}
        saved = self._prefix(inputs, base, set(starts.values()))
        for name in candidates:
            yield name, self.run_from(saved[starts[name]], starts[name], {**base, **self.aliases([name])})

    def values(self, inputs: tuple, chosen: Sequence[str], wanted: set[str]) -> dict[str, Any]:
        """The values of the ``wanted`` nodes (names) in the graph run on ``inputs`` without ``chosen``
        (a skipped add's value is its shortcut's)."""
        aliases = self.aliases(chosen)
        seen = {}
        self._begin(inputs)
        with torch.no_grad():
            for node, free in self._schedule(0, aliases):
                self._step(node, free, aliases)
                if node.name in wanted:
                    seen[node.name] = self.env[node]
        return seen

    def aliases(self, names: Sequence[str]) -> dict[fx.Node, fx.Node]:
        """Each add of the named blocks -> its shortcut."""
        return {self.named[r.add]: self.named[r.shortcut] for n in names for r in self.blocks[n].residuals}

    def start(self, name: str) -> int:
        """The position right after the block's input node (and the graph's inputs): nothing before it
        depends on the block."""
        return max(self.position[self.named[self.blocks[name].input]] + 1, self.body)

    def run_from(self, env: Env, start: int, aliases: Mapping[fx.Node, fx.Node]) -> Any:
        """The graph's outputs, running the nodes from ``start`` on ``env`` (values before ``start``)."""
        self.env = self._snapshot(env)
        with torch.no_grad():
            for node, free in self._schedule(start, aliases):
                self._step(node, free, aliases)
                if node.op == "output":
                    return self.graph.process_outputs(self.env[node])
        raise AssertionError("the graph has no output node")

    def _prefix(self, inputs: tuple, aliases: Mapping[fx.Node, fx.Node], stops: set[int]) -> dict[int, Env]:
        """Run from the start up to the last of ``stops``, keeping the live values at each stop (the
        values before the first node at or past it that the output needs)."""
        saved: dict[int, Env] = {}
        self._begin(inputs)
        pending = sorted(stops)
        with torch.no_grad():
            for node, free in self._schedule(0, aliases):
                while pending and pending[0] <= self.position[node]:
                    saved[pending.pop(0)] = self._snapshot(self.env)
                if not pending:
                    return saved
                self._step(node, free, aliases)
        raise AssertionError(f"positions {pending} are past the graph's output")

    def _begin(self, inputs: tuple) -> None:
        """A run of the graph from its first node on ``inputs``."""
        self.env = {}
        self.args_iter = iter(self.graph.process_inputs(*inputs))

    def _step(self, node: fx.Node, free: list[fx.Node], aliases: Mapping[fx.Node, fx.Node]) -> None:
        """Run ``node`` (a skipped add takes its shortcut's value), then drop the values it read last."""
        self.env[node] = self.env[aliases[node]] if node in aliases else self.run_node(node)
        for done in free:
            del self.env[done]

    def _snapshot(self, env: Env) -> Env:
        """``env`` for another run to start from: values an in-place op edits are copied."""
        return {n: _copy(v) if n in self.mutated else v for n, v in env.items()}

    def _schedule(self, start: int, aliases: Mapping[fx.Node, fx.Node]) -> list[tuple[fx.Node, list[fx.Node]]]:
        """The nodes from ``start`` that the output needs (an aliased add needs only its shortcut),
        each with the values it is the last to read."""
        needed = {self.order[-1]}
        for node in reversed(self.order):
            if node in needed:
                needed.update([aliases[node]] if node in aliases else node.all_input_nodes)
        run = [n for n in self.order[start:] if n in needed or n.op == "placeholder"]  # each takes its input
        last: dict[fx.Node, fx.Node] = {}
        for node in run:
            for read in ([aliases[node]] if node in aliases else node.all_input_nodes):
                last[read] = node
        frees: dict[fx.Node, list[fx.Node]] = {}
        for read, node in last.items():
            frees.setdefault(node, []).append(read)
        return [(n, frees.get(n, [])) for n in run]


def _mutates(node: fx.Node) -> bool:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.is_mutable
    if target in INPLACE:
        return True
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    return node.op in ("call_function", "call_method") and name.endswith("_") and not name.endswith("__")


def _copy(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value


__all__ = ["SkipRunner"]
