"""drop-blocks: residual blocks found, scored and removed exactly at both levels; downsampling blocks
are not candidates; the repair lowers the gap; bad input gets a typed error."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fxprune.core.blocks import find_blocks, skipping
from fxprune.core.capture import capture
from fxprune.core.skip import SkipRunner
from fxprune.data.block_criteria import choose_blocks
from fxprune.errors import CalibrationError, InvalidOptionError
from fxprune.passes import DropBlocks
from fxprune.passes.drop_blocks import DROPPED_KEY, verify_drop
from fxprune.passes.pipeline import Pipeline

IMAGES = torch.randn(2, 3, 16, 16)
TOKENS = torch.randn(2, 6, 16)


class Basic(nn.Module):
    """A ResNet basic block; ``stride=2`` gives it a projection shortcut (not removable)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = nn.Conv2d(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + (self.down(x) if self.down is not None else x))


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block1, self.block2, self.block3 = Basic(8, 8), Basic(8, 16, 2), Basic(16, 16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block3(self.block2(self.block1(self.stem(x)))).mean((2, 3)))


class Layer(nn.Module):
    """A pre-norm transformer-style layer without attention's softmax: two residuals."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.norm1, self.mix = nn.LayerNorm(width), nn.Linear(width, width)
        self.norm2, self.up, self.down = nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mix(self.norm1(x))
        return x + self.down(torch.relu(self.up(self.norm2(x))))


class Stack(nn.Module):
    def __init__(self, depth: int = 4) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Layer() for _ in range(depth))
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _stack_with_quiet_layer(quiet: int = 2) -> Stack:
    """A stack whose layer ``quiet`` barely writes into the stream: every criterion should drop it."""
    model = Stack().eval()
    with torch.no_grad():
        for linear in (model.layers[quiet].mix, model.layers[quiet].down):
            linear.weight.mul_(1e-3)
            linear.bias.mul_(1e-3)
    return model


CASES = {"resnet": (TinyResNet, IMAGES, ("block1",)), "stack": (Stack, TOKENS, ("layers.1", "layers.2"))}


@pytest.mark.parametrize("level", ["fx", "export"])
@pytest.mark.parametrize("case", CASES.keys())
def test_named_blocks_go_exactly(case: str, level: str, run_pure, graph_snapshot) -> None:
    make, x, names = CASES[case]
    gm = capture(make().eval(), (x,), level).gm
    result = run_pure(DropBlocks(blocks=names), gm)
    assert result.graph_module == graph_snapshot
    assert result.modified
    report = verify_drop(gm, result.graph_module, (x,))
    assert report.passed and report.max_abs_error == 0.0 and report.max_abs_drift > 0
    kept = result.graph_module.state_dict()
    assert not [k for k in kept if k.startswith(tuple(n + "." for n in names))]
    assert len(kept) < len(gm.state_dict())


@pytest.mark.parametrize("level", ["fx", "export"])
def test_a_downsampling_block_is_not_a_candidate(level: str) -> None:
    found = find_blocks(capture(TinyResNet().eval(), (IMAGES,), level).gm)
    assert found.names == ("block1", "block3")
    assert [name for name, _ in found.rejected] == ["block2"]
    assert "no identity shortcut" in dict(found.rejected)["block2"]
    with pytest.raises(InvalidOptionError, match="block2.*no identity shortcut"):
        found.pick(["block2"])


@pytest.mark.parametrize("criterion", ["block-influence", "angular", "sleb", "iterative-influence"])
@pytest.mark.parametrize("level", ["fx", "export"])
def test_every_criterion_drops_the_quiet_layer(criterion: str, level: str, run_pure) -> None:
    model = _stack_with_quiet_layer(2)
    gm = capture(model, (TOKENS,), level).gm
    calibration = [torch.randn(2, 6, 16) for _ in range(3)]
    result = run_pure(DropBlocks(count=1, criterion=criterion).with_calibration(calibration), gm)
    record = result.graph_module.meta[DROPPED_KEY]
    assert record["dropped"] == ["layers.2"]
    assert record["criterion"] == criterion
    assert verify_drop(gm, result.graph_module, (TOKENS,)).passed


def test_angular_drops_consecutive_blocks_and_sleb_one_at_a_time() -> None:
    gm = capture(_stack_with_quiet_layer(2), (TOKENS,)).gm
    calibration = [torch.randn(2, 6, 16) for _ in range(3)]
    angular = DropBlocks(count=2, criterion="angular").with_calibration(calibration)(gm).graph_module
    dropped = angular.meta[DROPPED_KEY]["dropped"]
    assert "layers.2" in dropped and abs(int(dropped[0][-1]) - int(dropped[1][-1])) == 1
    sleb = DropBlocks(count=2, criterion="sleb").with_calibration(calibration)(gm).graph_module
    assert list(sleb.meta[DROPPED_KEY]["scores"])[0] == "layers.2"  # the first greedy step


@pytest.mark.parametrize("fit", ["refit", "toward-original", "output-map", "scale"])
def test_the_repair_refits_the_linear_before_the_run_and_lowers_the_gap(fit: str) -> None:
    torch.manual_seed(0)
    gm = capture(Stack().eval(), (TOKENS,)).gm
    calibration = [torch.randn(8, 6, 16) for _ in range(4)]
    names = ("layers.1", "layers.2")
    plain = DropBlocks(blocks=names)(gm).graph_module
    repaired = DropBlocks(blocks=names, repair=True, fit=fit, ridge=0.1, walk="run") \
        .with_calibration(calibration)(gm).graph_module
    [line] = repaired.meta[DROPPED_KEY]["repairs"]
    assert line.startswith("layers.1+layers.2: layers.0.down.weight refitted")
    x = torch.randn(16, 6, 16)
    with torch.no_grad():
        expected = gm(x)
        gap = [float((m(x) - expected).norm() / expected.norm()) for m in (plain, repaired)]
    assert gap[1] < gap[0]
    assert not torch.equal(repaired.get_parameter("layers.0.down.weight"), plain.get_parameter("layers.0.down.weight"))


def _ridge_toward(a: torch.Tensor, target: torch.Tensor, old: torch.Tensor, ridge: float) -> torch.Tensor:
    """``argmin ‖W ã - t‖² + λ ‖W - old‖²`` (``ã``: ``a`` with a 1 for the bias), written out."""
    a = torch.cat([a.reshape(-1, a.shape[-1]), torch.ones(a.numel() // a.shape[-1], 1)], 1).double()
    gram, cross = a.T @ a, a.T @ target.reshape(a.shape[0], -1).double()
    lam = ridge * float(gram.diagonal().mean())
    return torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype), cross + lam * old.double().T).T


def test_the_sequential_repair_is_the_least_squares_fit_on_the_repaired_model_inputs() -> None:
    torch.manual_seed(0)
    gm = capture(Stack().eval(), (TOKENS,)).gm
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    calibration = [torch.cat([torch.randn(8, 6, 16) for _ in range(4)])]  # one chunk: one least squares
    run = DropBlocks(blocks=("layers.1",), repair=True, ridge=0.1, walk="run").with_calibration(calibration)(gm).graph_module
    walked = DropBlocks(blocks=("layers.1",), repair=True, ridge=0.1, walk="sequential") \
        .with_calibration(calibration)(gm).graph_module
    assert [line.split(",")[0] for line in walked.meta[DROPPED_KEY]["repairs"]] == \
        [f"layers.{i}: layers.{i}.down.weight refitted" for i in (0, 2, 3)]
    # the last writer is the ridge fit (toward its old weight) of the original's output stream, on the
    # inputs the model repaired up to it gives: layers.2 already refitted
    found, x = find_blocks(gm), calibration[0]
    seen = SkipRunner(walked, find_blocks(walked)).values((x,), [], {"relu_3", "add_6"})
    wanted = SkipRunner(gm, found).values((x,), [], {"add_7"})["add_7"]
    old = torch.cat([gm.get_parameter("layers.3.down.weight"), gm.get_parameter("layers.3.down.bias")[:, None]], 1)
    expected = _ridge_toward(seen["relu_3"], wanted - seen["add_6"], old, 0.1)
    torch.testing.assert_close(walked.get_parameter("layers.3.down.weight"), expected[:, :-1].float())
    torch.testing.assert_close(walked.get_parameter("layers.3.down.bias"), expected[:, -1].float())
    # the output on the calibration data is closer to the original's than the one-linear repair's
    with torch.no_grad():
        gap = [float((m(x) - gm(x)).norm() / gm(x).norm()) for m in (run, walked)]
    assert gap[1] < gap[0]
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())  # the input is untouched


def test_the_sequential_repair_starts_after_a_run_at_the_start() -> None:
    torch.manual_seed(0)
    gm = capture(Stack().eval(), (TOKENS,)).gm
    out = DropBlocks(blocks=("layers.0",), repair=True, walk="sequential-all").with_calibration([TOKENS])(gm)
    refitted = [line.split(": ")[1].split(" ")[0] for line in out.graph_module.meta[DROPPED_KEY]["repairs"]]
    assert refitted == [f"layers.{i}.{w}.weight" for i in (1, 2, 3) for w in ("mix", "down")]


def test_a_run_at_the_start_is_listed_unrepaired() -> None:
    gm = capture(Stack().eval(), (TOKENS,)).gm
    out = DropBlocks(blocks=("layers.0",), repair=True, walk="run").with_calibration([TOKENS])(gm).graph_module
    assert out.meta[DROPPED_KEY]["repairs"] == ["layers.0: not repaired (no kept block writes into the stream "
                                                "just before it)"]


def test_the_pipeline_spec_round_trips() -> None:
    spec = "drop-blocks{sparsity=0.25,criterion=sleb}"
    assert str(Pipeline.parse(spec)) == spec
    gm = capture(_stack_with_quiet_layer(3), (TOKENS,)).gm
    out = Pipeline.parse(spec)(gm, calibration=[TOKENS]).graph_module
    assert out.meta[DROPPED_KEY]["dropped"] == ["layers.3"]


def test_bad_input_gets_typed_errors() -> None:
    gm = capture(Stack().eval(), (TOKENS,)).gm
    with pytest.raises(InvalidOptionError, match="cannot remove 4 of the 4 removable blocks"):
        DropBlocks(count=4).with_calibration([TOKENS])(gm)
    with pytest.raises(InvalidOptionError, match="'layers.9': no such block"):
        DropBlocks(blocks=("layers.9",))(gm)
    with pytest.raises(InvalidOptionError, match="unknown block repair fit 'lasso'"):
        DropBlocks(fit="lasso")
    with pytest.raises(InvalidOptionError, match="unknown block repair walk 'all'"):
        DropBlocks(walk="all")
    with pytest.raises(InvalidOptionError, match="unknown block criterion 'cos'"):
        DropBlocks(criterion="cos")
    with pytest.raises(InvalidOptionError, match="sparsity must be in"):
        DropBlocks(sparsity=1.0)
    with pytest.raises(CalibrationError, match="with_calibration"):
        DropBlocks(count=1)(gm)
    with pytest.raises(CalibrationError, match="needs calibration data"):
        Pipeline.parse("drop-blocks{count=1}")(gm)


def _greedy_by_rebuilding(gm, found, calibration, count: int) -> tuple[list[str], list[float]]:
    """SLEB as it was first written: a new graph per candidate, run from the start (the reference)."""
    reference = [gm(x) for x in calibration]
    chosen, scores = [], []
    for _ in range(count):
        trial = {}
        for name in (n for n in found.names if n not in chosen):
            skipped = skipping(gm, found.pick(chosen + [name]))
            error = total = 0.0
            for x, expected in zip(calibration, reference):
                error += float((skipped(x).double() - expected.double()).pow(2).sum())
                total += float(expected.double().pow(2).sum())
            trial[name] = error / total
        best = min(trial, key=lambda n: (trial[n], found.names.index(n)))
        chosen.append(best)
        scores.append(trial[best])
    return chosen, scores


@pytest.mark.parametrize("level", ["fx", "export"])
def test_sleb_resuming_from_each_candidate_chooses_as_rebuilding_the_graph(level: str) -> None:
    torch.manual_seed(0)
    gm = capture(Stack(depth=5).eval(), (TOKENS,), level).gm
    calibration = [torch.randn(2, 6, 16) for _ in range(2)]
    found = find_blocks(gm)
    with torch.no_grad():
        expected = _greedy_by_rebuilding(gm, found, calibration, 2)
    names, scores = choose_blocks(gm, found, calibration, 2, "sleb")
    assert list(scores) == expected[0] and list(scores.values()) == expected[1]  # same floats, same order
    assert names == tuple(sorted(expected[0]))


@pytest.mark.parametrize("level", ["fx", "export"])
def test_the_skip_runner_gives_the_rebuilt_graphs_outputs_bit_for_bit(level: str) -> None:
    torch.manual_seed(1)
    gm = capture(Stack(depth=4).eval(), (TOKENS,), level).gm
    found = find_blocks(gm)
    runner = SkipRunner(gm, found)
    for chosen in ([], ["layers.0", "layers.2"]):
        candidates = [n for n in found.names if n not in chosen]
        outputs = dict(runner.trials((TOKENS,), chosen, candidates))
        assert list(outputs) == candidates
        with torch.no_grad():
            for name in candidates:
                assert torch.equal(outputs[name], skipping(gm, found.pick(chosen + [name]))(TOKENS))


def test_iterative_influence_starts_as_block_influence_then_rescores_without_the_chosen() -> None:
    torch.manual_seed(2)
    gm = capture(_stack_with_quiet_layer(0), (TOKENS,)).gm  # the first goes first: every later one is rescored
    calibration = [torch.randn(2, 6, 16) for _ in range(2)]
    found = find_blocks(gm)
    _, once = choose_blocks(gm, found, calibration, 2, "block-influence")
    _, steps = choose_blocks(gm, found, calibration, 2, "iterative-influence")
    first, second = steps
    assert first == "layers.0" and steps[first] == pytest.approx(once[first], rel=1e-6)
    assert steps[second] != pytest.approx(once[second], rel=1e-5)  # layer 0 wrote little, but not nothing
    without = skipping(gm, found.pick([first]))
    _, rescored = choose_blocks(without, find_blocks(without), calibration, 1, "block-influence")
    assert steps[second] == pytest.approx(rescored[second], rel=1e-6)  # scored on the model without the first
