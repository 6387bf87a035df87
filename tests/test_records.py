"""The name tables: criteria, recovery steps and deploy targets are each one table of records, and
everything that lists them (the name tuples, the pass registry, the CLI's choices) is read from it."""
from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch
import torch.nn as nn

from fxprune import deploy
from fxprune.cli import build_parser
from fxprune.core.capture import capture
from fxprune.data import criteria
from fxprune.data.recovery import RECOVERY_STEPS, recovery_steps
from fxprune.errors import InvalidOptionError
from fxprune.passes import PruneChannels
from fxprune.passes.pipeline import registered_passes, run_data
from fxprune.passes.recovery_data import RecoveryPass
from fxprune.progress import progress_bar


def test_the_criterion_lists_are_read_from_the_records():
    specs = criteria.CRITERION_SPECS
    assert criteria.CRITERIA == tuple(specs)
    assert {s.reads for s in specs.values()} <= set(criteria.READS)
    assert criteria.WEIGHT_CRITERIA + criteria.ACTIVATION_CRITERIA + criteria.GRADIENT_CRITERIA == criteria.CRITERIA
    assert all(specs[n].gather is None for n in criteria.WEIGHT_CRITERIA)
    assert all(specs[n].gather is not None for n in criteria.DATA_CRITERIA)
    with pytest.raises(dataclasses.FrozenInstanceError):
        specs["l1"].reads = "gradients"  # type: ignore[misc]


@pytest.mark.parametrize("name", criteria.DATA_CRITERIA)
def test_a_data_criterion_without_its_data_names_what_is_missing(name):
    reads = criteria.CRITERION_SPECS[name].reads
    with pytest.raises(InvalidOptionError, match="calibration" if reads == "activations" else "loss_fn"):
        criteria.check_data(name, calibration=[torch.zeros(1)] if reads == "gradients" else None, loss_fn=None,
                            batch=None)


def test_each_recovery_step_is_one_registered_pass_of_its_name():
    recovery = {name for name, cls in registered_passes().items() if issubclass(cls, RecoveryPass)}
    assert recovery == set(RECOVERY_STEPS)
    assert recovery_steps(("bn", "batchnorm", "bias")) == ("recalibrate-batchnorm",) * 2 + ("compensate-bias",)


def test_a_recovery_pass_named_after_no_step_is_refused():
    with pytest.raises(ValueError, match="'finetune', which is no step"):
        @dataclasses.dataclass(frozen=True)
        class FineTune(RecoveryPass):
            name = "finetune"


def test_the_cli_offers_the_deploy_targets_of_the_table():
    parser = build_parser()
    (subcommands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    prune = next(a for a in subcommands.choices["prune"]._actions if "--to" in a.option_strings)
    assert tuple(prune.choices) == deploy.TARGETS == tuple(deploy.RUNTIMES)
    assert deploy.SUFFIX == {"executorch": ".pte", "onnx": ".onnx"}


def test_an_unknown_deploy_target_is_a_typed_error_naming_the_known(tmp_path):
    with pytest.raises(InvalidOptionError, match="unknown deploy target 'tflite': expected one of executorch, onnx"):
        deploy.deploy(nn.Linear(2, 2), (torch.zeros(1, 2),), tmp_path / "m.tflite", "tflite")
    with pytest.raises(InvalidOptionError, match=r"expected a \.pte or \.onnx file"):
        deploy.load(tmp_path / "m.tflite")
    assert not list(tmp_path.iterdir())


def test_progress_off_hands_back_the_items_themselves():
    items = [1, 2, 3]
    assert progress_bar(items, False, desc="batches") is items
    assert progress_bar(None, False, desc="stages", total=3) is None
    assert list(progress_bar(items, True, desc="batches", disable=True)) == items


def test_bound_run_data_is_not_an_option():
    gm = capture(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), (torch.zeros(1, 4),), "fx").gm
    loader = [torch.randn(3, 4)]
    unbound = PruneChannels(sparsity=0.5, criterion="wanda")
    bound = unbound.with_calibration(loader)
    assert bound == unbound and str(bound) == str(unbound) and run_data(unbound).calibration is None
    assert bound.calibration is loader and run_data(bound).calibration is loader
    assert bound(gm).graph_module.get_submodule("0").out_features == 4
