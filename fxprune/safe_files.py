"""Reading untrusted files as data: bounded reads, formats detected by structure, ``.pt2`` archives
read exactly as ``torch.export.load`` reads them, and the strings torch would evaluate whitelisted.

* :func:`read_bounded` reads at most ``limit`` bytes of a regular file: ``/dev/zero``, a FIFO or a
  directory is refused instead of read forever.
* :func:`check_safetensors` accepts a file only if it *is* safetensors: a little-endian u64 header
  length, then that many bytes of a JSON object. A pickle is recognised and named.
* :func:`check_pt2` opens a ``.pt2`` with torch's own zip reader (``torch._C.PyTorchFileReader``), so
  every check sees the bytes ``torch.export.load`` will see; an archive with a duplicated entry name is
  refused (two readers may pick different copies). Every ``expr_str`` in the archive's JSON — the
  strings ``torch.export.load`` hands to ``sympy.sympify``, which evaluates them — must parse as a
  sympy ``srepr`` expression: the symbol, number and operator calls torch writes, nothing else.

>>> check_sym_expr("Symbol('s77', positive=True, integer=True)", "models/model.json")
>>> check_sym_expr("Symbol('s77') + 0*__import__('os').system('x')", "models/model.json")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
fxprune.errors.UnsafeFileError: models/model.json: expr_str ... is not a sympy expression torch writes: ...
"""
from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import re
import shutil
import stat
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator, Union

import torch

from fxprune.errors import UnsafeFileError

MAX_JSON_BYTES = 64 << 20
"""Plans, configs and archive JSON entries larger than this are refused (a plan of a 70B model is ~20 MB)."""
MAX_EXPR_CHARS = 4096
MAX_INT = 2 ** 63
_SAFETENSORS_HEADER_LIMIT = 100 << 20  # safetensors' own limit on the header
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # a pickle protocol >= 2; a torch.save zip archive


# --- bounded reads ----------------------------------------------------------------------------------
def read_bounded(path: Union[str, os.PathLike], limit: int = MAX_JSON_BYTES, what: str = "file") -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; anything else is an UnsafeFileError.

    >>> read_bounded("/dev/zero")
    Traceback (most recent call last):
    ...
    fxprune.errors.UnsafeFileError: cannot read file /dev/zero: not a regular file
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO opens without a writer
    except OSError as exc:
        raise UnsafeFileError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafeFileError(f"cannot read {what} {path}: not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UnsafeFileError(f"{what} {path} is larger than {limit} bytes; refusing to read it")
    return data


def regular_size(path: Path, what: str) -> int:
    """The size of a regular file (a FIFO, device or directory is refused before it is opened)."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise UnsafeFileError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeFileError(f"cannot read {what} {path}: not a regular file")
    return info.st_size


# --- safetensors by structure --------------------------------------------------------------------------
def check_safetensors(path: Path) -> None:
    """Refuse ``path`` unless it has safetensors' structure: ``u64`` header length ``n`` (little-endian),
    then ``n`` bytes of a JSON object. A first byte ``0x80`` is often the header length's low byte (a
    header of 0x280 bytes), so a pickle is named only when the file is not safetensors."""
    size = regular_size(path, "tensors")
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        header = f.read(n) if 0 < n <= min(size - 8, _SAFETENSORS_HEADER_LIMIT) else b""
    if header[:1] == b"{" and _is_json_object(header):
        return
    if head.startswith(_PICKLE_MAGIC):
        raise UnsafeFileError(f"{path} is a pickle / torch.save file, not safetensors; fxprune never "
                              f"unpickles (re-save the tensors with safetensors)")
    raise UnsafeFileError(f"{path} is not a safetensors file (no u64 header length followed by a JSON header)")


def _is_json_object(data: bytes) -> bool:
    try:
        return isinstance(json.loads(data), dict)
    except (ValueError, RecursionError):
        return False


def loads_json(data: Union[str, bytes], where: str) -> Any:
    """``json.loads`` whose failures (deep nesting included) are an UnsafeFileError naming ``where``."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError, TypeError) as exc:
        raise UnsafeFileError(f"{where} is not JSON: {type(exc).__name__}: {str(exc)[:200]}") from exc


