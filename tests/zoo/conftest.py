"""Makes ``zoo_script.py`` (benchmarks/zoo.py as a module, shared by the zoo tests) importable."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
