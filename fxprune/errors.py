"""Typed errors. Every error names the value, module or node at fault and says what to do.

All derive from :class:`FxPruneError`, so ``except fxprune.errors.FxPruneError`` catches any of them;
each also derives from the builtin a Python user would expect (``ValueError``, ``TypeError``, ...).
"""
from __future__ import annotations


class FxPruneError(Exception):
    """Base class of every error fxprune raises on purpose."""


class InvalidOptionError(FxPruneError, ValueError):
    """An option has a bad value: sparsity out of range, unknown criterion, pattern matching nothing."""


class CaptureError(FxPruneError, RuntimeError):
    """The model could not be captured as a graph at the requested level."""


class DynamicShapesError(CaptureError, ValueError):
    """``torch.export`` rejected the ``dynamic_shapes`` asked for (the message names the dim)."""


class ExampleInputError(FxPruneError, ValueError):
    """The example inputs were rejected by the model."""


class PrunedGraphError(FxPruneError, RuntimeError):
    """The rewritten graph fails on example inputs the original ran: a bug in one of fxprune's rules
    (the message names the failing node), never the user's inputs. Nothing is returned."""


class PlanMismatchError(FxPruneError, ValueError):
    """A plan does not fit the model it is applied to (missing names, indices out of range, sizes)."""


class ConfigMismatchError(PlanMismatchError):
    """A plan that a model's config cannot hold (per-layer widths, parts of heads): the message names
    the layer, the widths and the option that fixes it (``fxprune.hf``)."""


class UnsupportedModelError(FxPruneError, TypeError):
    """The model is of a kind fxprune refuses to prune (e.g. an already-converted int8 graph)."""


class TrainingModeError(FxPruneError, RuntimeError):
    """The model is in training mode where a graph depends on it (BatchNorm under export)."""


class ModuleForwardError(FxPruneError, RuntimeError):
    """The user's own forward, run on the pruned parameters, fails or differs from the pruned graph: it
    bakes a size into code (``x.view(-1, 512)``). The message names the module; the pruned graph
    (``result.graph_module``) is the model to use instead (:mod:`fxprune.module`)."""


class VerificationError(FxPruneError, AssertionError):
    """A pruned model does not match its zeroed-channel reference."""


class PipelineError(FxPruneError, ValueError):
    """A pipeline spec is malformed, names an unknown pass, or a pass failed."""


class CalibrationError(FxPruneError, ValueError):
    """Calibration data is unusable: no batches, a batch the model rejects or of another shape than
    the example inputs (the message names the batch index)."""


class NonFiniteActivationError(CalibrationError):
    """A calibration batch produced NaN or infinite activations (the message names the node)."""


class UnsafeFileError(FxPruneError, ValueError):
    """A file would need unpickling or code execution to load; fxprune refuses it."""


class RuleTableError(FxPruneError, RuntimeError):
    """The rule table is inconsistent — a spelling claimed by two op families, or a node whose sizes
    changed that no rewrite covers. A bug in fxprune (or in a user's rule), never in the model."""


class MissingExtraError(FxPruneError, ImportError):
    """An optional dependency is not installed; the message names the extra to install
    (``pip install 'fxprune[executorch]'``)."""


class DeployError(FxPruneError, RuntimeError):
    """A pruned model could not be written for a runtime (ExecuTorch, ONNX Runtime): the message names
    the target and the stage that failed (export, quantize, lower)."""


class CheckpointError(FxPruneError, ValueError):
    """A checkpoint directory is unusable: a shard missing or truncated, an index naming a tensor no
    shard holds, a tensor whose shape the config does not build, an output directory inside the input,
    or too little disk for the output (the message names the file or tensor)."""