# --- .pt2 archives --------------------------------------------------------------------------------------
MAX_PT2_BYTES = 64 << 30


def pt2_records(path: Path) -> dict[str, bytes]:
    """Every record of a ``.pt2`` as torch's reader returns it (root folder stripped), after refusing
    duplicated names: Python's ``zipfile`` returns a name's last copy, torch's reader may return another."""
    size = regular_size(path, ".pt2 archive")
    if size > MAX_PT2_BYTES:
        raise UnsafeFileError(f"{path} is larger than {MAX_PT2_BYTES} bytes; refusing to read it")
    _refuse_duplicates(path, _central_names(path))
    try:
        reader = torch._C.PyTorchFileReader(str(path))
        names = list(reader.get_all_records())
    except Exception as exc:  # torch's reader rejects it: so would torch.export.load
        raise UnsafeFileError(f"{path} is not a torch.export .pt2 archive: {_first_line(exc)}") from exc
    _refuse_duplicates(path, names)
    try:
        return {name: bytes(reader.get_record(name)) for name in names}
    except Exception as exc:
        raise UnsafeFileError(f"{path}: an entry cannot be read: {_first_line(exc)}") from exc


def _central_names(path: Path) -> list[str]:
    """The names in the zip's central directory; every one must sit under a single root folder."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise UnsafeFileError(f"{path} is not a torch.export .pt2 archive: {exc}") from exc
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) > 1 or any("/" not in n for n in names):
        raise UnsafeFileError(f"{path}: entries must share one root folder, found {sorted(roots)[:4]}")
    return [n.split("/", 1)[1] for n in names]


def _refuse_duplicates(path: Path, names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise UnsafeFileError(f"{path}: entry {name!r} appears twice; readers disagree on which copy "
                                  f"is read, so the archive is refused")
        seen.add(name)


def check_pt2_json(path: Path, name: str, data: bytes) -> Any:
    """Parse a JSON entry and whitelist every ``expr_str`` in it (the strings torch sympifies)."""
    value = loads_json(data, f"{path}: {name}")
    for expr in _expr_strings(value):
        check_sym_expr(expr, f"{path}: {name}")
    return value


def _expr_strings(value: Any) -> Iterator[Any]:
    stack = [value]  # iterative: a deep tree cannot overflow the stack
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                if key == "expr_str":
                    yield child
                else:
                    stack.append(child)
        elif isinstance(item, list):
            stack.extend(item)


# --- sympy srepr whitelist -------------------------------------------------------------------------------
_SYMPY_CALLS = frozenset("""
Symbol Dummy Integer Float Rational Add Mul Pow Max Min Abs Mod floor ceiling Piecewise ITE
Eq Ne Lt Le Gt Ge Equality Unequality StrictLessThan LessThan StrictGreaterThan GreaterThan And Or Not
FloorDiv ModularIndexing Where PythonMod CleanDiv CeilToInt FloorToInt CeilDiv LShift RShift PowByNatural
FloatPow FloatTrueDiv IntTrueDiv IsNonOverlappingAndDenseIndicator TruncToFloat TruncToInt RoundToInt
RoundDecimal ToFloat Identity
""".split())
"""The calls ``sympy.srepr`` writes for shape expressions, and torch's own sympy functions (the names
``torch._export.serde.serialize`` passes to ``sympify``)."""
_SYMPY_NAMES = frozenset("oo zoo nan true false S.true S.false Half One Zero NegativeOne Infinity "
                         "NegativeInfinity BooleanTrue BooleanFalse".split())
_ASSUMPTIONS = frozenset("positive negative nonnegative nonpositive integer real finite zero nonzero "
                         "even odd rational commutative".split())
_SYMBOL_NAME = re.compile(r"[a-z]{1,4}[0-9]{1,9}\Z")  # torch's symbols: s0, u12, ps3, zuf0
_DECIMAL = re.compile(r"-?[0-9]{1,40}(\.[0-9]{0,40})?(e-?[0-9]{1,3})?\Z")  # Float('1.5', precision=53)
_OPERATORS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.USub, ast.UAdd,
              ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Eq, ast.NotEq, ast.BitAnd, ast.BitOr, ast.Not, ast.Invert)


def check_sym_expr(expr: Any, where: str) -> None:
    """Refuse a string ``sympify`` would evaluate unless it is a plain shape expression: calls from
    :data:`_SYMPY_CALLS`, symbol names like ``s77``, integers below 2**63, floats, arithmetic and
    comparisons. Parsing with :mod:`ast` evaluates nothing."""
    if not isinstance(expr, str) or len(expr) > MAX_EXPR_CHARS:
        raise UnsafeFileError(f"{where}: expr_str must be a string of at most {MAX_EXPR_CHARS} characters")
    try:
        tree = ast.parse(expr, mode="eval")
        nodes = list(ast.walk(tree))
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise UnsafeFileError(f"{where}: expr_str {expr[:80]!r} does not parse: {type(exc).__name__}") from exc
    for node in nodes:
        problem = _node_problem(node)
        if problem:
            raise UnsafeFileError(f"{where}: expr_str {expr[:120]!r} is not a sympy expression torch "
                                  f"writes: {problem}; refusing to load")


def _node_problem(node: ast.AST) -> str:
    if isinstance(node, (ast.Expression, ast.Load, ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp,
                         ast.And, ast.Or, ast.keyword) + _OPERATORS):
        return _pow_problem(node) if isinstance(node, ast.BinOp) else ""
    if isinstance(node, ast.Call):
        return _call_problem(node)
    if isinstance(node, ast.Name):
        ok = node.id in _SYMPY_CALLS or node.id in _SYMPY_NAMES or _SYMBOL_NAME.match(node.id)
        return "" if ok else f"name {node.id!r}"
    if isinstance(node, ast.Constant):
        return _constant_problem(node.value)
    return f"{type(node).__name__} syntax"


def _call_problem(node: ast.Call) -> str:
    if not isinstance(node.func, ast.Name) or node.func.id not in _SYMPY_CALLS:
        return f"call of {ast.unparse(node.func)[:40]!r}"
    for kw in node.keywords:
        allowed = bool if kw.arg in _ASSUMPTIONS else int if (node.func.id, kw.arg) == ("Float", "precision") \
            else None
        if allowed is None or not isinstance(kw.value, ast.Constant) or type(kw.value.value) is not allowed:
            return f"keyword {kw.arg!r} of {node.func.id}"
    if node.func.id in ("Symbol", "Dummy"):
        first = node.args[0] if len(node.args) == 1 else None
        if not (isinstance(first, ast.Constant) and isinstance(first.value, str)
                and _SYMBOL_NAME.match(first.value)):
            return "a Symbol's name must be a symbol like 's77'"
    if node.func.id == "Integer" and (len(node.args) != 1 or _literal_int(node) is None):
        return "Integer() of something other than a literal integer"
    if node.func.id in ("Pow", "PowByNatural", "FloatPow") and len(node.args) == 2:
        return _exponent_problem(node.args[1])
    return ""


def _pow_problem(node: ast.BinOp) -> str:
    return _exponent_problem(node.right) if isinstance(node.op, ast.Pow) else ""


def _exponent_problem(node: ast.AST) -> str:
    """sympy evaluates a power of numbers eagerly (``Integer(2)**Integer(10**18)`` never returns): an
    exponent is a literal integer of at most 64, or holds a symbol (then nothing is evaluated)."""
    value = _literal_int(node)
    if value is not None:
        return f"exponent {value}" if abs(value) > 64 else ""
    symbolic = any(isinstance(n, ast.Name) and _SYMBOL_NAME.match(n.id) or
                   isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("Symbol", "Dummy")
                   for n in ast.walk(node))
    return "" if symbolic else "a constant exponent that is not a literal integer"


def _literal_int(node: ast.AST) -> Any:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Integer" \
            and len(node.args) == 1:
        node = node.args[0]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        node = node.operand
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    return None


def _constant_problem(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return ""
    if isinstance(value, int):
        return "" if abs(value) < MAX_INT else f"integer {str(value)[:20]}... out of range"
    if isinstance(value, float):
        return ""
    if isinstance(value, str):
        ok = _SYMBOL_NAME.match(value) or _DECIMAL.match(value)
        return "" if ok else f"string {value[:40]!r}"
    return f"constant {type(value).__name__}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"


def torch_load_weights_only(data: bytes) -> Any:
    """``torch.load(weights_only=True)`` of in-memory bytes (the check of a ``.pt2``'s sample inputs)."""
    return torch.load(io.BytesIO(data), weights_only=True)


# --- all-or-nothing output directories ---------------------------------------------------------------------
OUTPUT_NAMES = re.compile(r"(plan\.json|model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|"
                          r"module\.py|sizes\.json|README\.md|summary\.md|widths\.png|model\.pte|model\.onnx(\.data)?|"
                          r"config\.json|generation_config\.json|__pycache__)\Z")
"""What fxprune (and ``save_pretrained`` on its behalf) writes: an existing output directory holding only
these is replaced; one holding anything else is the user's, and is refused rather than deleted."""


@contextlib.contextmanager
def staged_directory(target: Union[str, os.PathLike]) -> Iterator[Path]:
    """Yield a fresh, private directory beside ``target``; when the block succeeds it becomes ``target``
    in one rename (an existing output is swapped out atomically with ``renameat2(RENAME_EXCHANGE)``
    where the kernel has it, else moved aside first), and when it fails it is removed and ``target``
    is left as it was. Links are never followed: ``target`` must not be a symlink, and nothing is
    written outside the fresh directory.

    >>> with staged_directory("pruned/") as tmp:             # doctest: +SKIP
    ...     (tmp / "plan.json").write_text(plan.to_json())
    """
    target = Path(os.path.abspath(target))
    check_output(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".fxprune-tmp", dir=target.parent))
    except OSError as exc:
        raise UnsafeFileError(f"cannot write output {target}: {exc.strerror or exc}") from exc
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would surprise: an ordinary directory
        _swap_into_place(tmp, target)
    except OSError as exc:
        raise UnsafeFileError(f"cannot write output {target}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the new output on failure, the old one after a swap


def check_output(target: Union[str, os.PathLike]) -> None:
    """Fail early, before any work, where :func:`staged_directory` would fail late: ``target`` is a
    link, a file, a directory of someone else's files, or lies under a file or an unwritable place."""
    target = Path(os.path.abspath(target))
    _check_target(target)
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK) or _is_virtual(ancestor):
        raise UnsafeFileError(f"cannot write output {target}: {ancestor} is not a writable directory")


