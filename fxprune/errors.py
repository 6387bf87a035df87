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


class ExampleInputError(FxPruneError, ValueError):
    """The example inputs were rejected by the model."""


class PlanMismatchError(FxPruneError, ValueError):
    """A plan does not fit the model it is applied to (missing names, indices out of range, sizes)."""


class UnsupportedModelError(FxPruneError, TypeError):
    """The model is of a kind fxprune refuses to prune (e.g. an already-converted int8 graph)."""


class TrainingModeError(FxPruneError, RuntimeError):
    """The model is in training mode where a graph depends on it (BatchNorm under export)."""


class VerificationError(FxPruneError, AssertionError):
    """A pruned model does not match its zeroed-channel reference."""


class PipelineError(FxPruneError, ValueError):
    """A pipeline spec is malformed, names an unknown pass, or a pass failed."""


class UnsafeFileError(FxPruneError, ValueError):
    """A file would need unpickling or code execution to load; fxprune refuses it."""
