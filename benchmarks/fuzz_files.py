"""The long run of the file fuzzer (tests/fuzz/test_fuzz_files.py): plan JSON, safetensors headers and
.pt2 archives, mutated by hypothesis with fresh (not derandomized) examples.

    python benchmarks/fuzz_files.py --examples 2000

It passes when no mutated file executes code, crashes the process, raises an untyped error or loads as
a model that fails verify; pytest's summary line is the result.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000, help="examples per reader (default 2000)")
    args = parser.parse_args()
    env = {**os.environ, "FXPRUNE_FILE_FUZZ_EXAMPLES": str(args.examples),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "pytest", "-q", str(ROOT / "tests" / "fuzz" / "test_fuzz_files.py"),
               "--hypothesis-show-statistics"]
    return subprocess.call(command, cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main())
