"""Files of a same-class result: what the user's ecosystem loads, with nothing that runs code.

``save(out, directory)`` writes ``model.safetensors`` (the pruned module's ``state_dict``, the user's
own names), ``plan.json`` (the plan) and ``sizes.json`` (every size attribute the rebuild changed,
``{module path: {attribute: value}}``, ints and lists of ints only). ``load(directory, model)`` rebuilds a
freshly constructed ``model`` of the same class from those: the plan slices it, ``sizes.json`` sets the
attributes, and the tensors are loaded strictly (every name, every shape). Each file is written beside
its target and renamed in one step.

>>> fxprune.module.save(out, "pruned/")                                   # doctest: +SKIP
>>> small = fxprune.module.load("pruned/", MyDetector())                  # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from fxprune.errors import PlanMismatchError, UnsafeFileError
from fxprune.io import read_plan, read_safetensors, tensors_bytes
from fxprune.safe_files import loads_json, read_bounded, staged_directory, write_new
from fxprune.module.rebuild import rebuild

PLAN_FILE, TENSORS_FILE, SIZES_FILE = "plan.json", "model.safetensors", "sizes.json"


def size_changes(old: nn.Module, new: nn.Module) -> dict[str, dict[str, Any]]:
    """{module path: {attribute: new value}} for every int or int-tuple attribute that differs."""
    out: dict[str, dict[str, Any]] = {}
    new_modules = dict(new.named_modules(remove_duplicate=False))
    for path, module in old.named_modules(remove_duplicate=False):
        for name, value in vars(module).items():
            after = getattr(new_modules[path], name, None)
            if _is_size(value) and _is_size(after) and after != value:
                out.setdefault(path, {})[name] = list(after) if isinstance(after, tuple) else after
    return out


def _is_size(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, (tuple, list)) and bool(value)
                                      and all(isinstance(v, int) and not isinstance(v, bool) for v in value))


def save(out: Any, directory: Union[str, os.PathLike], original: nn.Module,
         extra: Optional[Mapping[str, bytes]] = None) -> Path:
    """Write ``out`` (a :class:`~fxprune.module.ModuleResult` or ``PartsResult``) to ``directory``;
    ``original`` is the model it was pruned from (for the size attributes that changed); ``extra``
    files ({name: bytes}, a summary) join them in the same all-or-nothing write."""
    files = {TENSORS_FILE: tensors_bytes(out.module), PLAN_FILE: out.plan.to_json().encode(),
             SIZES_FILE: json.dumps(size_changes(original, out.module), indent=1, sort_keys=True).encode(),
             **(extra or {})}
    with staged_directory(directory) as staged:  # all or nothing, as fxprune.save
        for name, data in files.items():
            write_new(staged / name, data)
    return Path(directory)


def load(directory: Union[str, os.PathLike], model: nn.Module) -> nn.Module:
    """A pruned copy of ``model`` (freshly built, same class as the saved one) from ``directory``."""
    path = Path(directory)
    plan = read_plan(path / PLAN_FILE)
    small = rebuild(model, plan)
    for module_path, values in _sizes(path / SIZES_FILE).items():
        module = _module(small, module_path)
        for name, value in values.items():
            if not hasattr(module, name):
                raise UnsafeFileError(f"{path / SIZES_FILE}: {module_path!r} has no attribute {name!r}")
            setattr(module, name, tuple(value) if isinstance(getattr(module, name), tuple) else value)
    state, _ = read_safetensors(path / TENSORS_FILE)
    _load_state(small, state, path)
    return small


def _sizes(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = loads_json(read_bounded(path, what="sizes file"), str(path))
    except (OSError, ValueError) as exc:
        raise UnsafeFileError(f"{path}: not a sizes file: {exc}") from exc
    ok = isinstance(data, dict) and all(isinstance(k, str) and isinstance(v, dict) and all(
        isinstance(n, str) and _is_size(x) for n, x in v.items()) for k, v in data.items())
    if not ok:
        raise UnsafeFileError(f"{path}: sizes must be {{module path: {{attribute: int or list of ints}}}}")
    return data


def _module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as exc:
        raise PlanMismatchError(f"the saved sizes name module {path!r}, which {type(model).__name__} lacks") from exc


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    own = model.state_dict()
    wrong = sorted(k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape))
    missing, unknown = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if wrong or missing or unknown:
        raise PlanMismatchError(f"{path / TENSORS_FILE} does not fit the rebuilt {type(model).__name__}: shapes "
                                f"differ for {wrong[:3]}, missing {missing[:3]}, unknown {unknown[:3]}")
    model.load_state_dict(state, strict=True)
