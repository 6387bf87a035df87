"""The rule table: one owner per spelling, refused duplicates, no changed node left without its rewrite."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F

from fxprune import rules
from fxprune.errors import RuleTableError
from fxprune.rules import elementwise, shape


def test_a_spelling_registered_twice_is_refused_and_the_table_is_unchanged():
    before = dict(rules.RULES)
    with pytest.raises(RuleTableError, match="relu.*already handled by fxprune.rules.elementwise.unary"):
        rules.rule(torch.cosh, F.relu)(lambda op: None)
    assert rules.RULES == before  # torch.cosh, the free spelling, was not added either


@pytest.mark.parametrize("op", [operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv,
                                operator.pow, operator.mod, operator.neg, operator.eq, operator.ne,
                                operator.lt, operator.le, operator.gt, operator.ge])
def test_python_arithmetic_belongs_to_the_size_family_alone(op):
    # these compute sizes (C // heads) as well as tensors; shape_query hands tensors on to nary
    assert rules.RULES[op] is shape.shape_query
    assert op not in elementwise.BINARY_FUNCTIONS + elementwise.PASS_FUNCTIONS
