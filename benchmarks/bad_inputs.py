"""Regenerate the README's bad-input table from the cases in tests/test_errors.py.

    python benchmarks/bad_inputs.py > /tmp/table.md
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    spec = importlib.util.spec_from_file_location("test_errors", ROOT / "tests" / "test_errors.py")
    cases = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cases)
    print("| bad input | error | message (abridged) |")
    print("|---|---|---|")
    for case, call, error, _ in cases.CASES:
        try:
            call(cases._model())
            message = "(no error: a bug)"
        except Exception as exc:  # the table shows whatever is raised
            message = str(exc).replace(str(ROOT) + "/", "")
        message = message.replace("|", "\\|")
        message = message if len(message) <= 110 else message[:107] + "..."
        print(f"| {case} | `{error.__name__}` | {message} |")


if __name__ == "__main__":
    sys.exit(main())
