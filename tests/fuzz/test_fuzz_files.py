"""Fuzzing the readers of untrusted files: plan JSON, safetensors headers and ``.pt2`` archives.

Hypothesis mutates real files written by fxprune and torch (flipped bytes, edited strings, duplicated
keys and entries, shape expressions carrying a payload that would create a marker file) and asserts the
reader's contract: it returns, or raises a typed ``FxPruneError``; it never raises anything else,
never runs the payload, and a plan it accepts gives a model that passes ``verify``. A crash of the
process fails the run.

CI runs :data:`CI_EXAMPLES` derandomized examples per reader (a few seconds). A long run::

    python benchmarks/fuzz_files.py --examples 2000
"""
from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxprune
from fxprune import io as fio
from fxprune.core.plan import Plan
from fxprune.errors import FxPruneError
from hostile import X, dynamic_pt2, saved_result, small_model

CI_EXAMPLES = 8
EXAMPLES = int(os.environ.get("FXPRUNE_FILE_FUZZ_EXAMPLES", CI_EXAMPLES))
LONG_RUN = "FXPRUNE_FILE_FUZZ_EXAMPLES" in os.environ
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=not LONG_RUN, database=None,
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """One real saved result and one real dynamic-batch ``.pt2``, as bytes (each example edits a copy)."""
    tmp = tmp_path_factory.mktemp("fuzz-files")
    saved = saved_result(tmp)
    return {"dir": saved, "plan": (saved / "plan.json").read_bytes(),
            "tensors": (saved / "model.safetensors").read_bytes(), "pt2": dynamic_pt2(tmp).read_bytes()}


def _payload(marker: Path) -> str:
    return f"__import__('pathlib').Path({str(marker)!r}).touch()"


# --- mutations -----------------------------------------------------------------------------------------
def flip(data: bytes, positions: list[int], bits: list[int]) -> bytes:
    out = bytearray(data)
    for p, b in zip(positions, bits):
        out[p % len(out)] ^= 1 << b
    return bytes(out)


def edit_strings(text: str, edits: list[tuple[int, str]]) -> str:
    """Replace the n-th JSON string value (mod their count) with another string."""
    parts = text.split('"')
    for n, new in edits:
        strings = range(1, len(parts), 2)
        if strings:
            parts[strings[n % len(strings)]] = new.replace('"', "'").replace("\\", "")
    return '"'.join(parts)


def duplicate_key(text: str, n: int) -> str:
    """A JSON object with one of its keys written twice (``json`` keeps the last)."""
    keys = [i for i, c in enumerate(text) if c == ":"]
    if not keys:
        return text
    at = keys[n % len(keys)]
    start = text.rfind("{", 0, at)
    return text[:start + 1] + text[start + 1:at] + ": 0, " + text[start + 1:]


TOKENS = st.sampled_from(["0", "-1", "1e999", "NaN", "[]", "{}", '"٣"', "2", "true", "null", "99999999999999999999"])
STRINGS = st.one_of(st.text(max_size=30), st.sampled_from(["__class__", "os.system", "0.weight", "2", "٣", "-1"]))
EDITS = st.lists(st.tuples(st.integers(0, 10_000), STRINGS), max_size=3)
FLIPS = st.tuples(st.lists(st.integers(0, 1 << 20), min_size=1, max_size=4), st.lists(st.integers(0, 7), min_size=4,
                                                                                      max_size=4))


def _typed_or_ok(fn, *args):
    """Run a reader: it returns, or raises a typed error. Anything else is a bug the fuzzer found."""
    try:
        return fn(*args)
    except FxPruneError:
        return None


# --- plan JSON -------------------------------------------------------------------------------------------
@SETTINGS
@given(kind=st.sampled_from(["flip", "strings", "duplicate", "token"]), flips=FLIPS, edits=EDITS,
       n=st.integers(0, 10_000), token=TOKENS)
