"""Save and load pruned models without pickle.

``save(result, directory)`` writes four files, all plain data or plain source:

* ``plan.json`` — the :class:`~fxprune.core.plan.Plan` (which indices of which tensors survive);
* ``model.safetensors`` — the pruned GraphModule's ``state_dict`` (plus any non-persistent buffer),
  tied tensors stored once and re-tied on load (safetensors refuses shared storage);
* ``module.py`` — the pruned model as source: one ``torch.nn.Module`` class whose ``forward`` is the
  graph's generated code and whose ``__init__`` rebuilds every layer from its constructor arguments
  (``torch.nn.Conv2d(in_channels=3, out_channels=32, ...)``) — the pickle-free counterpart of
  ``torch.fx.GraphModule.to_folder``, which ``torch.save``\\ s its state and any module it cannot print.
  ``module.load()`` needs only torch and safetensors, not fxprune. An export-level graph is written
  with its ATen calls and pytree specs (as JSON); its input guards (``_guards_fn``, shape asserts made
  by ``exec``) have no source and are left out — the ``.pt2`` route below keeps them;
* ``README.md`` — how to load it.

``load(directory, model, example_inputs)`` is the checked way back: the plan is parsed against a strict
schema, applied to a fresh copy of the model (:func:`fxprune.apply_plan`), and the saved tensors are
loaded only if their names, shapes and dtypes match exactly. A pickle or ``torch.save`` file where a
safetensors file belongs raises :class:`~fxprune.errors.UnsafeFileError`; it is never unpickled.

``torch.export`` has its own format (``.pt2``): ``torch.export.save(torch.export.export(gm, inputs),
path)``. ``torch.export.load`` reads plain tensors from raw bytes, but it obeys the file's own
``use_pickle`` flags (``torch.load(weights_only=False)``), ``pickle.loads`` opaque constants, and falls
back to ``weights_only=False`` when the example inputs or a legacy archive fail the safe load — so an
untrusted ``.pt2`` can run code. :func:`load_pt2` inspects the archive first and refuses every such entry.
"""
from __future__ import annotations

import copy
import importlib
import inspect
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from fxprune.errors import PlanMismatchError, UnsafeFileError, UnsupportedModelError
from fxprune.core.plan import Plan
from fxprune.stages import PruneResult, apply
from fxprune.safe_files import (check_pt2_json, check_safetensors, pt2_records, read_bounded,
                                staged_directory, torch_load_weights_only, write_new)

PLAN_FILE, TENSORS_FILE, MODULE_FILE, README_FILE = "plan.json", "model.safetensors", "module.py", "README.md"
CLASS_NAME = "PrunedModel"
_META = "fxprune"  # the one metadata key: safetensors writes several keys in random (hash) order


# --- save ----------------------------------------------------------------------------------------
def save(result: Any, directory: Union[str, os.PathLike]) -> Path:
    """Write ``result`` (a :class:`~fxprune.stages.PruneResult`, or a bare GraphModule) to ``directory``.

    All or nothing: everything is generated in memory, written into a fresh directory beside
    ``directory`` and renamed into place in one step (:func:`fxprune.safe_files.staged_directory`); a
    failed save leaves a previous output intact and no temporary files, and no link is followed.
    Returns the directory.

    >>> fxprune.save(result, "pruned/")                                       # doctest: +SKIP
    >>> again = fxprune.load("pruned/", torchvision.models.resnet18(), (x,))   # doctest: +SKIP
    """
    files = output_files(result)
    with staged_directory(directory) as tmp:
        write_files(tmp, files)
    return Path(directory)


def output_files(result: Any) -> dict[str, bytes]:
    """The files :func:`save` writes, by name, built in memory."""
    gm = result if isinstance(result, fx.GraphModule) else result.graph_module
    files: dict[str, bytes] = {MODULE_FILE: module_source(gm).encode(), TENSORS_FILE: tensors_bytes(gm)}
    if not isinstance(result, fx.GraphModule):
        files[PLAN_FILE] = result.plan.to_json().encode()
    files[README_FILE] = _readme(PLAN_FILE in files).encode()
    return files