def _is_virtual(path: Path) -> bool:
    """/proc and /sys accept some writes but hold no files."""
    return path.resolve().parts[1:2] in (("proc",), ("sys",))


def _check_target(target: Path) -> None:
    if target.is_symlink():
        raise UnsafeFileError(f"output {target} is a symbolic link; fxprune does not follow links "
                              f"(remove it or choose another directory)")
    if target.exists() and not target.is_dir():
        raise UnsafeFileError(f"output {target} exists and is not a directory")
    if target.is_dir():
        foreign = sorted(p.name for p in target.iterdir() if not OUTPUT_NAMES.match(p.name) or p.is_symlink())
        if foreign:
            raise UnsafeFileError(f"output {target} holds files fxprune did not write ({foreign[:3]}); "
                                  f"choose a new or empty directory")


def _swap_into_place(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
    elif not _exchange(tmp, target):  # no renameat2: the old output goes aside, then the new one in
        aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".fxprune-old", dir=target.parent))
        os.rename(target, aside / "old")
        os.rename(tmp, target)
        os.rename(aside / "old", tmp)  # removed by the caller, with its (empty) holder below
        aside.rmdir()
    # after an exchange ``tmp`` holds the previous output; the caller removes it


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system cannot exchange
        return False
    raise OSError(errno, os.strerror(errno))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_new(path: Path, data: bytes) -> None:
    """Write a file that must not exist yet, never through a link (inside a staged directory)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
