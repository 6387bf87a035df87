"""The rule table: one family per spelling, duplicates refused at import, no changed node left without its
rewrite, and the rewrites that a missing one would have hidden (``aten._reshape_alias``, ``nn.Unflatten``)."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxprune.core import rules
from fxprune.testing.check import check_pruned
from fxprune.errors import RuleTableError
import fxprune
from fxprune.core import registry
from fxprune.core.registry import OpFamily, OpRule
from fxprune.core.rules import conv
from fxprune.core.rules import elementwise
from fxprune.core.rules import shape



def test_a_spelling_registered_twice_is_refused_and_the_table_is_unchanged():
    before, families = dict(registry._OWNER), dict(registry.FAMILIES)
    clash = OpFamily("test-clash", (OpRule((torch.cosh,), elementwise.unary, rewrite=None),
                                    OpRule((F.relu,), elementwise.unary, rewrite=None)))
    with pytest.raises(RuleTableError, match="relu.*already belongs to op family 'elementwise'"):
        registry.register(clash)
    assert registry._OWNER == before and registry.FAMILIES == families  # torch.cosh was not added either


def test_a_family_name_registered_twice_is_refused():
    with pytest.raises(RuleTableError, match="'conv' is registered twice"):
        registry.register(OpFamily("conv", ()))


def test_a_rule_line_must_say_whether_its_calls_hold_literal_sizes():
    with pytest.raises(TypeError, match="rewrite"):
        OpRule((torch.cosh,), elementwise.unary)  # no rewrite=...: refused, never assumed


@pytest.mark.parametrize("op", [operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv,
                                operator.pow, operator.mod, operator.neg, operator.eq, operator.ne,
                                operator.lt, operator.le, operator.gt, operator.ge])
def test_python_arithmetic_belongs_to_the_size_family_alone(op):
    # these compute sizes (C // heads) as well as tensors; shape_query hands tensors on to nary
    assert registry.owner(op).analyze is shape.shape_query
    assert registry.family_of(op) == "shape"
    assert op not in elementwise.BINARY_FUNCTIONS + elementwise.PASS_FUNCTIONS


def test_a_changed_node_that_no_family_owns_is_an_error():
    graph = fx.Graph()
    x = graph.placeholder("x")
    node = graph.call_function(torch.cosh, (x,))  # no family owns torch.cosh
    with pytest.raises(RuleTableError, match="'cosh'.*no op family owns it"):
        registry.lookup_rewrite(node, None)


def test_every_view_spelling_has_its_rewrite_or_says_it_needs_none():
    lines = {registry.owner(s) for s in shape.VIEWS}
    assert all(line is not None for line in lines)
    assert registry.owner(torch.ops.aten._reshape_alias).rewrite is shape.rewrite_reshape_alias
    assert all(registry.owner(s).rewrite is None for s in shape.SIZELESS_VIEWS)


def test_conv_group_count_is_one_formula_at_both_levels():
    # whole groups go: 8 groups of 4 channels pruned to 5 groups keep 4 channels per group
    assert conv.pruned_groups(8, 32, 20) == 5
    assert conv.pruned_groups(1, 32, 20) == 1
    assert conv.rewrite_conv_function is not conv.rewrite_convolution  # groups at argument 6 vs 8


class ReshapeAlias(nn.Module):
    """``aten._reshape_alias`` (what older decompositions emit for ``reshape``) into a Linear."""

    def __init__(self, transposed: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 16, 4)
        self.transposed = transposed

    def forward(self, x):
        y = torch.relu(self.conv(x))
        # sizes and strides read from y's batch: literals would read past a batch of 1, and verify runs
        # a second batch size (_reshape_alias checks nothing)
        batch = y.shape[0]
        stride = [1, batch] if self.transposed else [128, 1]
        return self.fc(torch.ops.aten._reshape_alias(y, [batch, 128], stride))


def _alias_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.target in (torch.ops.aten._reshape_alias,
                                                       torch.ops.aten._reshape_alias.default)]


def test_reshape_alias_gets_its_sizes_and_strides_rewritten(level, graph_snapshot):
    report = check_pruned(ReshapeAlias().eval(), (torch.randn(2, 3, 4, 4),), capture=level, sparsity=0.5)
    gm = report.result.graph_module
    assert gm.conv.out_channels == 4 if level == "fx" else gm.get_parameter("conv.weight").shape[0] == 4
    (alias,) = _alias_nodes(gm)
    assert list(alias.args[1])[1:] == [64] and list(alias.args[2]) == [64, 1]
    assert report.verify.exact and report.verify.max_abs_error < 1e-5
    assert gm == graph_snapshot


def test_reshape_alias_with_other_strides_freezes_what_it_touches():
    # the same sizes read with transposed strides: no contiguous rewrite would be right, so nothing shrinks
    report = check_pruned(ReshapeAlias(transposed=True).eval(), (torch.randn(2, 3, 4, 4),), capture="fx",
                          sparsity=0.5, expect_shrink=False)
    group = next(g for g in report.result.analysis.groups if g.name == "conv")
    assert not group.prunable and "non-contiguous strides" in group.reasons[0]
    assert list(_alias_nodes(report.result.graph_module)[0].args[1])[1:] == [128]


class UnflattenHead(nn.Module):
    """A parameter-free module that holds a channel size: nothing of it is sliced, yet it must be resized."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.flat = nn.Flatten(1)
        self.unflat = nn.Unflatten(1, (8, 16))
        self.head = nn.Conv1d(8, 2, 1)

    def forward(self, x):
        return self.head(self.unflat(self.flat(torch.relu(self.conv(x)))))


def test_a_module_without_parameters_still_gets_its_resize():
    report = check_pruned(UnflattenHead().eval(), (torch.randn(2, 3, 4, 4),), capture="fx", sparsity=0.5)
    gm = report.result.graph_module
    assert gm.conv.out_channels == 4 and gm.unflat.unflattened_size == (4, 16)
    assert report.verify.exact and report.verify.max_abs_error < 1e-5


def test_an_after_rule_check_sees_every_node_a_rule_handled():
    seen = []
    check = registry.register_after_rule(lambda op, analyze: seen.append((op.node.name, analyze)))
    try:
        model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
        fxprune.analyze(model, (torch.randn(1, 3, 4, 4),), capture="fx")
    finally:
        registry._AFTER_RULE.remove(check)
    assert ("_0", conv.conv_module) in seen and ("_1", elementwise.unary) in seen
