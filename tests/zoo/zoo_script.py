"""benchmarks/zoo.py loaded once as a module, for the torchvision and timm zoo tests (benchmarks/ is
not a package; conftest.py beside this file makes this module importable)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "zoo.py"
_SPEC = importlib.util.spec_from_file_location("fxprune_benchmarks_zoo", _PATH)
ZOO = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(ZOO)
