"""Which residual blocks to remove, from calibration data, and a least-squares repair of the gap.

Four criteria, each reading the graph's residual stream on calibration batches (blocks from
:func:`fxprune.core.blocks.find_blocks`; the lowest score goes first):

- ``block-influence`` (ShortGPT): ``1 - cos(x_in, x_out)`` between a block's input and output stream,
  averaged over tokens (the cosine is taken over the feature dim: the last, or dim 1 of an NCHW map);
- ``angular`` (Gromov et al.): ``arccos(cos(x_l, x_{l+n})) / π`` between the input of block ``l`` and
  the output of block ``l+n-1``, averaged over tokens; the ``n`` consecutive blocks with the smallest
  distance go (``n`` = the number removed);
- ``iterative-influence``: Block Influence, one block at a time, each step rescored on the model
  without the blocks already chosen (a cheap SLEB: one forward pass per step);
- ``sleb`` (SLEB): greedy, one block at a time, the block whose removal (with those already chosen)
  raises a loss on the calibration data least. The loss is ``loss(outputs, inputs)`` when given (the
  HF adapter gives next-token cross-entropy), else the relative squared error of all outputs from the
  original's. A step runs the calibration data once up to the last candidate and, per candidate, only
  the layers after it (:class:`fxprune.core.skip.SkipRunner`): no graph is rebuilt.

:func:`repair` is the training-free repair: for each run of consecutive removed blocks, the linear layer
that makes the last write into the stream before the run (a LLaMA layer's ``down_proj``, a ViT block's
last MLP linear) is refitted by ridge least squares so that it also writes what the run wrote:
``W' = argmin Σ ‖W' a - (W a + x_out - x_in)‖² + λ ‖W' - W‖²`` over the calibration tokens, where ``a``
is its input, ``x_in``/``x_out`` the run's input and output stream in the original model and
``λ = ridge · tr(G) / n`` (``G = Σ a aᵀ``). The pull toward the old weight ``W`` (fit
``toward-original``, the default) is what makes it generalise: a few calibration sequences give fewer
tokens than ``a`` has features, and a ridge toward zero (``refit``) fits them almost exactly and the
held-out text worse. ``output-map`` (``T W`` with ``T`` of the stream's width, toward the identity) and
``scale`` (one scale per output channel) are the smaller fits (:data:`REPAIR_FITS`). Shapes do not
change, so an HF config still holds the model. A run with no such linear before it is listed, with the
reason. That is walk ``run``; walk ``sequential`` (:data:`REPAIR_WALKS`) refits, in graph order, the last
writer of every kept block from the one before the first removed run on, each so that the stream after
its block matches the original's at that point, on the inputs the pruned and already repaired graph
gives it (``sequential-all``: every writer of those blocks, a decoder layer's ``o_proj`` too). On
SmolLM2-135M with 25% of its layers removed it is the one that meets 1.8× dense (README, depth).

>>> chosen, scores = choose_blocks(gm, find_blocks(gm), loader, 2, "angular")          # doctest: +SKIP
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
import torch.utils._pytree as pytree

from fxprune.core.blocks import Block, Blocks, consecutive_runs
from fxprune.core.skip import SkipRunner
from fxprune.core.graph import attribute
from fxprune.data.calibration import eval_mode, run_batches, token_rows
from fxprune.data.recovery import masked_chunks, relative_error
from fxprune.data.sequential import Walk
from fxprune.errors import CalibrationError, InvalidOptionError
# BLOCK_CRITERIA re-exported: declared in the options module
from fxprune.options import BLOCK_CRITERIA, BLOCK_REPAIRS, keyed_by

Loss = Callable[[Any, tuple], torch.Tensor]


def check_block_criterion(criterion: Any) -> str:
    if criterion not in BLOCK_CRITERIA:
        raise InvalidOptionError(f"unknown block criterion {criterion!r}; use one of {BLOCK_CRITERIA}")
    return criterion


def check_count(count: Any, found: Blocks) -> int:
    """``count`` blocks can go: at least one block stays (a model with none left is refused)."""
    total = len(found.blocks)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise InvalidOptionError(f"the number of blocks to remove must be an int >= 0, got {count!r}")
    if count >= total:
        raise InvalidOptionError(f"cannot remove {count} of the {total} removable blocks: at least one must "
                                 f"stay (blocks: {list(found.names)[:8]})")
    return count


# --- the residual stream's angles -----------------------------------------------------------------------
def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    dim = 1 if a.dim() == 4 else -1
    return F.cosine_similarity(a.float(), b.float(), dim=dim).flatten()


def _real_cosines(x_in: torch.Tensor, x_out: torch.Tensor, mask: Optional[torch.Tensor], node: str,
                  index: int) -> torch.Tensor:
    """Per token, ``cos(x_in, x_out)`` of the stream, padded positions left out."""
    cos = _cosine(x_in, x_out)
    real = token_rows(mask, x_out, 1 if x_out.dim() == 4 else -1, node, index)
    return cos if real is None else cos[real]


def span_angles(gm: fx.GraphModule, found: Blocks, calibration: Any, span: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each start ``l``: mean cosine and mean angular distance (``arccos / π``) between the input of
    block ``l`` and the output of block ``l+span-1`` (``nan`` where those blocks do not form one run)."""
    blocks = found.blocks
    starts = [l for l in range(len(blocks) - span + 1) if _one_stream(blocks[l:l + span])]
    ends = {blocks[l + span - 1].output: l for l in starts}
    sums = torch.zeros(len(blocks), 3, dtype=torch.float64)  # cos, angle, count
    held: dict[str, torch.Tensor] = {}

    def observe(index: int, node: fx.Node, value: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
        if node.name in {blocks[l].input for l in starts}:
            held[node.name] = value.detach()
        if node.name in ends:
            cos = _real_cosines(held[blocks[ends[node.name]].input], value, mask, node.name, index)
            angle = torch.arccos(cos.clamp(-1, 1)) / math.pi
            sums[ends[node.name]] += torch.tensor([float(cos.sum()), float(angle.sum()), cos.numel()],
                                                  dtype=torch.float64)

    run_batches(gm, calibration, {blocks[l].input for l in starts} | set(ends), observe, with_mask=True)
    count = sums[:, 2].clamp(min=1)
    invalid = sums[:, 2] == 0
    return (sums[:, 0] / count).masked_fill(invalid, math.nan), (sums[:, 1] / count).masked_fill(invalid, math.nan)


def _one_stream(blocks: Sequence[Block]) -> bool:
    return len({b.shape for b in blocks}) == 1


# --- choosing -------------------------------------------------------------------------------------------
def choose_blocks(gm: fx.GraphModule, found: Blocks, calibration: Any, count: int, criterion: str,
                  loss: Optional[Loss] = None) -> tuple[tuple[str, ...], dict[str, float]]:
    """The names of the ``count`` blocks to remove and every block's score (lower goes first)."""
    check_block_criterion(criterion)
    check_count(count, found)
    if count == 0:
        return (), {}
    return BLOCK_CRITERION_RECORDS[criterion](gm, found, calibration, count, loss)


def _influence(gm: fx.GraphModule, found: Blocks, calibration: Any, count: int,
               loss: Optional[Loss]) -> tuple[tuple[str, ...], dict[str, float]]:
    cos, _ = span_angles(gm, found, calibration, 1)
    influence = 1 - cos
    order = sorted(range(len(found.blocks)), key=lambda i: (float(influence[i]), i))
    chosen = {found.names[i] for i in order[:count]}
    return tuple(n for n in found.names if n in chosen), _named(found, influence)


def _angular(gm: fx.GraphModule, found: Blocks, calibration: Any, count: int,
             loss: Optional[Loss]) -> tuple[tuple[str, ...], dict[str, float]]:
    _, angle = span_angles(gm, found, calibration, count)
    start = int(torch.nan_to_num(angle, nan=math.inf).argmin())
    if math.isnan(float(angle[start])):
        raise InvalidOptionError(f"no {count} consecutive blocks share one residual stream; remove fewer, "
                                 f"or use criterion='block-influence'")
    return found.names[start:start + count], _named(found, angle)


def _named(found: Blocks, scores: torch.Tensor) -> dict[str, float]:
    return {n: float(s) for n, s in zip(found.names, scores) if not math.isnan(float(s))}


def _sleb(gm: fx.GraphModule, found: Blocks, calibration: Any, count: int,
          loss: Optional[Loss]) -> tuple[tuple[str, ...], dict[str, float]]:
    measure = _Measure(gm, calibration, loss)
    runner = SkipRunner(gm, found)
    chosen: list[str] = []
    scores: dict[str, float] = {}
    for _ in range(count):
        trial = measure.trials(runner, chosen, [n for n in found.names if n not in chosen])
        best = min(trial, key=lambda n: (trial[n], found.names.index(n)))
        chosen.append(best)
        scores[best] = trial[best]
    return tuple(n for n in found.names if n in chosen), scores


def _iterative_influence(gm: fx.GraphModule, found: Blocks, calibration: Any, count: int,
                         loss: Optional[Loss]) -> tuple[tuple[str, ...], dict[str, float]]:
    """Block Influence rescored on the model without the blocks already chosen, one block per step
    (one forward pass of the calibration data per step)."""
    runner = SkipRunner(gm, found)
    chunks = list(masked_chunks(gm, calibration))
    chosen: list[str] = []
    scores: dict[str, float] = {}
    for _ in range(count):
        left = [b for b in found.blocks if b.name not in chosen]
        with eval_mode(gm):
            influence = _influence_without(runner, chunks, chosen, left)
        best = min(range(len(left)), key=lambda i: (float(influence[i]), i))
        chosen.append(left[best].name)
        scores[left[best].name] = float(influence[best])
    return tuple(n for n in found.names if n in chosen), scores


def _influence_without(runner: SkipRunner, chunks: list, chosen: list[str], left: list[Block]) -> torch.Tensor:
    """``1 - cos`` of each block's input and output stream, in the model without ``chosen``."""
    sums = torch.zeros(len(left), 2, dtype=torch.float64)  # cos, count
    for index, inputs, mask in chunks:
        seen = runner.values(inputs, chosen, {b.input for b in left} | {b.output for b in left})
        for i, block in enumerate(left):
            cos = _real_cosines(seen[block.input], seen[block.output], mask, block.output, index)
            sums[i] += torch.tensor([float(cos.sum()), cos.numel()], dtype=torch.float64)
    return 1 - sums[:, 0] / sums[:, 1].clamp(min=1)


#: Each block criterion (named in :data:`fxprune.options.BLOCK_CRITERIA`) as ``(gm, blocks, calibration,
#: count, loss) -> (names removed, scores)``: adding a criterion is one entry here and one name there.
BLOCK_CRITERION_RECORDS = keyed_by(BLOCK_CRITERIA, {"block-influence": _influence, "angular": _angular,
                                                    "sleb": _sleb, "iterative-influence": _iterative_influence},
                                   "block criteria")


class _Measure:
    """The calibration loss of a graph with blocks skipped: ``loss(outputs, inputs)`` averaged over the
    chunks, or the relative squared error of its outputs from the original's (held once, per chunk)."""

    def __init__(self, gm: fx.GraphModule, calibration: Any, loss: Optional[Loss]) -> None:
        chunks = list(masked_chunks(gm, calibration))
        self.chunks, self.masks = [c for _, c, _ in chunks], [m for _, _, m in chunks]
        self.loss = loss
        self.reference = None if loss is not None else [_leaves(_run(gm, x)) for x in self.chunks]

    def trials(self, runner: SkipRunner, chosen: Sequence[str], candidates: Sequence[str]) -> dict[str, float]:
        """Each candidate's score with ``chosen`` and it skipped (one :meth:`SkipRunner.trials` per chunk)."""
        sums = {n: [0.0, 0.0] for n in candidates}  # loss or squared error; chunks or squared norm
        with eval_mode(runner.module):
            for index, (x, mask) in enumerate(zip(self.chunks, self.masks)):
                for name, outputs in runner.trials(x, chosen, candidates):
                    self._add(sums[name], outputs, x, mask, index)
        return {n: s[0] / max(s[1], 1e-300) for n, s in sums.items()}

    def _add(self, sums: list[float], outputs: Any, inputs: tuple, mask: Optional[torch.Tensor], index: int) -> None:
        if self.loss is not None:
            sums[0] += float(self._loss(outputs, inputs, mask))
            sums[1] += 1
            return
        for a, b in zip(_leaves(outputs), self.reference[index]):
            real = token_rows(mask, b, -1, "output", index)  # padded positions left out
            a, b = (a, b) if real is None else (a.reshape(-1, a.shape[-1])[real], b.reshape(-1, b.shape[-1])[real])
            sums[0] += float((a.double() - b.double()).pow(2).sum())
            sums[1] += float(b.double().pow(2).sum())

    def _loss(self, outputs: Any, inputs: tuple, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """The loss, told the padded positions (``mask=``) where a batch has some."""
        if mask is None:
            return self.loss(outputs, inputs)
        try:
            return self.loss(outputs, inputs, mask=mask)
        except TypeError as exc:
            raise CalibrationError(f"the calibration batches are padded (attention_mask) and the block loss "
                                   f"takes no mask= argument to leave the padding out: {exc}") from exc


def _run(gm: fx.GraphModule, inputs: tuple) -> Any:
    with torch.no_grad(), eval_mode(gm):
        return gm(*inputs)


def _leaves(output: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]


# --- repair -------------------------------------------------------------------------------------------
#: The repair's default fit and ridge, chosen by measurement (``benchmarks/bench_depth_repair.py`` on
#: SmolLM2-135M, 4 calibration sequences): a free refit overfits the few calibration tokens (its
#: calibration error falls from 0.85 to 0.003 and held-out perplexity rises), a ridge toward the old
#: weight keeps what the tokens do not pin down.
DEFAULT_FIT = "toward-original"
DEFAULT_RIDGE = 1.0
#: The walk ``block_repair=True`` asks for: on SmolLM2 with Block Influence's choices (the default
#: criterion) it beats ``run`` at 10% and 25% of the layers on 4, 16 and 32 calibration sequences
#: (``bench_depth_repair_seq.json``; 25% on 32 sequences: 1.41x against 2.34x). Not everywhere: on
#: SLEB's 10% choice with 4 sequences ``run`` is better (1.195x against 1.222x).
DEFAULT_WALK = "sequential-all"
@dataclass(frozen=True)
class BlockRepair:
    """One run of removed blocks and the linear refitted in its place (or why none was)."""

    run: tuple[str, ...]
    layer: str
    """The refitted weight (a state_dict key), or '' when none was."""
    error_before: float = math.nan
    """``‖W a - target‖ / ‖target‖`` over the calibration tokens with the original weight."""
    error_after: float = math.nan
    reason: str = ""

    def __str__(self) -> str:
        if not self.layer:
            return f"{'+'.join(self.run)}: not repaired ({self.reason})"
        return f"{'+'.join(self.run)}: {self.layer} refitted, error {self.error_before:.3f} -> {self.error_after:.3f}"


def repair(original: fx.GraphModule, pruned: fx.GraphModule, found: Blocks, dropped: Sequence[Block],
           calibration: Any, ridge: float = DEFAULT_RIDGE, fit: str = DEFAULT_FIT,
           walk: str = DEFAULT_WALK) -> list[BlockRepair]:
    """Refit, in ``pruned`` (edited in place: the caller's own new graph), the linears ``walk`` (a
    :data:`REPAIR_WALKS` name) chooses, by ``fit`` (a :data:`REPAIR_FITS` name)."""
    check_repair_fit(fit)
    check_repair_walk(walk)
    return REPAIR_WALKS[walk](original, pruned, found, dropped, calibration, ridge, fit)


def _repair_runs(original: fx.GraphModule, pruned: fx.GraphModule, found: Blocks, dropped: Sequence[Block],
                 calibration: Any, ridge: float, fit: str) -> list[BlockRepair]:
    """Walk ``run``: the one linear before each removed run, on the original model's activations."""
    return [_repair_run(original, pruned, found, run, calibration, ridge, fit)
            for run in consecutive_runs(found, dropped)]


def _repair_run(original: fx.GraphModule, pruned: fx.GraphModule, found: Blocks, run: tuple[Block, ...],
                calibration: Any, ridge: float, fit: str) -> BlockRepair:
    names = tuple(b.name for b in run)
    writer, reason = _writer(original, found, run)
    if writer is None:
        return BlockRepair(names, "", reason=reason)
    node, weight_key, bias_key = writer
    gram, cross, yy = _moments(original, node, run, calibration, bias_key is not None)
    old = _weight_matrix(original, weight_key, bias_key)
    new = REPAIR_FITS[fit](gram, cross, old, ridge)
    before, after = (relative_error(w, gram, cross, yy) for w in (old, new))
    if not after < before:
        return BlockRepair(names, "", before, after, "the refit does not lower the error")
    _write(pruned, weight_key, bias_key, new)
    return BlockRepair(names, weight_key, before, after)


def _writer(gm: fx.GraphModule, found: Blocks, run: tuple[Block, ...]) -> tuple[Optional[tuple], str]:
    """(linear node, weight key, bias key) making the last write before ``run``, or None and why."""
    index = found.names.index(run[0].name)
    if index == 0 or found.blocks[index - 1].shape != run[0].shape:
        return None, "no kept block writes into the stream just before it"
    branch = next(n for n in gm.graph.nodes if n.name == found.blocks[index - 1].residuals[-1].branch)
    keys = _linear_keys(gm, branch)
    if keys is None:
        return None, f"the last write before it ({branch.name}) is not a linear layer"
    return (branch, *keys), ""


def _linear_keys(gm: fx.GraphModule, node: fx.Node) -> Optional[tuple[str, Optional[str]]]:
    if node.op == "call_module" and type(gm.get_submodule(node.target)) is torch.nn.Linear:
        has_bias = gm.get_submodule(node.target).bias is not None
        return f"{node.target}.weight", f"{node.target}.bias" if has_bias else None
    if node.op == "call_function" and node.target is torch.ops.aten.linear.default:
        params = [a.target if isinstance(a, fx.Node) and a.op == "get_attr" else None for a in node.args[1:3]]
        if params[0] is not None and (len(node.args) < 3 or node.args[2] is None or params[1] is not None):
            return str(params[0]), (str(params[1]) if len(params) > 1 and params[1] else None)
    return None


def _moments(gm: fx.GraphModule, node: fx.Node, run: tuple[Block, ...], calibration: Any,
             bias: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``Σ ã ãᵀ``, ``Σ ã tᵀ`` and ``Σ ‖t‖²`` with ``t = W a + x_out - x_in`` (float64)."""
    source, first, last = node.args[0].name, run[0].input, run[-1].output
    held: dict[str, torch.Tensor] = {}
    sums: dict[str, Any] = {"gram": 0, "cross": 0, "yy": 0.0}

    def observe(index: int, seen: fx.Node, value: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
        held[seen.name] = value.detach()
        if seen.name == last:
            _add_moments(sums, held[source], held[node.name] + value - held[first], mask, source, index, bias)

    run_batches(gm, calibration, {source, node.name, first, last}, observe, with_mask=True)
    return sums["gram"], sums["cross"], sums["yy"]


def _add_moments(sums: dict[str, Any], a: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor],
                 source: str, index: int, bias: bool) -> None:
    """Add one chunk's real tokens to ``Σ ã ãᵀ``, ``Σ ã tᵀ`` and ``Σ ‖t‖²`` (``ã``: ``a``, with a 1 for
    a bias)."""
    real = token_rows(mask, a, -1, source, index)
    a = a.reshape(-1, a.shape[-1]).double()
    target = target.reshape(a.shape[0], -1).double()
    a, target = (a, target) if real is None else (a[real], target[real])
    if bias:
        a = torch.cat([a, torch.ones_like(a[:, :1])], 1)
    sums["gram"] = sums["gram"] + a.T @ a
    sums["cross"] = sums["cross"] + a.T @ target
    sums["yy"] += float(target.pow(2).sum())


def _weight_matrix(gm: fx.GraphModule, weight_key: str, bias_key: Optional[str]) -> torch.Tensor:
    w = attribute(gm, weight_key).detach().double()
    return torch.cat([w, attribute(gm, bias_key).detach().double()[:, None]], 1) if bias_key else w


def _solve(gram: torch.Tensor, cross: torch.Tensor, ridge: float, prior: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(G + λ I)⁻¹ (C + λ P)`` with ``λ = ridge · tr(G) / n`` (the ridge pulls the solution toward
    ``P``, zero when None); the ridge grows until G factorises."""
    lam = max(ridge, 1e-10) * float(gram.diagonal().mean())
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    for _ in range(12):
        factor, info = torch.linalg.cholesky_ex(gram + lam * eye)
        if int(info) == 0:
            return torch.cholesky_solve(cross if prior is None else cross + lam * prior, factor)
        lam *= 10
    return torch.linalg.lstsq(gram + lam * eye, cross if prior is None else cross + lam * prior).solution


# Each fit: (Σ ã ãᵀ, Σ ã tᵀ, the weight W [| bias], ridge) -> the new weight [| bias]. ã is the layer's
# input, t what it should write (its own output plus what the removed run wrote).
def _fit_refit(gram: torch.Tensor, cross: torch.Tensor, old: torch.Tensor, ridge: float) -> torch.Tensor:
    """A new weight, ridge toward zero (every entry free: out × in parameters)."""
    return _solve(gram, cross, ridge).T


def _fit_toward_original(gram: torch.Tensor, cross: torch.Tensor, old: torch.Tensor, ridge: float) -> torch.Tensor:
    """A new weight, ridge toward the old one: with few tokens the directions they do not span keep
    their weights instead of being zeroed."""
    return _solve(gram, cross, ridge, old.T).T


def _fit_output_map(gram: torch.Tensor, cross: torch.Tensor, old: torch.Tensor, ridge: float) -> torch.Tensor:
    """``T W`` with ``T`` (out × out, ridge toward the identity) fitted on the layer's output ``y = W ã``:
    a map of the stream's own width folded into the weight (ReplaceMe's linear transform)."""
    transform = _solve(old @ gram @ old.T, old @ cross, ridge, torch.eye(old.shape[0], dtype=old.dtype)).T
    return transform @ old


def _fit_scale(gram: torch.Tensor, cross: torch.Tensor, old: torch.Tensor, ridge: float) -> torch.Tensor:
    """``diag(s) W``: one scale per output channel (out parameters), ridge toward 1."""
    yy = ((old @ gram) * old).sum(1)
    yt = (old * cross.T).sum(1)
    lam = max(ridge, 1e-10) * float(yy.mean())
    return ((yt + lam) / (yy + lam))[:, None] * old


#: The repair's fits by name (``fit=`` of :func:`repair`).
REPAIR_FITS = {"refit": _fit_refit, "toward-original": _fit_toward_original, "output-map": _fit_output_map,
               "scale": _fit_scale}


def check_repair_fit(fit: Any) -> str:
    if fit not in REPAIR_FITS:
        raise InvalidOptionError(f"unknown block repair fit {fit!r}; use one of {tuple(REPAIR_FITS)}")
    return fit


def _write(gm: fx.GraphModule, weight_key: str, bias_key: Optional[str], matrix: torch.Tensor) -> None:
    weight = attribute(gm, weight_key)
    with torch.no_grad():
        weight.copy_(matrix[:, :weight.shape[1]].to(weight.dtype))
        if bias_key:
            attribute(gm, bias_key).copy_(matrix[:, -1].to(weight.dtype))

# --- the sequential walk ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Writer:
    """A kept block's linear that writes a residual branch, and the stream its add should reach."""

    block: str
    node: str
    """The linear node (its name: the same in the original and the pruned graph)."""
    add: str
    """The add of the branch to the stream (its shortcut operand may be a removed block's add in the
    original: the pruned graph's own operand is read)."""
    target: str
    """The original's node holding the stream after this add: the add itself, or for a block's last add
    the output of the removed run that follows it."""
    weight_key: str
    bias_key: Optional[str]


def _sequential(residuals: slice) -> Callable[..., list[BlockRepair]]:
    """Walk ``sequential`` (``residuals``: which of a block's adds have their writer refitted)."""
    def walk(original: fx.GraphModule, pruned: fx.GraphModule, found: Blocks, dropped: Sequence[Block],
             calibration: Any, ridge: float, fit: str) -> list[BlockRepair]:
        writers, repairs = _sequential_writers(original, found, dropped, residuals)
        chunks = list(masked_chunks(original, calibration))
        runner = SkipRunner(original, found)
        with eval_mode(original):
            targets = [runner.values(x, [], {w.target for w in writers}) for _, x, _ in chunks]
        # the pruned graph walked once, stop by stop: each writer is refitted on what the nodes before it
        # (and the writers already refitted) give, and the nodes after it run with its new weight
        walk = Walk(pruned, [x for _, x, _ in chunks])
        with eval_mode(pruned):
            return repairs + [_refit_writer(pruned, walk, w, targets, chunks, ridge, fit) for w in writers]
    return walk


def _sequential_writers(gm: fx.GraphModule, found: Blocks, dropped: Sequence[Block],
                        residuals: slice) -> tuple[list[_Writer], list[BlockRepair]]:
    """The writers of every kept block from the one before the first removed block on, in graph order;
    and the blocks whose writer is not a linear layer (not repaired, with the reason)."""
    removed = {b.name for b in dropped}
    first = min(found.names.index(n) for n in removed)
    writers: list[_Writer] = []
    skipped: list[BlockRepair] = []
    for index in range(max(first - 1, 0), len(found.blocks)):
        block = found.blocks[index]
        if block.name in removed:
            continue
        end = _stream_end(found, removed, index)
        # before the first run only the write into the run's stream changes its target
        for residual in block.residuals[residuals] if index >= first else block.residuals[-1:]:
            branch = next(n for n in gm.graph.nodes if n.name == residual.branch)
            keys = _linear_keys(gm, branch)
            if keys is None:
                why = f"its write ({branch.name}) is not a linear layer"
                skipped.append(BlockRepair((block.name,), "", reason=why))
                continue
            target = end if residual == block.residuals[-1] else residual.add
            writers.append(_Writer(block.name, branch.name, residual.add, target, *keys))
    return writers, skipped


def _stream_end(found: Blocks, removed: set[str], index: int) -> str:
    """The original's stream where the pruned model's stream after block ``index`` continues: the output
    of the removed blocks right after it (same stream shape), else its own output."""
    end = index
    while end + 1 < len(found.blocks) and found.names[end + 1] in removed \
            and found.blocks[end + 1].shape == found.blocks[index].shape:
        end += 1
    return found.blocks[end].output


def _refit_writer(gm: fx.GraphModule, walk: Walk, writer: _Writer, targets: list[dict[str, torch.Tensor]],
                  chunks: list[tuple], ridge: float, fit: str) -> BlockRepair:
    """Refit ``writer`` so that the add after it reaches the original's stream, on the inputs the pruned
    (and already repaired) graph gives it."""
    with torch.no_grad():
        walk.run_before(writer.node)
    node, add = (walk.nodes[walk.order[name]] for name in (writer.node, writer.add))
    [shortcut] = [a for a in add.args if isinstance(a, fx.Node) and a is not node]
    sums: dict[str, Any] = {"gram": 0, "cross": 0, "yy": 0.0}
    for (index, _, mask), env, wanted in zip(chunks, walk.envs, targets):
        source = node.args[0]
        _add_moments(sums, env[source], wanted[writer.target] - env[shortcut], mask, source.name, index,
                     writer.bias_key is not None)
    old = _weight_matrix(gm, writer.weight_key, writer.bias_key)
    new = REPAIR_FITS[fit](sums["gram"], sums["cross"], old, ridge)
    before, after = (relative_error(w, sums["gram"], sums["cross"], sums["yy"]) for w in (old, new))
    if not after < before:
        return BlockRepair((writer.block,), "", before, after, "the refit does not lower the error")
    _write(gm, writer.weight_key, writer.bias_key, new)
    return BlockRepair((writer.block,), writer.weight_key, before, after)


#: What the repair refits (``walk=`` of :func:`repair`): ``run``, the linear before each removed run on
#: the original's activations; ``sequential``, the last writer of every kept block from there on, each
#: on the inputs the pruned and already repaired model gives it, toward the original's stream at that
#: point (SparseGPT's sequential scheme applied to depth); ``sequential-all``, every writer of those
#: blocks (a decoder layer's ``o_proj`` too).
REPAIR_WALKS = keyed_by(BLOCK_REPAIRS, {"run": _repair_runs, "sequential": _sequential(slice(-1, None)),
                                       "sequential-all": _sequential(slice(None))}, "block repair walks")


def check_repair_walk(walk: Any) -> str:
    if walk not in REPAIR_WALKS:
        raise InvalidOptionError(f"unknown block repair walk {walk!r}; use one of {tuple(REPAIR_WALKS)}")
    return walk



__all__ = ["BLOCK_CRITERIA", "check_block_criterion", "check_count", "span_angles", "choose_blocks", "repair",
           "BlockRepair", "REPAIR_FITS", "DEFAULT_FIT", "DEFAULT_RIDGE", "check_repair_fit",
           "REPAIR_WALKS", "DEFAULT_WALK", "check_repair_walk"]
