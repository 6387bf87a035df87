"""Regenerate the README's bad-input table from the cases in tests/test_errors.py and the hostile
inputs of tests/fuzz/hostile.py (files, specs and command lines; issue 17).

    python benchmarks/bad_inputs.py > /tmp/table.md
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(case: str, error: str, message: str) -> str:
    message = message.replace(str(ROOT) + "/", "").replace("|", "\\|")
    message = message if len(message) <= 110 else message[:107] + "..."
    return f"| {case} | `{error}` | {message} |"


def _raised(call) -> str:
    try:
        call()
        return "(no error: a bug)"
    except Exception as exc:  # the table shows whatever is raised
        return str(exc)


def _cli(argv: list[str]) -> str:
    from fxprune.cli import main
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main(argv)
        except SystemExit as exit_:
            status = exit_.code
    return err.getvalue().strip() if status == 2 else f"(exit {status}: a bug)"


def main() -> None:
    cases = _module(ROOT / "tests" / "test_errors.py", "test_errors")
    sys.path.insert(0, str(ROOT / "tests" / "fuzz"))
    hostile = _module(ROOT / "tests" / "fuzz" / "hostile.py", "hostile")
    print("| bad input | error | message (abridged) |")
    print("|---|---|---|")
    for case, call, error, _ in cases.CASES:
        print(_row(case, error.__name__, _raised(lambda: call(cases._model()))))
    for case, call, error, _ in hostile.CASES:
        with tempfile.TemporaryDirectory() as tmp:
            message = _raised(lambda: call(Path(tmp))).replace(tmp + "/", "").replace(tmp, ".")
        print(_row(case, error.__name__, message))
    for case, argv, _ in hostile.CLI_CASES:
        with tempfile.TemporaryDirectory() as tmp:
            message = _cli(argv(Path(tmp))).replace(tmp + "/", "").replace(tmp, ".")
        print(_row(case, "exit 2", message))


if __name__ == "__main__":
    sys.exit(main())
