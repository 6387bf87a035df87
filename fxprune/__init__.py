"""fxprune: structured pruning of PyTorch models as pure torch.fx graph-rewrite passes.

>>> import fxprune
>>> result = fxprune.prune(model, (x,), sparsity=0.5, criterion="l1", capture="fx")  # doctest: +SKIP
>>> result.graph_module, result.plan                                               # doctest: +SKIP

The layers, each importing only the ones above it (``tests/test_imports.py`` checks):

- :mod:`fxprune.errors`, :mod:`fxprune.options`, :mod:`fxprune.progress`, :mod:`fxprune.safe_files`: the typed
  errors, the one declaration of the options, progress bars, and the checks that keep files data.
- :mod:`fxprune.core`: the graph stages: capture, match (the rule table in ``core.rules``), select, plan,
  rewrite, verify.
- :mod:`fxprune.data`: the data-aware stages: criteria, calibration statistics, recovery.
- :mod:`fxprune.stages`: the one composition of the stages (capture -> match -> score -> select -> plan
  -> rewrite) that the API, the passes and the adapters share.
- :mod:`fxprune.passes`: the pass infrastructure (``passes.pipeline``) and the pass library.
- :mod:`fxprune.api`, :mod:`fxprune.io`, :mod:`fxprune.module`: the one-call API, fxprune's file formats,
  and the user's own class back (``output="module"``; the traceable parts of a model not traceable whole).
- adapters and runtimes: :mod:`fxprune.hf` (HuggingFace), :mod:`fxprune.deploy` (ExecuTorch, ONNX Runtime).
- :mod:`fxprune.cli` (the command line) and :mod:`fxprune.testing` (the pytest plugin, ``check_pruned``).
"""
from . import errors
from .core import rules  # noqa: F401  (every op family registers itself with fxprune.core.registry)
from .core.analysis import Analysis, AnalysisOptions, match
from .api import PruneResult, analyze, apply_plan, prune, verify
from .data.calibration import Calibration
from .core.capture import capture
from .core.groups import Group, Member
from .io import load, save
from .options import PruneOptions
from .passes.pipeline import Pass, Pipeline
from .passes import schedule
from .core.plan import Plan
from .core.verify import VerifyReport

__all__ = ["prune", "apply_plan", "verify", "analyze", "capture", "match", "Plan", "PruneResult",
           "PruneOptions", "Group", "Member", "Analysis", "AnalysisOptions", "VerifyReport", "errors",
           "save", "load", "Pass", "Pipeline", "Calibration", "schedule"]
__version__ = "0.1.0"