def write_files(directory: Path, files: Mapping[str, bytes]) -> None:
    """Write new files into a staged directory (never through a link, never over a file)."""
    for name, data in files.items():
        write_new(directory / name, data)


def tensors_bytes(gm: torch.nn.Module) -> bytes:
    """The safetensors encoding of ``gm``'s state: each storage once, aliases in the metadata."""
    from safetensors.torch import save
    state = dict(gm.state_dict(keep_vars=False))
    non_persistent = sorted(k for k, _ in gm.named_buffers() if k not in state)
    named = dict(gm.named_buffers())
    state.update({k: named[k] for k in non_persistent})
    unique, aliases = _dedupe(state)
    metadata = {_META: json.dumps({"aliases": aliases, "non_persistent": non_persistent}, sort_keys=True)}
    try:
        return save({k: v.detach().cpu().contiguous() for k, v in unique.items()}, metadata=metadata)
    except (ValueError, TypeError, RuntimeError) as exc:  # a dtype or tensor kind safetensors lacks
        raise UnsupportedModelError(f"the pruned model's tensors cannot be written as safetensors: {exc}") from exc


def _dedupe(state: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """Tensors that are the same view of one storage are stored once; partial overlaps are copied."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for key in sorted(state):
        t = state[key]
        if t.device.type == "meta":
            raise UnsupportedModelError(f"tensor {key!r} is on the meta device: it has no data to save")
        view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if view in seen and t.numel():
            aliases[key] = seen[view]
            continue
        seen[view] = key
        shared = t.untyped_storage().data_ptr() in storages and t.numel()
        storages.add(t.untyped_storage().data_ptr())
        unique[key] = t.clone() if shared else t
    return unique, aliases


# --- module.py: the graph as source, layers rebuilt from their constructor arguments --------------
def module_source(gm: fx.GraphModule, class_name: str = CLASS_NAME) -> str:
    """Source of a module equal to ``gm`` that imports only torch and safetensors."""
    imports: set[str] = {"import torch"}
    classes: list[str] = []
    _class_source(gm, class_name, imports, classes)
    header = (f'"""{class_name}: a model pruned by fxprune, as plain PyTorch source.\n\n'
              f"    import module; model = module.load()   # reads model.safetensors next to this file\n"
              f'"""\n')
    ordered = sorted(imports, key=lambda line: (not line.startswith(("import ", "from ")), line))
    return header + "\n".join(ordered) + _HELPERS + "\n\n".join(classes) + _LOADER.format(
        cls=class_name)


def _class_source(gm: fx.GraphModule, class_name: str, imports: set, classes: list) -> None:
    graph = _source_graph(gm)
    code = graph.python_code(root_module="self")
    lines = _global_lines(code.globals)
    body = _install_lines(gm, graph, class_name, imports, classes)
    forward = "\n".join("    " + line if line.strip() else "" for line in code.src.strip("\n").splitlines())
    init = "\n".join(["    def __init__(self):", "        super().__init__()"] + body)
    classes.append(f"class {class_name}(torch.nn.Module):\n{init}\n\n{forward}\n")
    imports.update(lines)


def _source_graph(gm: fx.GraphModule) -> fx.Graph:
    """The graph to print, less torch.export's input guards: a ``GuardsFn`` whose ``forward`` was made by
    ``exec`` (shape asserts) has no source to write; the saved module accepts any shape its ops accept."""
    graph = copy.deepcopy(gm.graph)
    for node in list(graph.nodes):
        if node.op == "call_module" and not node.users and _is_guards(gm.get_submodule(node.target)):
            graph.erase_node(node)
    return graph


def _is_guards(module: torch.nn.Module) -> bool:
    cls = type(module)
    return (cls.__module__, cls.__qualname__) == ("torch.export._unlift", "GuardsFn")


def _global_lines(globals_: Mapping[str, Any]) -> set[str]:
    """One import (or definition) per name the generated forward uses."""
    return {_global_line(name, obj) for name, obj in globals_.items()}


