"""Fuzzing the promise that fxprune never returns a broken model.

Hypothesis draws a network from the block DSL in ``netspec.py`` (conv, grouped and depthwise conv, BN,
activations as modules and functions, pooling, residual adds, squeeze-excite gating, cat, split/chunk,
channels-last permutes, flatten, LSTM, LayerNorm, Linear, channel and pixel shuffles, GLU, transformer
encoder layers) and pruning options (sparsity, criterion,
``round_to``, ``global_ranking``, ``min_keep``, capture level), then :func:`fxprune.testing.check.check_pruned`
asserts every promise: the input is untouched, the result runs and keeps its output shape, ``verify``
passes, a rerun is byte-identical and the plan survives JSON and re-applies.

A failure shrinks to a minimal ``(in_channels, blocks)`` spec and options; paste them into
``test_regressions.py``. CI runs a fixed, derandomized set of :data:`CI_EXAMPLES` examples. A long run
draws fresh examples and can log every one (JSON lines)::

    FXPRUNE_FUZZ_EXAMPLES=2000 FXPRUNE_FUZZ_LOG=/tmp/fuzz.jsonl pytest tests/fuzz/test_fuzz.py -q \
        --hypothesis-show-statistics
"""
from __future__ import annotations

import json
import math
import os
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fxprune.testing.check import check_pruned
from netspec import ACTIVATIONS, SIZE, build, prunable_width

CI_EXAMPLES = 25
EXAMPLES = int(os.environ.get("FXPRUNE_FUZZ_EXAMPLES", CI_EXAMPLES))
LONG_RUN = "FXPRUNE_FUZZ_EXAMPLES" in os.environ
LOG = os.environ.get("FXPRUNE_FUZZ_LOG")
CRITERIA = ("l1", "l2", "fpgm", "bn_scale", "random")
WIDTHS = st.integers(1, 12)

# --- the strategy: draw blocks that fit the current tensor kind ------------------------------------


@st.composite
def conv_spec(draw) -> tuple:
    groups = draw(st.sampled_from((1, 1, 2, "dw")))
    out = draw(st.integers(1, 6)) * 2 if groups == 2 else draw(WIDTHS)
    return ("conv", out, draw(st.sampled_from((1, 3))), groups)


def branch_blocks() -> st.SearchStrategy:
    simple = st.one_of(conv_spec(), st.just(("bn",)), st.tuples(st.just("act"), st.sampled_from(ACTIVATIONS)),
                       st.tuples(st.just("fact"), st.sampled_from(ACTIVATIONS)),
                       st.tuples(st.just("se"), st.integers(1, 4)))
    return st.lists(simple, min_size=1, max_size=3)


@st.composite
def img_block(draw, hw: int) -> tuple:
    kind = draw(st.sampled_from(("conv", "conv", "bn", "act", "fact", "pool", "res", "se", "cat", "split",
                                 "permute", "flatten", "gap", "toseq", "shuffle", "pixel", "glu")))
    if kind == "conv":
        return draw(conv_spec())
    if kind in ("act", "fact"):
        return (kind, draw(st.sampled_from(ACTIVATIONS)))
    if kind == "pool":
        return ("pool", draw(st.sampled_from(("max", "avg"))))
    if kind == "res":
        return ("res", draw(branch_blocks()))
    if kind == "se":
        return ("se", draw(st.integers(1, 4)))
    if kind == "cat":
        return ("cat", draw(branch_blocks()), draw(branch_blocks()))
    if kind == "split":
        return ("split", draw(st.sampled_from(("chunk", "split"))))
    if kind == "permute":
        return ("permute", draw(WIDTHS))
    if kind == "shuffle":
        return ("shuffle", draw(st.sampled_from((2, 3))))
    if kind == "flatten" and hw > 4:  # keep the flattened width small
        return ("gap",)
    return (kind,)


@st.composite
def seqvec_block(draw, kind: str) -> tuple:
    options = ["linear", "linear", "act", "fact", "ln", "glu"] + (
        ["lstm", "lstm", "seqpool", "encoder"] if kind == "seq" else ["bn"])
    name = draw(st.sampled_from(options))
    if name == "linear":
        return ("linear", draw(WIDTHS))
    if name in ("act", "fact"):
        return (name, draw(st.sampled_from(ACTIVATIONS)))
    if name == "lstm":
        return ("lstm", draw(st.integers(1, 6)), draw(st.booleans()))
    if name == "encoder":
        return ("encoder", draw(st.sampled_from((1, 2))))
    return (name,)


@st.composite
def networks(draw) -> tuple:
    """``(in_channels, blocks)``: up to 6 top-level blocks, each fitting the kind the previous left."""
    channels = draw(st.integers(1, 4))
    blocks: list[tuple] = []
    if draw(st.booleans()):  # half the networks open with a group prunable by construction
        blocks += [("conv", draw(st.integers(2, 12)), 3, 1), ("conv", draw(WIDTHS), 1, 1)]
    kind, hw = "img", SIZE
    for _ in range(draw(st.integers(1, 6))):
        block = draw(img_block(hw)) if kind == "img" else draw(seqvec_block(kind))
        blocks.append(block)
        if block[0] == "pool" and hw >= 2:
            hw //= 2
        if block[0] in ("flatten", "gap", "seqpool"):
            kind = "vec"
        elif block[0] == "toseq":
            kind = "seq"
    return channels, blocks


options = st.fixed_dictionaries({
    "sparsity": st.sampled_from((0.1, 0.25, 0.5, 0.75, 0.9)),
    "criterion": st.sampled_from(CRITERIA),
    "round_to": st.sampled_from((1, 1, 2, 4)),
    "global_ranking": st.booleans(),
    "min_keep": st.sampled_from((1, 1, 2)),
    "capture": st.sampled_from(("fx", "export")),
})


def _log(spec: tuple, opts: dict, outcome: str, seconds: float) -> None:
    if LOG:
        with open(LOG, "a") as f:
            f.write(json.dumps({"spec": repr(spec), "options": opts, "outcome": outcome,
                                "s": round(seconds, 3)}) + "\n")


def check_network(spec: tuple, opts: dict) -> None:
    """Build ``spec`` and assert every promise of pruning it with ``opts`` (what regressions call).

    A network with a group prunable by construction (:func:`netspec.prunable_width`) must show it as
    prunable, and must shrink whenever a uniform policy's count drops a unit of it; a change that froze
    everything fails here."""
    model, inputs = build(spec)
    width = prunable_width(spec)
    shrinks = width is not None and not opts.get("global_ranking") and _kept(width, opts) < width
    report = check_pruned(model, inputs, expect_shrink=shrinks, **opts)
    if width is not None:
        assert any(g.prunable for g in report.result.groups), report.result.groups


def _kept(units: int, opts: dict) -> int:
    """How many of a group's ``units`` a uniform policy keeps (no frozen units): what fxprune.select does,
    written out so that the expectation does not come from the code under test."""
    keep = units - math.floor(opts.get("sparsity", 0.5) * units + 1e-9)
    round_to = opts.get("round_to", 1)
    keep = -(-keep // round_to) * round_to
    return min(units, max(opts.get("min_keep", 1), keep))


@settings(max_examples=EXAMPLES, deadline=None, derandomize=not LONG_RUN, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(spec=networks(), opts=options)
def test_pruned_networks_keep_every_promise(spec: tuple, opts: dict) -> None:
    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        check_network(spec, opts)
    except BaseException as exc:
        _log(spec, opts, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
             time.perf_counter() - start)
        raise
    _log(spec, opts, "ok", time.perf_counter() - start)
