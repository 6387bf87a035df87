"""fxprune: structured pruning of PyTorch models as pure torch.fx graph-rewrite passes.

>>> import fxprune
>>> result = fxprune.prune(model, (x,), sparsity=0.5, criterion="l1", capture="fx")  # doctest: +SKIP
>>> result.graph_module, result.plan                                               # doctest: +SKIP
"""
from . import errors
from . import rules  # noqa: F401  (every op family registers itself; analysis looks them up in fxprune.registry)
from .analysis import Analysis, AnalysisOptions, match
from .api import PruneResult, analyze, apply_plan, prune, verify
from .calibration import Calibration
from .capture import capture
from .groups import Group, Member
from .io import load, save
from .pipeline import Pass, Pipeline
from .plan import Plan
from .verify import VerifyReport
from . import passes  # noqa: E402,F401  (last: the pass library registers itself with the pipeline)

__all__ = ["prune", "apply_plan", "verify", "analyze", "capture", "match", "Plan", "PruneResult",
           "Group", "Member", "Analysis", "AnalysisOptions", "VerifyReport", "errors",
           "save", "load", "Pass", "Pipeline", "Calibration"]
__version__ = "0.1.0"