def _global_line(name: str, obj: Any) -> str:
    if inspect.ismodule(obj):
        return f"import {obj.__name__}" if name == obj.__name__ else f"import {obj.__name__} as {name}"
    if isinstance(obj, float) and (math.isinf(obj) or math.isnan(obj)):
        return f"{name} = float({str(obj)!r})"
    if obj is type(None):
        return f"{name} = type(None)"
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
    if module and qualname and _resolve(module, qualname) is obj:
        alias = "" if name == qualname else f" as {name}"
        if "." not in qualname:
            return f"from {module} import {qualname}{alias}"
    raise UnsupportedModelError(f"the graph's code uses {name!r} ({obj!r}), which cannot be imported by "
                                f"name; it cannot be written as source")


def _resolve(module: str, qualname: str) -> Any:
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        return obj
    except (ImportError, AttributeError):
        return None


def _install_lines(gm: fx.GraphModule, graph: fx.Graph, class_name: str, imports: set,
                   classes: list) -> list[str]:
    lines, leaves = [], {}
    for node in graph.nodes:
        if node.op == "call_module" and node.target not in leaves:
            leaves[node.target] = gm.get_submodule(node.target)
        elif node.op == "get_attr" and isinstance(_get(gm, node.target), torch.nn.Module):
            leaves.setdefault(node.target, _get(gm, node.target))
    for target, module in leaves.items():
        lines.append(f"        _install(self, {target!r}, {_constructor(target, module, class_name, imports, classes)})")
    lines += _state_lines(gm, set(leaves))
    lines += _attribute_lines(gm, graph, set(leaves), imports)
    lines += _training_lines(gm)
    return lines


def _get(root: Any, target: str) -> Any:
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _owned_by(key: str, leaves: set) -> bool:
    return any(key.startswith(leaf + ".") for leaf in leaves)


def _state_lines(gm: fx.GraphModule, leaves: set) -> list[str]:
    """Parameters and buffers held by containers (not rebuilt layers): empty, filled by ``load``."""
    lines = []
    for key, p in gm.named_parameters(remove_duplicate=False):
        if not _owned_by(key, leaves):
            lines.append(f"        _param(self, {key!r}, {list(p.shape)}, {p.dtype}, {p.requires_grad})")
    persistent = set(gm.state_dict())
    for key, b in gm.named_buffers(remove_duplicate=False):
        if not _owned_by(key, leaves):
            lines.append(f"        _buffer(self, {key!r}, {list(b.shape)}, {b.dtype}, {key in persistent})")
    return lines


def _attribute_lines(gm: fx.GraphModule, graph: fx.Graph, leaves: set, imports: set) -> list[str]:
    """The pytree specs of an export-level graph, and any literal attribute the code reads."""
    lines = []
    for attr in ("_in_spec", "_out_spec"):
        spec = getattr(gm, attr, None)
        if spec is not None:
            imports.add("import torch.utils._pytree")
            lines.append(f"        self.{attr} = torch.utils._pytree.treespec_loads({_spec_json(attr, spec)!r})")
    for node in graph.nodes:
        if node.op == "get_attr" and node.target not in leaves:
            value = _get(gm, node.target)
            if not isinstance(value, (torch.Tensor, torch.nn.Module)):
                lines.append(f"        _install(self, {node.target!r}, {_literal(node.target, value)})")
    return lines


def _spec_json(attr: str, spec: pytree.TreeSpec) -> str:
    try:
        return pytree.treespec_dumps(spec)
    except Exception as exc:  # a pytree node type without a serialized name
        raise UnsupportedModelError(f"the graph's {attr} ({spec}) cannot be written as JSON: {exc}") from exc


def _training_lines(gm: fx.GraphModule) -> list[str]:
    lines = [f"        self.train({gm.training})"]
    for name, module in gm.named_modules():
        if name and module.training != gm.training:
            lines.append(f"        self.get_submodule({name!r}).training = {module.training}")
    return lines


