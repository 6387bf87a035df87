"""Networks the fuzzer (or a reviewer) found worth keeping: each a spec from ``netspec`` plus options.

Add a case by pasting the falsifying ``spec`` and ``opts`` hypothesis prints. The seed cases below pin
down the DSL's trickier corners (an odd channel count split by ``chunk``, grouped conv beside a
depthwise one, an LSTM after a channels-last permute, SE gating inside a residual) at both levels.
"""
from __future__ import annotations

import pytest

from test_fuzz import check_network

L1 = {"sparsity": 0.5, "criterion": "l1", "round_to": 1, "global_ranking": False, "min_keep": 1}

CASES = {
    # DSL bug the first fuzz run found: chunk(2) of 3 channels is [2, 1], not [1, 2]
    "chunk-odd-channels": ((3, [("split", "chunk")]), {}),
    "split-odd-channels": ((3, [("conv", 5, 3, 1), ("split", "split")]), {}),
    "grouped-beside-depthwise": ((2, [("conv", 8, 3, 2), ("conv", 8, 3, "dw"), ("bn",), ("act", "relu6")]),
                                 {"round_to": 2}),
    "se-in-residual": ((3, [("conv", 6, 3, 1), ("res", [("conv", 4, 3, 1), ("se", 2)])]), {"criterion": "bn_scale"}),
    "cat-of-depthwise-and-conv": ((4, [("cat", [("conv", 4, 3, "dw")], [("conv", 3, 1, 1), ("bn",)]), ("gap",),
                                       ("linear", 6)]), {"global_ranking": True}),
    "permute-then-lstm": ((3, [("conv", 6, 3, 1), ("permute", 5), ("pool", "max"), ("toseq",), ("lstm", 4, True),
                               ("seqpool",), ("linear", 3)]), {"criterion": "l2"}),
    "flatten-into-linear": ((2, [("conv", 4, 3, 1), ("pool", "avg"), ("pool", "avg"), ("flatten",), ("linear", 7),
                                 ("ln",), ("fact", "gelu")]), {"sparsity": 0.75, "min_keep": 2}),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_regression(case, level) -> None:
    spec, opts = case
    check_network(spec, {**L1, **opts, "capture": level})