def test_fuzzed_plan_is_refused_or_verifies(files, tmp_path_factory, kind, flips, edits, n, token) -> None:
    text = files["plan"].decode()
    if kind == "flip":
        data = flip(files["plan"], *flips)
    elif kind == "strings":
        data = edit_strings(text, edits).encode()
    elif kind == "duplicate":
        data = duplicate_key(text, n).encode()
    else:  # a number or literal replaced by another token
        digits = [i for i, c in enumerate(text) if c.isdigit()]
        at = digits[n % len(digits)]
        data = (text[:at] + token + text[at + 1:]).encode()
    directory = tmp_path_factory.mktemp("plan")
    (directory / "plan.json").write_bytes(data)
    (directory / "model.safetensors").write_bytes(files["tensors"])
    plan = _typed_or_ok(Plan.from_json, data)
    loaded = _typed_or_ok(fxprune.load, directory, small_model(), (X,))
    if loaded is not None:  # accepted: it must be a right model, not merely a model
        assert plan is not None
        assert fxprune.verify(small_model(), loaded, (X,)).passed


# --- safetensors headers -----------------------------------------------------------------------------------
@SETTINGS
@given(kind=st.sampled_from(["flip", "strings", "duplicate", "length"]), flips=FLIPS, edits=EDITS,
       n=st.integers(0, 10_000), length=st.integers(0, (1 << 64) - 1))
def test_fuzzed_safetensors_header_is_refused_or_loads(files, tmp_path_factory, kind, flips, edits, n,
                                                       length) -> None:
    data = files["tensors"]
    size = struct.unpack("<Q", data[:8])[0]
    header, body = data[8:8 + size].decode(), data[8 + size:]
    if kind == "flip":
        positions = [p % (8 + size) for p in flips[0]]  # flips inside the length and the header
        mutated = flip(data, positions, flips[1])
    elif kind == "length":
        mutated = struct.pack("<Q", length) + data[8:]
    else:
        new = edit_strings(header, edits) if kind == "strings" else duplicate_key(header, n)
        raw = new.encode()
        mutated = struct.pack("<Q", len(raw)) + raw + body
    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    path.write_bytes(mutated)
    state = _typed_or_ok(fio.read_safetensors, path)
    if state is not None:
        assert all(isinstance(v, torch.Tensor) for v in state[0].values())


# --- .pt2 archives -----------------------------------------------------------------------------------------
def _rewrite(src: bytes, dst: Path, entry_edit, duplicate: int | None) -> None:
    import io
    import warnings
    with zipfile.ZipFile(io.BytesIO(src)) as zin, zipfile.ZipFile(dst, "w") as zout, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        infos = zin.infolist()
        for i, info in enumerate(infos):
            data = zin.read(info.filename)
            if duplicate is not None and i == duplicate % len(infos):
                zout.writestr(info.filename, b'{"config": {}}')
            zout.writestr(info, entry_edit(info.filename, data))


@SETTINGS
@given(kind=st.sampled_from(["expr", "strings", "duplicate", "flip-json", "flip-archive"]), flips=FLIPS,
       edits=EDITS, n=st.integers(0, 10_000), glue=st.sampled_from([" + 0*", " * ", ", ", ")+(", " if ", ""]))
def test_fuzzed_pt2_is_refused_or_loads_without_running_code(files, tmp_path_factory, kind, flips, edits, n,
                                                            glue) -> None:
    directory = tmp_path_factory.mktemp("pt2")
    marker = directory / "PWNED"
    path = directory / "model.pt2"

    def entry_edit(name: str, data: bytes) -> bytes:
        if not name.endswith("models/model.json"):
            return data
        text = data.decode()
        if kind == "expr":  # a payload glued into a shape expression
            return text.replace("integer=True)", "integer=True)" + glue + _payload(marker), 1 + n % 3).encode()
        if kind == "strings":
            return edit_strings(text, edits + [(n, _payload(marker))]).encode()
        if kind == "flip-json":
            return flip(data, *flips)
        return data

    if kind == "flip-archive":
        path.write_bytes(flip(files["pt2"], *flips))
    else:
        _rewrite(files["pt2"], path, entry_edit, n if kind == "duplicate" else None)
    program = _typed_or_ok(fio.load_pt2, path)
    assert not marker.exists(), "a payload ran"
    if program is not None:
        assert program.module()(torch.randn(3, 4)).shape == (3, 3)