# --- constructors -----------------------------------------------------------------------------------
def _constructor(target: str, module: torch.nn.Module, class_name: str, imports: set, classes: list) -> str:
    """A constructor call that rebuilds ``module`` (checked by rebuilding it here)."""
    if isinstance(module, fx.GraphModule):
        sub = f"{class_name}_{re.sub(r'[^0-9A-Za-z_]', '_', target)}"
        _class_source(module, sub, imports, classes)
        return f"{sub}()"
    cls = type(module)
    if not cls.__module__.startswith("torch.") or _resolve(cls.__module__, cls.__qualname__) is not cls:
        raise UnsupportedModelError(
            f"module {target!r} ({cls.__module__}.{cls.__qualname__}) is not a torch layer that can be "
            f"rebuilt from source; capture at the export level (its graphs call ATen ops, not layers)")
    _refuse_patched_methods(target, module)
    kwargs = _constructor_kwargs(target, module)
    _check_rebuild(target, module, kwargs)
    public = getattr(torch.nn, cls.__name__, None) is cls
    path = f"torch.nn.{cls.__name__}" if public else f"{cls.__module__}.{cls.__qualname__}"
    if not public:
        imports.add(f"import {cls.__module__}")
    args = ", ".join(f"{k}={_literal(f'{target}.{k}', v)}" for k, v in kwargs.items())
    return f"{path}({args})"


def _refuse_patched_methods(target: str, module: torch.nn.Module) -> None:
    """A function stored on the instance (a replaced ``forward``) is behaviour no constructor restores."""
    for name, value in module.__dict__.items():
        if callable(value) and not isinstance(value, (torch.nn.Module, type)):
            raise UnsupportedModelError(f"module {target!r} ({type(module).__name__}) has its own {name!r} "
                                        f"({value!r}); it cannot be written as source")


_SKIPPED_ARGS = {"self", "device", "dtype"}


