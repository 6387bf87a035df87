"""Pipelines: parse / print round trip, refusals that name what is wrong, hooks, PassManager interop,
errors that name the failing pass, and the Pass contract (frozen, typed, ``modified`` computed)."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassResult
from torch.fx.passes.infra.pass_manager import PassManager

import fxprune
from fxprune.core.capture import capture
from fxprune.errors import InvalidOptionError, PipelineError
from fxprune.passes import ApplyPlan, DeadChannels, FoldBatchNorm, PruneChannels
from fxprune.passes.pipeline import (Pass, Pipeline, placeholder_zeros, graph_changed, register,
                              registered_passes)


@dataclass(frozen=True)
class Toy(Pass):
    """A pass with one option of every type; returns a copy (or scaled weights)."""

    name = "toy"

    ratio: float = 0.5
    """A float."""
    count: int = 1
    """An int."""
    flag: bool = False
    """A bool."""
    label: str = "x"
    """A string."""
    names: tuple[str, ...] = ()
    """A tuple of strings."""

    def apply(self, gm: fx.GraphModule) -> fx.GraphModule:
        new = copy.deepcopy(gm)
        if self.flag:
            with torch.no_grad():
                for p in new.parameters():
                    p.mul_(2.0)
        return new


@dataclass(frozen=True)
class Boom(Pass):
    """Fails on purpose."""

    name = "boom"

    def apply(self, gm: fx.GraphModule) -> fx.GraphModule:
        raise RuntimeError("kaboom")


REGISTRY = {"toy": Toy, "boom": Boom}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


X = torch.randn(2, 3, 8, 8)


@pytest.fixture
def gm() -> fx.GraphModule:
    torch.manual_seed(0)
    return capture(Net().eval(), (X,)).gm


# --- parse and print ------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [
    "prune-channels{sparsity=0.5,criterion=l2},fold-batchnorm",
    "fold-batchnorm,prune-channels{sparsity=0.3,global_ranking=true,ignore=[fc,layer4.*]},dead-channels",
    "prune-channels{sparsity=0.5,round_to=8,min_keep=2,prune_outputs=true,split_axis=outer,seed=7}",
    "dead-channels",
    "",
])
def test_library_spec_round_trip(spec: str) -> None:
    pipeline = Pipeline.parse(spec)
    assert str(pipeline) == spec
    assert Pipeline.parse(str(pipeline)) == pipeline
    assert Pipeline.parse(pipeline.spec(include_defaults=True)) == pipeline


@pytest.mark.parametrize("spec, expected", [
    ("toy{ratio=0.25,count=3,flag=true,label=abc,names=[a,b.*]}", Toy(0.25, 3, True, "abc", ("a", "b.*"))),
    ("toy{names=one}", Toy(names=("one",))),
    ("toy{names=[]}", Toy()),
    ("toy{ratio=1}", Toy(ratio=1.0)),
    ('toy{label="a, {b}=[c] \\"d\\""}', Toy(label='a, {b}=[c] "d"')),
    (" toy { count = 2 } , boom ", Pipeline((Toy(count=2), Boom()))),
])
def test_option_values_are_parsed_by_type(spec: str, expected) -> None:
    pipeline = Pipeline.parse(spec, REGISTRY)
    assert pipeline == (expected if isinstance(expected, Pipeline) else Pipeline((expected,)))
    assert Pipeline.parse(str(pipeline), REGISTRY) == pipeline


def test_defaults_are_omitted_when_printing() -> None:
    assert str(Pipeline.parse("toy{ratio=0.5,label=x},boom", REGISTRY)) == "toy,boom"
    assert Toy().spec(include_defaults=True) == "toy{ratio=0.5,count=1,flag=false,label=x,names=[]}"


def test_apply_plan_spec_round_trips_its_json(gm) -> None:
    p = ApplyPlan.of(fxprune.prune(gm, (X,), sparsity=0.5).plan)
    pipeline = Pipeline((p, FoldBatchNorm()))
    assert str(pipeline).startswith('apply-plan{plan_json="{')
    assert Pipeline.parse(str(pipeline)) == pipeline


@pytest.mark.parametrize("spec, message", [
    ("nope", "unknown pass 'nope'"),
    ("fold-batchnorm,no-such-pass{x=1}", "unknown pass 'no-such-pass'"),
    ("prune-channels", "pass 'prune-channels' needs option(s) ['sparsity']"),
    ("prune-channels{sparsity=0.5,foo=1}", "pass 'prune-channels' has no option 'foo'"),
    ("prune-channels{sparsity=half}", "option 'sparsity' of pass 'prune-channels' expects a float"),
    ("prune-channels{sparsity=0.5,round_to=1.5}", "option 'round_to' of pass 'prune-channels' expects an int"),
    ("prune-channels{sparsity=0.5,global_ranking=yes}", "expects true or false"),
    ("prune-channels{sparsity=0.5,criterion=[l1]}", "option 'criterion' of pass 'prune-channels' expects a string"),
    ("prune-channels{sparsity=0.5,sparsity=0.2}", "option 'sparsity' of pass 'prune-channels' is given twice"),
    ("prune-channels{sparsity=1.5}", "pass 'prune-channels': sparsity"),
    ("prune-channels{sparsity=0.5,criterion=taylor}", "criterion 'taylor'"),
    ("prune-channels{sparsity=0.5", "expected '}'"),
    ("fold-batchnorm fold-batchnorm", "expected ',' or the end"),
    ("fold-batchnorm,", "expected a pass name"),
    ('apply-plan{plan_json="{}"}', "pass 'apply-plan': plan_json is not a plan"),
    ('apply-plan{plan_json="unterminated}', "malformed string"),
])
def test_bad_specs_are_refused_by_name(spec: str, message: str) -> None:
    with pytest.raises(PipelineError) as info:
        Pipeline.parse(spec)
    assert message in str(info.value)


def test_registry_holds_the_library() -> None:
    assert {"prune-channels", "apply-plan", "fold-batchnorm", "dead-channels"} <= set(registered_passes())


def test_register_refuses_bad_passes() -> None:
    @dataclass(frozen=True)
    class Camel(Pass):
        name = "CamelCase"

        def apply(self, gm):  # pragma: no cover
            return gm

    with pytest.raises(ValueError, match="kebab-case"):
        register(Camel)
    with pytest.raises(ValueError, match="taken"):
        register(dataclasses.make_dataclass("Other", [], bases=(FoldBatchNorm,), frozen=True))
    with pytest.raises(TypeError, match="not a Pass"):
        register(int)  # type: ignore[arg-type]


# --- the pass contract ------------------------------------------------------------------------------
def test_passes_are_frozen_typed_and_hashable() -> None:
    p = Toy(ratio=1, names=["a"])
    assert p.ratio == 1.0 and isinstance(p.ratio, float) and p.names == ("a",)
    assert {p, Toy(ratio=1.0, names=("a",))} == {p}
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.count = 3  # type: ignore[misc]
    with pytest.raises(InvalidOptionError, match="option 'count' of pass 'toy' must be an int"):
        Toy(count="3")  # type: ignore[arg-type]
    with pytest.raises(InvalidOptionError, match="must be true or false"):
        Toy(flag=1)  # type: ignore[arg-type]


def test_modified_is_computed(gm) -> None:
    assert not Toy()(gm).modified
    assert Toy(flag=True)(gm).modified  # values changed, code and shapes did not


def test_graph_changed_sees_code_shapes_and_values(gm) -> None:
    same = copy.deepcopy(gm)
    assert not graph_changed(gm, same)
    other = copy.deepcopy(gm)
    (relu,) = other.graph.find_nodes(op="call_function", target=torch.relu)
    relu.replace_all_uses_with(relu.args[0])
    other.graph.erase_node(relu)
    other.recompile()
    assert graph_changed(gm, other)
    wider = copy.deepcopy(gm)
    wider.fc = nn.Linear(8, 5)
    assert graph_changed(gm, wider)


def test_a_pass_takes_a_captured_graph_module(gm) -> None:
    with pytest.raises(PipelineError, match="takes a GraphModule"):
        FoldBatchNorm()(Net())  # type: ignore[arg-type]
    with pytest.raises(PipelineError, match=r"placeholder 'x' has no traced value.*capture"):
        FoldBatchNorm()(fx.symbolic_trace(Net().eval()))


def test_placeholder_zeros_are_zeros_like_the_placeholders(gm) -> None:
    (x,) = placeholder_zeros(gm)
    assert x.shape == X.shape and x.dtype == X.dtype and not x.any()


# --- running pipelines ------------------------------------------------------------------------------
def test_pipeline_runs_in_order_and_calls_the_hook(gm) -> None:
    pipeline = Pipeline.parse("fold-batchnorm,prune-channels{sparsity=0.5},dead-channels")
    seen = []
    result = pipeline(gm, hook=lambda p, before, after: seen.append((p, before, after)))
    assert [p for p, _, _ in seen] == list(pipeline)
    assert seen[0][1] is gm and seen[-1][2] is result.graph_module
    assert all(seen[i][2] is seen[i + 1][1] for i in range(len(seen) - 1))
    assert result.modified
    assert not any(isinstance(m, nn.BatchNorm2d) for m in result.graph_module.modules())
    assert result.graph_module.conv.out_channels == 4
    assert result.graph_module(X).shape == (2, 4)


def test_pipeline_of_no_change_is_not_modified(gm) -> None:
    result = Pipeline((DeadChannels(), Toy()))(gm)
    assert not result.modified


def test_failure_names_the_pass_and_those_before(gm) -> None:
    pipeline = Pipeline((FoldBatchNorm(), Toy(count=2), Boom(), DeadChannels()))
    with pytest.raises(PipelineError) as info:
        pipeline(gm)
    message = str(info.value)
    assert "pass 'boom' (#3 of 4) failed after ['fold-batchnorm', 'toy{count=2}']" in message
    assert "RuntimeError: kaboom" in message
    assert isinstance(info.value.__cause__, RuntimeError)
    assert info.value.pass_ == Boom() and info.value.completed == (FoldBatchNorm(), Toy(count=2))


def test_first_pass_failure_says_so() -> None:
    with pytest.raises(PipelineError, match=r"pass 'fold-batchnorm' \(#1 of 1\) failed as the first pass.*capture"):
        Pipeline((FoldBatchNorm(),))(fx.symbolic_trace(Net().eval()))


def test_pipeline_holds_passes_only() -> None:
    with pytest.raises(PipelineError, match="Pass instances"):
        Pipeline((lambda gm: gm,))  # type: ignore[arg-type]


def test_pass_manager_runs_passes_and_pipelines(gm) -> None:
    manager = PassManager(passes=[FoldBatchNorm(), PruneChannels(sparsity=0.5)])
    result = manager(gm)
    assert isinstance(result, PassResult) and result.modified
    assert result.graph_module.conv.out_channels == 4
    nested = PassManager(passes=[Pipeline.parse("fold-batchnorm"), DeadChannels()])(gm)
    assert nested.modified and not any(isinstance(m, nn.BatchNorm2d) for m in nested.graph_module.modules())
    assert not PassManager(passes=[DeadChannels()])(gm).modified


def test_pass_manager_names_the_failing_pass(gm) -> None:
    with pytest.raises(Exception, match=r"'Boom' pass after the following passes: \['FoldBatchNorm'\]"):
        PassManager(passes=[FoldBatchNorm(), Boom()])(gm)