def _constructor_kwargs(target: str, module: torch.nn.Module) -> dict[str, Any]:
    """Constructor arguments read back from the attributes of the same name (torch's convention);
    optional ones are kept only where they differ from a layer built with the required ones alone."""
    params = {n: p for n, p in _init_parameters(type(module)).items()
              if n not in _SKIPPED_ARGS and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    values = {n: _argument(module, n, p) for n, p in params.items()}
    required = [n for n, p in params.items() if p.default is p.empty]
    missing = [n for n in required if values[n] is _MISSING]
    if missing:
        raise UnsupportedModelError(f"module {target!r} ({type(module).__name__}): constructor arguments "
                                    f"{missing} are not stored on the module; it cannot be rebuilt")
    kwargs = {n: v for n, v in values.items() if v is not _MISSING}
    reference = _build(type(module), {n: kwargs[n] for n in required})
    if reference is None:
        return kwargs
    return {n: v for n, v in kwargs.items() if n in required or not _same(_argument(reference, n, params[n]), v)}


_MISSING = object()
_READERS = {  # constructor arguments a layer stores under another name
    (torch.nn.MultiheadAttention, "bias"): lambda m: m.in_proj_bias is not None,
    (torch.nn.MultiheadAttention, "add_bias_kv"): lambda m: m.bias_k is not None,
}


def _init_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """Named constructor parameters; RNN layers take ``RNNBase``'s, less the ``mode`` their class fixes."""
    if not (issubclass(cls, torch.nn.RNNBase) and cls is not torch.nn.RNNBase):
        return dict(inspect.signature(cls.__init__).parameters)
    params = dict(inspect.signature(torch.nn.RNNBase.__init__).parameters)
    params.pop("mode")
    if issubclass(cls, torch.nn.RNN):
        params["nonlinearity"] = inspect.Parameter("nonlinearity", inspect.Parameter.KEYWORD_ONLY, default="tanh")
    return params


def _argument(module: torch.nn.Module, name: str, param: inspect.Parameter) -> Any:
    reader = next((f for (cls, arg), f in _READERS.items() if arg == name and isinstance(module, cls)), None)
    if reader is not None:
        return reader(module)
    if name in module._parameters or name in module._buffers:  # ``bias=True`` becomes a tensor or None
        return getattr(module, name) is not None if isinstance(param.default, bool) else _MISSING
    return module.__dict__.get(name, _MISSING)


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def _build(cls: type, kwargs: dict) -> Optional[torch.nn.Module]:
    try:
        with torch.device("meta"):
            return cls(**kwargs)
    except Exception:
        return None


def _check_rebuild(target: str, module: torch.nn.Module, kwargs: dict) -> None:
    """Build the layer from ``kwargs`` (on the meta device) and compare it with the original."""
    rebuilt = _build(type(module), kwargs)
    if rebuilt is None:
        raise UnsupportedModelError(f"module {target!r} ({type(module).__name__}) could not be rebuilt from "
                                    f"its constructor arguments {kwargs}")
    if _signature(rebuilt) != _signature(module) or repr(rebuilt) != repr(module):
        raise UnsupportedModelError(f"module {target!r} ({type(module).__name__}) rebuilt from {kwargs} "
                                    f"differs from the original ({module!r} vs {rebuilt!r})")


def _signature(module: torch.nn.Module) -> tuple:
    state = tuple((k, tuple(v.shape)) for k, v in module.state_dict(keep_vars=True).items())
    plain = tuple(sorted((k, repr(v)) for k, v in module.__dict__.items()
                         if not k.startswith("_") and k != "training" and _is_literal(v)))
    return state, plain


def _is_literal(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_literal(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str, torch.dtype))


def _literal(where: str, value: Any) -> str:
    """Python source for a constructor argument: numbers, strings, tuples, dtypes."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"float({str(value)!r})"
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, (list, tuple)):
        items = [_literal(where, v) for v in value]
        if isinstance(value, list):
            return "[" + ", ".join(items) + "]"
        return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    raise UnsupportedModelError(f"{where} = {value!r} ({type(value).__name__}) cannot be written as source")


_HELPERS = '''


def _owner(root, path):
    """The module that holds ``root.<path>`` (plain containers created on the way) and the last name."""
    *parents, name = path.split(".")
    for part in parents:
        if not hasattr(root, part):
            root.add_module(part, torch.nn.Module())
        root = getattr(root, part)
    return root, name


def _install(root, path, value):
    owner, name = _owner(root, path)
    if isinstance(value, torch.nn.Module):
        owner.add_module(name, value)
    else:
        setattr(owner, name, value)


def _param(root, path, shape, dtype, requires_grad):
    owner, name = _owner(root, path)
    owner.register_parameter(name, torch.nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad))


def _buffer(root, path, shape, dtype, persistent):
    owner, name = _owner(root, path)
    owner.register_buffer(name, torch.empty(shape, dtype=dtype), persistent=persistent)


'''

_LOADER = '''

def load(path=None, device="cpu"):
    """Build a {cls} and fill it from a safetensors file (default: model.safetensors beside this file)."""
    import json
    import os
    from safetensors import safe_open
    from safetensors.torch import load_file
    path = path or os.path.join(os.path.dirname(os.path.abspath(__file__)), "model.safetensors")
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {{}}
    state = load_file(path, device=str(device))
    saved = json.loads(metadata.get("fxprune", "{{}}"))
    aliases, non_persistent = saved.get("aliases", {{}}), saved.get("non_persistent", [])
    with torch.device("meta"):
        model = {cls}()
    extra = {{key: state.pop(key) for key in non_persistent}}
    state.update({{alias: state[key] for alias, key in aliases.items()}})
    model.load_state_dict(state, strict=True, assign=True)
    for path_, value in extra.items():
        owner, name = _owner(model, path_)
        owner.register_buffer(name, value, persistent=False)
    for alias, key in aliases.items():  # re-tie: one tensor object under both names
        owner, name = _owner(model, alias)
        source, source_name = _owner(model, key)
        target = getattr(source, source_name)
        (owner._parameters if name in owner._parameters else owner._buffers)[name] = target
    left = [k for k, v in list(model.named_parameters()) + list(model.named_buffers()) if v.is_meta]
    if left:
        raise RuntimeError(f"{{path}} has no data for {{left}}")
    return model


if __name__ == "__main__":
    model = load()
    print(model)
    print(sum(p.numel() for p in model.parameters()), "parameters")
'''


def _readme(has_plan: bool) -> str:
    plan = ("* `plan.json` — which channels were kept (JSON); `fxprune.load(dir, fresh_model, inputs)` "
            "re-applies it to a fresh model and loads the tensors, with every name and shape checked.\n"
            if has_plan else "")
    return (f"# A model pruned by fxprune\n\n"
            f"* `module.py` — the pruned model as plain PyTorch source (class `{CLASS_NAME}`).\n"
            f"* `model.safetensors` — its tensors (no pickle).\n{plan}\n"
            f"Load it with torch and safetensors only (fxprune is not needed):\n\n"
            f"```python\nimport sys; sys.path.insert(0, \"path/to/this/directory\")\nimport module\n"
            f"model = module.load()          # or module.load(\"model.safetensors\", device=\"cuda\")\n```\n")


# --- load ----------------------------------------------------------------------------------------------
def load(directory: Union[str, os.PathLike], model: Any, example_inputs: Any) -> Any:
    """Rebuild a saved result: apply ``plan.json`` to ``model`` (a fresh copy), then load the tensors.

    The plan must match the strict plan schema, the model must accept it, and ``model.safetensors`` must
    hold exactly the pruned model's tensor names, shapes and dtypes; anything else raises
    :class:`~fxprune.errors.PlanMismatchError` or :class:`~fxprune.errors.UnsafeFileError` before
    anything is loaded. ``model`` is not modified.
    """
    root = Path(directory)
    plan = read_plan(root / PLAN_FILE)
    state, non_persistent = read_safetensors(root / TENSORS_FILE)
    applied = apply(model, plan, example_inputs)
    gm = applied.graph_module
    _check_state(gm, state, non_persistent, root / TENSORS_FILE)
    with torch.no_grad():
        gm.load_state_dict({k: v for k, v in state.items() if k not in non_persistent}, strict=True)
        for key in non_persistent:
            gm.get_buffer(key).copy_(state[key])
    return PruneResult(gm, applied.plan, applied.analysis, applied.drop, applied.example_inputs)


def _check_state(gm: torch.nn.Module, state: Mapping[str, torch.Tensor], non_persistent: list, path: Path) -> None:
    expected = {k: v for k, v in gm.state_dict().items()}
    buffers = dict(gm.named_buffers())
    expected.update({k: buffers[k] for k in buffers if k not in expected})
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise PlanMismatchError(f"{path} does not match the pruned model: missing {missing[:3]}, "
                                f"unexpected {unexpected[:3]}")
    for key, want in expected.items():
        got = state[key]
        if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
            raise PlanMismatchError(f"{path}: tensor {key!r} is {got.dtype} {list(got.shape)}, the pruned model "
                                    f"expects {want.dtype} {list(want.shape)}")


def read_safetensors(path: Union[str, os.PathLike]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A safetensors file's tensors (aliases filled in) and its non-persistent buffer names; never unpickles."""
    from safetensors import SafetensorError, safe_open
    path = Path(path)
    _refuse_pickle(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UnsafeFileError(f"{path} is not a valid safetensors file: {exc}") from exc
    saved = _json_meta(path, metadata)
    aliases, non_persistent = saved.get("aliases", {}), saved.get("non_persistent", [])
    if not isinstance(aliases, dict) or not isinstance(non_persistent, list):
        raise UnsafeFileError(f"{path}: metadata {_META!r} must hold an 'aliases' object and a "
                              f"'non_persistent' list")
    for alias, key in aliases.items():
        if not isinstance(key, str) or key not in state:
            raise UnsafeFileError(f"{path}: alias {alias!r} names a tensor the file lacks ({key!r})")
        state[str(alias)] = state[key]
    if not all(isinstance(k, str) and k in state for k in non_persistent):
        raise UnsafeFileError(f"{path}: non-persistent buffer list names tensors the file lacks")
    return state, [str(k) for k in non_persistent]


def _refuse_pickle(path: Path) -> None:
    check_safetensors(path)  # by structure: a header length whose low byte is 0x80 is not a pickle


def _json_meta(path: Path, metadata: Mapping[str, str]) -> dict:
    try:
        value = json.loads(metadata.get(_META, "{}"))
    except (ValueError, RecursionError) as exc:
        raise UnsafeFileError(f"{path}: metadata {_META!r} is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise UnsafeFileError(f"{path}: metadata {_META!r} must be a JSON object")
    return value


# --- the plan ---------------------------------------------------------------------------------------------
def read_plan(path: Union[str, os.PathLike]) -> Plan:
    """Parse ``plan.json``; ``Plan.from_json`` refuses anything outside the plan's schema."""
    path = Path(path)
    data = read_bounded(path, what="plan")  # /dev/zero or a FIFO is refused, not read forever
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnsafeFileError(f"cannot read plan {path}: {exc}") from exc
    return parse_plan(text, str(path))


def parse_plan(text: str, where: str = "plan") -> Plan:
    try:
        return Plan.from_json(text)
    except UnsafeFileError as exc:
        raise UnsafeFileError(f"{where}: {exc}") from exc


# --- .pt2 (torch.export.save) ---------------------------------------------------------------------------
def load_pt2(path: Union[str, os.PathLike]) -> torch.export.ExportedProgram:
    """``torch.export.load`` after refusing every archive entry that would be unpickled.

    A ``.pt2`` written by ``torch.export.save`` for an ordinary model stores its weights as raw bytes
    and its example inputs as a ``torch.save`` file that loads with ``weights_only=True``; such a file
    passes. Pickled weights or constants, custom or opaque objects, example inputs that need the full
    unpickler, and the legacy (pre-2.8) layout are refused with :class:`~fxprune.errors.UnsafeFileError`.
    """
    path = Path(path)
    check_pt2(path)
    try:
        program = torch.export.load(str(path))
        program.module()  # an edited module_call_graph loads, then fails here (found by the file fuzzer)
        return program
    except Exception as exc:  # a malformed archive that passed the checks: still not a program
        raise UnsafeFileError(f"{path} passed fxprune's checks but torch.export.load rejects it: "
                              f"{type(exc).__name__}: {str(exc).strip()[:200]}") from exc


def check_pt2(path: Path) -> None:
    """Refuse a ``.pt2`` that ``torch.export.load`` would unpickle or evaluate code from. Its entries are
    read with torch's own zip reader (duplicated names refused, see :mod:`fxprune.safe_files`), so the
    checks see the bytes torch will load."""
    records = pt2_records(path)
    if records.get("archive_format") != b"pt2":
        raise UnsafeFileError(f"{path} is not a .pt2 archive written by torch.export.save (torch >= 2.8)")
    if "version" in records or any(n.startswith("serialized_") for n in records):
        raise UnsafeFileError(f"{path} holds the legacy export layout, which torch.export.load unpickles; "
                              f"refusing")
    for name, data in records.items():
        _check_pt2_entry(path, name, data)


def _payloads(path: Path, name: str, data: bytes) -> dict:
    config = check_pt2_json(path, name, data)
    config = config.get("config") if isinstance(config, dict) else None
    if not isinstance(config, dict) or not all(isinstance(v, dict) for v in config.values()):
        raise UnsafeFileError(f"{path}: {name} is not a payload config")
    return config


def _check_pt2_entry(path: Path, name: str, data: bytes) -> None:
    if name.startswith("data/") and name.endswith("_config.json"):
        for key, payload in _payloads(path, name, data).items():
            if payload.get("use_pickle") is not False or \
                    not str(payload.get("path_name", "")).startswith(("weight_", "tensor_")):
                raise UnsafeFileError(f"{path}: {name} stores {key!r} as a pickled object; refusing to load")
    elif name.endswith(".json"):
        check_pt2_json(path, name, data)  # model.json: the SymInt expressions torch sympifies
    elif name.startswith("data/sample_inputs/"):
        try:
            torch_load_weights_only(data)
        except Exception as exc:
            raise UnsafeFileError(f"{path}: {name} needs the full unpickler ({type(exc).__name__}); "
                                  f"torch.export.load would fall back to it; refusing") from exc
    elif name.startswith(("data/weights/", "data/constants/")) and name.endswith(".pt"):
        raise UnsafeFileError(f"{path}: {name} is a legacy pickled payload; refusing to load")
    elif name.startswith("data/aotinductor/"):
        raise UnsafeFileError(f"{path}: {name} is a compiled AOTInductor artifact; fxprune loads graphs only")
