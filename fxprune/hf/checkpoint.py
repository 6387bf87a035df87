"""Prune a checkpoint bigger than memory, disk to disk: :func:`prune_checkpoint`.

>>> from fxprune.hf import prune_checkpoint
>>> report = prune_checkpoint("llama-8b/", "llama-8b-p25/", sparsity=0.25, criterion="l2")  # doctest: +SKIP
>>> report["bytes_written"] < report["bytes_read"]                                          # doctest: +SKIP
True

The structure comes from ``config.json`` alone: the model is built on the ``meta`` device (no weights
in memory), exported and analysed as :mod:`fxprune.hf` does. Scores read the tensors one at a time from
the safetensors shards (memory-mapped), so the data-free criteria (:data:`STREAMING_CRITERIA`) see the
same numbers as in memory and the plan is the one :func:`fxprune.hf.prune` makes. Then each *unit* (a
decoder layer, or one tensor outside the layers) is read, sliced per the plan and written as its own
shard; ``model.safetensors.index.json``, the rewritten ``config.json``, ``plan.json``, the report and
the source's other files (tokenizer, generation config) complete the directory.

Outputs appear whole or not at all: everything is written into a hidden directory beside ``out_dir``
(``.NAME.fxprune-partial``) that becomes ``out_dir`` in one rename. A run that stops (killed, out of
disk) leaves that directory; the same call again reads its ``plan.json`` and the finished units from
its journal and continues with the next unit. A call with other arguments or a changed source starts
over. Peak memory is one unit's tensors, not the model.

With ``calibration=`` the activation criteria (``wanda``, ``flap``, ``activation``) and
``recover=("reconstruct",)`` run layer by layer from disk (:mod:`fxprune.hf.layerwise`): the
calibration batches walk the meta-device graph with each weight read from the shards as its node
runs, and the result equals :func:`fxprune.hf.prune`'s with the same options and batches. Under
``torch.distributed`` the batches are split across ranks, the statistics all-reduced, and rank 0
writes; ``device="cuda"`` runs the layers on the GPU.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch

from fxprune.core.analysis import Analysis
from fxprune.core.plan import Plan
from fxprune.core.repeat import PROXY_BLOCKS, repeat_blocks
from fxprune.core.select import check_patterns
from fxprune.errors import CheckpointError, ConfigMismatchError, InvalidOptionError, UnsupportedModelError
from fxprune.hf import layerwise
from fxprune.options import PruneOptions, Sparsity, check_route, route_fields

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
REPORT = "fxprune-checkpoint.json"
PLAN = "plan.json"
#: Data-free criteria: each reads one tensor at a time, so a score needs nothing else in memory.
STREAMING_CRITERIA = ("l1", "l2", "fpgm", "group_magnitude", "bn_scale", "random")
#: Files that hold weights (never copied to the output: their tensors are rewritten).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5")
#: model_type prefixes whose forward reads hidden_size as a number (Gemma scales its embeddings by
#: sqrt(hidden_size)): in memory fxprune.hf finds out by running the model; from disk nothing runs.
HIDDEN_SIZE_READERS = ("gemma",)
_JOURNAL = "journal.jsonl"
_RUN = "run.json"
#: Bytes of a tensor read at once when it is read to be sliced (:meth:`Shards.read_sliced`).
READ_CHUNK_BYTES = 64 << 20
_MARGIN = 64 << 20  # bytes of disk kept free beyond the output's size (index, config, file-system slack)


# --- the source: tensors read one at a time ----------------------------------------------------------
class Shards:
    """The tensors of a checkpoint directory, read one at a time straight from their shards.

    A tensor is read with one ``readinto`` at the offset the shard's header gives, into a tensor of
    its own: no memory map stays open (mapped pages count in the process' resident memory until it
    is closed), so the peak is the tensor, whatever the shard's size.

    >>> shards = Shards.open("llama/")                       # doctest: +SKIP
    >>> shards.shapes["model.embed_tokens.weight"]           # doctest: +SKIP
    (32000, 4096)
    """

    def __init__(self, directory: Path, files: Mapping[str, str], entries: Mapping[str, "Entry"]):
        self.directory, self.files = directory, dict(files)
        self.entries = dict(entries)
        self.shapes = {k: e.shape for k, e in entries.items()}
        self.dtypes = {k: e.dtype for k, e in entries.items()}
        self.bytes_read = 0

    @classmethod
    def open(cls, directory: Any) -> "Shards":
        directory = Path(directory)
        files = _weight_map(directory)
        entries: dict[str, Entry] = {}
        for name in sorted(set(files.values())) or [SINGLE]:
            header = _header(directory / name)
            entries.update(header)
            for key in (k for k, f in files.items() if f == name and k not in header):
                raise CheckpointError(f"{INDEX} names tensor {key!r} in {name}, which that shard does not hold")
            files.update({k: name for k in header if k not in files})
        for key, entry in entries.items():
            if _dtype_of(entry.dtype, key).itemsize * _numel(entry.shape) != entry.end - entry.begin:
                raise CheckpointError(f"tensor {key!r} in {files[key]}: its byte range does not hold a "
                                      f"{entry.dtype} tensor of shape {list(entry.shape)}")
        return cls(directory, files, entries)

    def read(self, key: str) -> torch.Tensor:
        """One tensor, read from its shard into new memory."""
        entry = self.entries[key]
        tensor = torch.empty(entry.shape, dtype=_dtype_of(entry.dtype, key))
        with open(self.directory / self.files[key], "rb") as f:
            f.seek(entry.begin)
            self._fill(f, tensor, key)
        return tensor

    def _fill(self, f: Any, tensor: torch.Tensor, key: str) -> None:
        """Read ``tensor``'s bytes from ``f``'s position; a short read names the shard and the tensor."""
        view = tensor.reshape(-1).view(torch.uint8).numpy()
        got = f.readinto(view) if view.size else 0
        if got != view.size:
            raise CheckpointError(f"shard {self.files[key]} ended while reading {key!r} (truncated while read?)")
        self.bytes_read += got

    def read_sliced(self, key: str, kept: Mapping[int, Sequence[int]]) -> torch.Tensor:
        """``sliced(self.read(key), kept)`` without the whole tensor in memory: read in chunks of rows
        (:data:`READ_CHUNK_BYTES`), each sliced into the output (an embedding's 1 GB is never held
        beside its slice). Kept rows out of order, or a scalar, fall back to one read."""
        entry, rows = self.entries[key], torch.tensor(list(kept.get(0, ())), dtype=torch.long)
        shape, dtype = entry.shape, _dtype_of(entry.dtype, key)
        if not shape or not kept or (0 in kept and bool((rows[1:] <= rows[:-1]).any())):
            return sliced(self.read(key), kept)
        row_bytes = dtype.itemsize * _numel(shape[1:])
        step = max(1, READ_CHUNK_BYTES // max(1, row_bytes))
        rest = {d: v for d, v in kept.items() if d != 0}
        out, filled = torch.empty(sliced_shape(shape, kept), dtype=dtype), 0
        with open(self.directory / self.files[key], "rb") as f:
            f.seek(entry.begin)
            for start in range(0, shape[0], step):
                chunk = torch.empty((min(step, shape[0] - start), *shape[1:]), dtype=dtype)
                self._fill(f, chunk, key)
                if 0 in kept:
                    inside = rows[(rows >= start) & (rows < start + chunk.shape[0])]
                    chunk = chunk.index_select(0, inside - start)
                piece = sliced(chunk, rest)
                out[filled:filled + piece.shape[0]] = piece
                filled += piece.shape[0]
        return out

    def nbytes(self, key: str, shape: Optional[Sequence[int]] = None) -> int:
        shape = self.shapes[key] if shape is None else shape
        return _dtype_of(self.dtypes[key], key).itemsize * _numel(shape)


@dataclass(frozen=True)
class Entry:
    """One tensor of a shard: shape, safetensors dtype, byte range in the file."""

    shape: tuple[int, ...]
    dtype: str
    begin: int
    end: int


def _dtype_of(name: str, key: str) -> torch.dtype:
    if name not in _DTYPES:
        raise CheckpointError(f"tensor {key!r} has dtype {name}, which fxprune does not read")
    return _DTYPES[name]


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _numel(shape: Sequence[int]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def _weight_map(directory: Path) -> dict[str, str]:
    """{tensor: shard file} from the index, or every tensor of ``model.safetensors``."""
    index = directory / INDEX
    if index.is_file():
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            weight_map = data["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map is not {tensor: file}")
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a safetensors index: {type(exc).__name__}: {exc}") from exc
        for name in sorted(set(weight_map.values())):
            if "/" in name or "\\" in name or name.startswith("."):
                raise CheckpointError(f"{index} names shard {name!r} outside the directory")
            if not (directory / name).is_file():
                raise CheckpointError(f"shard {name} named by {index} is missing")
        return dict(weight_map)
    if (directory / SINGLE).is_file():
        return {}  # filled from the shard's header
    raise CheckpointError(f"{directory} holds neither {INDEX} nor {SINGLE} (fxprune reads safetensors only)")


def _header(path: Path) -> dict[str, Entry]:
    """Every tensor of one shard, from its header; a truncated shard is refused here."""
    if not path.is_file():
        raise CheckpointError(f"shard {path} is missing")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if length <= 0 or 8 + length > size:
                raise ValueError(f"its header claims {length} bytes, the file has {size}")
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        entries = {k: Entry(tuple(int(s) for s in v["shape"]), str(v["dtype"]), 8 + length + int(v["data_offsets"][0]),
                            8 + length + int(v["data_offsets"][1])) for k, v in header.items()}
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise CheckpointError(f"shard {path} is not a readable safetensors file: {exc}") from exc
    end = max((e.end for e in entries.values()), default=8 + length)
    if end != size:
        raise CheckpointError(f"shard {path} is truncated or padded: its header needs {end} bytes, the file "
                              f"has {size}")
    return entries


# --- the structure: the model on the meta device -------------------------------------------------------
def meta_model(directory: Any) -> Any:
    """The model ``config.json`` describes, built on the ``meta`` device: shapes, no weights.

    >>> model = meta_model("llama/")          # doctest: +SKIP
    >>> model.model.embed_tokens.weight.device
    device(type='meta')
    """
    from fxprune.hf.in_memory import _transformers
    transformers = _transformers()
    from transformers.initialization import no_init_weights
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory} has no config.json")
    config = transformers.AutoConfig.from_pretrained(str(directory))
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        raise CheckpointError(f"{directory / 'config.json'} names no transformers class in 'architectures' "
                              f"(got {names})")
    dtype = _dtype(config)
    with torch.device("meta"), no_init_weights():
        model = cls._from_config(config, dtype=dtype)
    model.tie_weights()  # no_init_weights also skips the tying that from_pretrained does
    return model.eval()


def _dtype(config: Any) -> torch.dtype:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, value) if isinstance(value, str) else value


def tied_names(model: Any) -> dict[str, str]:
    """{state_dict key: the first key sharing its tensor} for tied weights (an LM head tied to the
    embedding is stored once)."""
    first: dict[int, str] = {}
    out = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        owner = first.setdefault(id(tensor), key)
        if owner != key:
            out[key] = owner
    return out


def check_shapes(model: Any, shards: Shards) -> None:
    """Every tensor the config builds is in a shard with its shape, and no shard holds another."""
    ties = tied_names(model)
    built = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key, shape in built.items():
        stored = key if key in shards.shapes else ties.get(key)
        if stored not in shards.shapes:
            raise CheckpointError(f"the config builds tensor {key!r}, which no shard of {shards.directory} holds")
        if shards.shapes[stored] != shape:
            raise CheckpointError(f"tensor {stored!r} in {shards.files[stored]} has shape "
                                  f"{list(shards.shapes[stored])}, the config builds {list(shape)}")
    extra = sorted(set(shards.shapes) - set(built))
    if extra:
        raise CheckpointError(f"{shards.files[extra[0]]} holds {extra[0]!r}, which the config's "
                              f"{type(model).__name__} does not have")


def analyse_structure(model: Any, split_axis: str = "outer", blocks_once: bool = True) -> Analysis:
    """Export the meta-device model (a dynamic batch and sequence, no KV cache) and analyse it; with
    ``blocks_once``, a model of more than three identical decoder layers is analysed through a copy
    with three (:func:`fxprune.core.repeat.repeat_blocks`): the cost of three layers, not of all."""
    prefix = repeated_prefix(model) if blocks_once else None
    if prefix is None:
        return _analyse(model, split_axis)
    proxy = _analyse(_with_layers(model, PROXY_BLOCKS), split_axis)
    try:
        return repeat_blocks(proxy, prefix, int(model.config.num_hidden_layers))
    except UnsupportedModelError:  # a layer's channels reach another's: analyse them all
        return _analyse(model, split_axis)


def _analyse(model: Any, split_axis: str) -> Analysis:
    from fxprune.api import analyze
    from fxprune.core.capture import AUTO, export
    from fxprune.hf.in_memory import _dynamic_shapes, _without_cache
    length = min(16, int(getattr(model.config, "max_position_embeddings", 16) or 16))
    ids = torch.zeros(2, length, dtype=torch.long)
    program = export(_without_cache(model), (ids,), _dynamic_shapes(model, (ids,), AUTO))
    return analyze(program, (ids,), "export", split_axis=split_axis)


def repeated_prefix(model: Any) -> Optional[str]:
    """``"model.layers."`` where the model's ``num_hidden_layers`` (> 3) numbered blocks hold the same
    tensors (names and shapes, up to the index) and no config list differs per layer; else None."""
    layers = getattr(model.config, "num_hidden_layers", None)
    if not isinstance(layers, int) or layers <= PROXY_BLOCKS or _per_layer_lists(model.config, layers):
        return None
    by_prefix: dict[str, dict[int, set]] = {}
    for key, tensor in model.state_dict().items():
        match = _BLOCK.match(key)
        if match:
            rest = key[match.end():]
            by_prefix.setdefault(match.group(1), {}).setdefault(int(match.group(2)), set()).add(
                (rest, tuple(tensor.shape)))
    for prefix, blocks in by_prefix.items():
        if sorted(blocks) == list(range(layers)) and all(b == blocks[0] for b in blocks.values()):
            return prefix
    return None


def _per_layer_lists(config: Any, layers: int) -> bool:
    """Whether the config sets something per layer (Gemma's sliding-window pattern, mixed layer types)."""
    return any(isinstance(v, (list, tuple)) and len(v) == layers and len(set(map(str, v))) > 1
               for v in config.to_dict().values())


def _with_layers(model: Any, layers: int) -> Any:
    """The same class on the meta device with ``layers`` decoder layers (per-layer lists cut to match)."""
    from transformers.initialization import no_init_weights
    config = copy.deepcopy(model.config)
    total = config.num_hidden_layers
    for name, value in config.to_dict().items():
        if isinstance(value, list) and len(value) == total:
            setattr(config, name, value[:layers])
    config.num_hidden_layers = layers
    with torch.device("meta"), no_init_weights():
        proxy = type(model)._from_config(config, dtype=model.dtype)
    proxy.tie_weights()
    return proxy.eval()


@dataclass(frozen=True)
class OnDisk(Analysis):
    """An analysis of the meta-device model whose tensors are read from the shards, one at a time,
    when a criterion asks for them (what ``score_groups`` reads through ``analysis.tensor``)."""

    shards: Any = None
    ties: Mapping[str, str] = dataclasses.field(default_factory=dict)
    structure: Any = None
    """The analysis read for the tensors' kinds (a parameter or a buffer): its ``tensor`` is a meta one."""

    def tensor(self, key: str) -> torch.Tensor:
        meta = self.structure.tensor(key)
        stored = key if key in self.shards.shapes else self.ties.get(self.canonical(key), self.canonical(key))
        value = self.shards.read(stored)
        return torch.nn.Parameter(value, requires_grad=False) if isinstance(meta, torch.nn.Parameter) else value


def on_disk(analysis: Analysis, shards: Shards, ties: Mapping[str, str]) -> OnDisk:
    fields = {f.name: getattr(analysis, f.name) for f in dataclasses.fields(Analysis)}
    return OnDisk(**fields, shards=shards, ties=dict(ties), structure=analysis)


# --- the plan ----------------------------------------------------------------------------------------
def fingerprint(options: PruneOptions, hf_compatible: bool, layer_indices: str, directory: Path,
                files: Sequence[str], data: str = "") -> str:
    """The options, the source's files (name, size, modification time) and ``data`` (the calibration
    batches' digest and the recovery steps): equal means the same run."""
    stats = [(n, (directory / n).stat().st_size, (directory / n).stat().st_mtime_ns)
             for n in sorted({*files, "config.json"})]
    text = json.dumps([options.to_dict(), hf_compatible, layer_indices, stats, data], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def make_checkpoint_plan(model: Any, analysis: Analysis, scored: "OnDisk", options: PruneOptions,
                         hf_compatible: bool = True, layer_indices: str = "own",
                         evidence: Any = None) -> tuple[Plan, Any]:
    """The plan and the pruned config, made as :func:`fxprune.hf.prune_with_result` makes them
    (``evidence``: a data-aware criterion's statistics, gathered from disk by :mod:`fxprune.hf.layerwise`)."""
    from fxprune import stages
    from fxprune.hf import in_memory as hf
    from fxprune.hf import policy as hf_policy
    widths, module_sparsity = hf_policy.split_width_ratios(options.sparsity)
    selection = options.replace(sparsity=module_sparsity)
    check_patterns(analysis.groups, selection)
    attention = hf._attention(model)
    hf_policy.check_width_ratios(widths, hf_policy.kinds(analysis, model.config, attention))
    if evidence is None:
        scores = stages.score(scored, options)
    else:
        from fxprune.data.criteria import score_groups
        scores = score_groups(scored, scored.groups, options.criterion, options.reduce, options.seed, evidence=evidence)
    notes: dict[str, str] = {}
    drop = hf._select(analysis, scores, selection, widths=widths, config=model.config,
                      hf_compatible=hf_compatible, layer_indices=layer_indices, attention=attention,
                      whole_fields=_whole_fields(model), notes=notes)
    options = options.replace(hf={"hf_compatible": hf_compatible, "layer_indices": layer_indices,
                                  "constraints": notes})
    plan = stages.make_plan(analysis, drop, options)
    config, changes = hf.new_config(model, analysis, drop, attention)
    config.fxprune = hf._record(plan, changes, notes, None)
    return plan, config


def _whole_fields(model: Any) -> dict[str, str]:
    from fxprune.hf import policy as hf_policy
    kind = str(getattr(model.config, "model_type", ""))
    if kind.startswith(HIDDEN_SIZE_READERS):
        return {hf_policy.HIDDEN: f"kept whole: {kind}'s forward reads hidden_size as a number (Gemma "
                                  f"scales its embeddings by sqrt(hidden_size))"}
    return {}


# --- the units: what one shard holds ------------------------------------------------------------------
@dataclass(frozen=True)
class Unit:
    """The tensors written together as one shard: a decoder layer, or one tensor outside the layers."""

    name: str
    keys: tuple[str, ...]
    file: str


_BLOCK = re.compile(r"^(.*?\.)(\d+)\.")


def units(keys: Sequence[str]) -> list[Unit]:
    """Consecutive keys of one numbered block (``model.layers.7.``) form a unit; any other key is one.

    >>> [u.name for u in units(["e.weight", "layers.0.a", "layers.0.b", "layers.1.a", "norm.weight"])]
    ['e.weight', 'layers.0', 'layers.1', 'norm.weight']
    """
    runs: list[tuple[str, list[str]]] = []
    for key in keys:
        match = _BLOCK.match(key)
        name = match.group(1) + match.group(2) if match else key
        if runs and runs[-1][0] == name and match:
            runs[-1][1].append(key)
        else:
            runs.append((name, [key]))
    total = len(runs)
    return [Unit(name, tuple(ks), f"model-{i + 1:05d}-of-{total:05d}.safetensors") for i, (name, ks) in enumerate(runs)]


def kept_of(plan: Plan, key: str, aliases: Mapping[str, str]) -> Mapping[int, Sequence[int]]:
    return plan.kept_indices.get(key) or plan.kept_indices.get(aliases.get(key, key), {})


def sliced_shape(shape: Sequence[int], kept: Mapping[int, Sequence[int]]) -> tuple[int, ...]:
    return tuple(len(kept[d]) if d in kept else s for d, s in enumerate(shape))


def sliced(tensor: torch.Tensor, kept: Mapping[int, Sequence[int]]) -> torch.Tensor:
    """``tensor`` with the kept indices of each dim selected (a new tensor; the read one is dropped)."""
    for dim, index in sorted(kept.items()):
        tensor = tensor.index_select(int(dim), torch.tensor(list(index), dtype=torch.long))
    return tensor.contiguous()


# --- the run -----------------------------------------------------------------------------------------
def prune_checkpoint(src_dir: Any, out_dir: Any, sparsity: Optional[Sparsity] = None,
                     criterion: Optional[str] = None, *, hf_compatible: bool = True, layer_indices: str = "own",
                     options: Optional[PruneOptions] = None, blocks_once: bool = True, progress: bool = False,
                     calibration: Any = None, recover: Any = (), device: Any = "cpu",
                     spill_bytes: Optional[int] = None, **option_fields: Any) -> dict:
    """Prune the safetensors checkpoint in ``src_dir`` into ``out_dir``, one unit at a time.

    ``out_dir`` loads with ``AutoModelForCausalLM.from_pretrained`` (or the config's class) and equals,
    tensor for tensor, what :func:`fxprune.hf.prune` returns for the same options. Returns the report
    also written to ``out_dir/fxprune-checkpoint.json`` (bytes read and written per unit, timings).
    A rerun after an interruption continues from the last finished unit.

    Args:
        src_dir: a directory ``save_pretrained`` wrote (``config.json``, safetensors shards).
        out_dir: the new directory; it must not exist (or be empty) and must not be inside ``src_dir``.
        sparsity, criterion, hf_compatible, layer_indices, options, option_fields: as in
            :func:`fxprune.hf.prune` (the options of :class:`~fxprune.options.PruneOptions`);
            ``criterion`` one of :data:`STREAMING_CRITERIA`, or with ``calibration`` an activation
            criterion (default then ``"energy"``, as in memory).
        blocks_once: analyse identical decoder layers once (:func:`analyse_structure`); False analyses
            every layer (the same plan, slower). The data path analyses every layer (its walk runs the
            whole graph).
        progress: a bar over the bytes read, with the unit being written and the bytes written.
        calibration, recover: as in :func:`fxprune.hf.prune` (token batches; ``"reconstruct"``, ridge 1
            by default), run layer by layer from disk (:mod:`fxprune.hf.layerwise`); under
            ``torch.distributed`` each rank passes the same batches and runs its share of them.
        device: where the layers run on the data path (``"cpu"``, ``"cuda"``); an unavailable one is
            an ``InvalidOptionError``.
        spill_bytes: on the data path, carried activations of at least this many bytes (per batch)
            move to memory-mapped files beside ``out_dir`` (default None: kept in memory).
    """
    from fxprune.hf import in_memory as hf
    started = time.perf_counter()
    src, out = Path(src_dir).resolve(), Path(out_dir).resolve()
    if criterion is None and calibration is not None and options is None:
        criterion = hf.CALIBRATED_CRITERION
    options = hf.hf_options(options, {"sparsity": sparsity, "criterion": criterion, **option_fields}, hf_compatible)
    steps, step_options = layerwise.recovery_of(recover)
    chosen = layerwise.check_device(device)
    _check_options(options, layer_indices, calibration, steps)
    _check_paths(src, out)
    shards = Shards.open(src)
    partial = out.parent / f".{out.name}.fxprune-partial"
    model = meta_model(src)
    check_shapes(model, shards)
    if calibration is not None:
        run = _DataRun(calibration, steps, step_options, chosen, spill_bytes, progress)
        return _prune_with_data(src, out, partial, shards, model, options, hf_compatible, layer_indices, run,
                                started)
    if layerwise.rank_and_world()[1] > 1:  # nothing to split without data: rank 0 alone writes
        text = json.dumps(_prune_data_free(src, out, partial, shards, model, options, hf_compatible, layer_indices,
                                           blocks_once, progress, started)) if layerwise.rank_and_world()[0] == 0 \
            else None
        layerwise.barrier()
        return json.loads(layerwise.broadcast_text(text, chosen))
    return _prune_data_free(src, out, partial, shards, model, options, hf_compatible, layer_indices, blocks_once,
                            progress, started)


def _prune_data_free(src: Path, out: Path, partial: Path, shards: Shards, model: Any, options: PruneOptions,
                     hf_compatible: bool, layer_indices: str, blocks_once: bool, progress: bool,
                     started: float) -> dict:
    run_id = fingerprint(options, hf_compatible, layer_indices, src, list(shards.files.values()))
    timings: dict[str, float] = {}
    plan, resumed = _resumed_plan(partial, run_id)
    ties = tied_names(model)
    work = units([k for k in model.state_dict() if k not in ties])
    done = _journal(partial) if resumed else {}
    if plan is None:
        plan, config = _plan(model, shards, ties, options, hf_compatible, layer_indices, timings, blocks_once)
        _check_disk(shards, plan, work, ties, out.parent, done)
        _start(partial, run_id, plan, config, timings)
    else:
        _check_disk(shards, plan, work, ties, partial, done)
    shards.bytes_read = 0
    tic = time.perf_counter()
    records = list(_write_units(shards, plan, work, ties, partial, done, progress))
    timings["write_s"] = time.perf_counter() - tic
    return _finish(src, partial, out, work, records, timings, started, run_id)


def _check_options(options: PruneOptions, layer_indices: str, calibration: Any = None,
                   steps: Sequence[str] = ()) -> None:
    from fxprune.data.criteria import ACTIVATION_CRITERIA
    from fxprune.hf import structure
    instead = "use fxprune.hf.prune on a model that fits in memory"
    check_route(options, "prune_checkpoint (disk to disk)", dict.fromkeys(route_fields(), instead))
    wanted = structure.split(options.sparsity)
    if wanted.any:
        raise InvalidOptionError(f"prune_checkpoint (disk to disk) prunes widths only, not whole layers or "
                                 f"experts (sparsity {dict(options.sparsity)!r}): {instead}")
    if calibration is not None and options.criterion not in STREAMING_CRITERIA + ACTIVATION_CRITERIA:
        raise InvalidOptionError(
            f"prune_checkpoint with calibration scores with {STREAMING_CRITERIA + ACTIVATION_CRITERIA}, got "
            f"{options.criterion!r}: a gradient criterion needs a backward pass through the whole model, "
            f"which the layer-by-layer path does not do ({instead})")
    if calibration is None and options.criterion not in STREAMING_CRITERIA:
        raise InvalidOptionError(
            f"prune_checkpoint scores with the data-free criteria {STREAMING_CRITERIA}, got "
            f"{options.criterion!r}: a data-aware criterion reads activations: pass calibration=<token "
            f"batches> and they run layer by layer from disk")
    if steps and calibration is None:
        from fxprune.errors import CalibrationError
        raise CalibrationError(f"recover={list(steps)} needs calibration data: pass calibration= (token batches)")
    from fxprune.hf import policy as hf_policy
    if layer_indices not in hf_policy.LAYER_INDICES:
        raise InvalidOptionError(f"layer_indices must be one of {hf_policy.LAYER_INDICES}, got {layer_indices!r}")


@dataclass(frozen=True)
class _DataRun:
    """What the data path reads besides the options (never part of a plan)."""

    calibration: Any
    steps: tuple
    step_options: Mapping[str, Mapping[str, Any]]
    device: torch.device
    spill_bytes: Optional[int]
    progress: bool


def _prune_with_data(src: Path, out: Path, partial: Path, shards: Shards, model: Any, options: PruneOptions,
                     hf_compatible: bool, layer_indices: str, run: _DataRun, started: float) -> dict:
    """The data path (:mod:`fxprune.hf.layerwise`): the statistics walk (unless resumed), the plan,
    then the reconstruct walk writing units as they finish (or the units as on the data-free path)."""
    rank, _ = layerwise.rank_and_world()
    timings: dict[str, Any] = {}
    tic = time.perf_counter()
    analysis = _analyse(model, options.split_axis)
    timings["structure_s"] = time.perf_counter() - tic
    batches, total = layerwise.rank_batches(analysis.gm, run.calibration, getattr(model.config, "vocab_size", None),
                                            run.device)
    ties = tied_names(model)
    run_id = fingerprint(options, hf_compatible, layer_indices, src, list(shards.files.values()),
                         _data_digest(batches, total, run))
    weights = layerwise.Weights(shards, ties, layerwise.computed_buffers(model), run.device)
    spill, holder = layerwise.spill_for(out.parent, run.spill_bytes)
    with holder:
        plan, config = _data_plan(model, analysis, shards, ties, options, hf_compatible, layer_indices, partial,
                                  run_id, batches, weights, spill, timings)
        return _write_with_data(src, out, partial, shards, model, analysis, plan, config, run, batches, weights,
                                spill, run_id, timings, started)


def _data_digest(batches: Sequence[tuple], total: int, run: _DataRun) -> str:
    """This rank's batches (the same split on a rerun with the same ranks) and the recovery asked."""
    digest = hashlib.sha256()
    for batch in batches:
        for x in batch:
            digest.update(x.cpu().numpy().tobytes())
    return json.dumps([digest.hexdigest(), total, list(run.steps), run.step_options], sort_keys=True, default=str)


def _data_plan(model: Any, analysis: Analysis, shards: Shards, ties: Mapping[str, str], options: PruneOptions,
               hf_compatible: bool, layer_indices: str, partial: Path, run_id: str, batches: Sequence[tuple],
               weights: "layerwise.Weights", spill: Any, timings: dict) -> tuple[Plan, Any]:
    """Rank 0's resumed plan, or the plan from the statistics walk (all ranks: the sums are
    all-reduced); rank 0's plan is the one every rank uses. ``config`` is None when resumed."""
    rank, _ = layerwise.rank_and_world()
    resumed = _resumed_plan(partial, run_id)[0] if rank == 0 else None
    text = layerwise.broadcast_text(resumed.to_json() if resumed is not None else None, weights.device)
    if text is not None:
        return Plan.from_json(text), None
    tic = time.perf_counter()
    evidence = None
    if options.criterion not in STREAMING_CRITERIA:
        evidence = layerwise.statistics(analysis, batches, weights, spill, options.criterion)
    timings["statistics_s"] = time.perf_counter() - tic
    tic = time.perf_counter()
    plan, config = make_checkpoint_plan(model, analysis, on_disk(analysis, shards, ties), options, hf_compatible,
                                        layer_indices, evidence)
    timings["score_s"] = time.perf_counter() - tic
    timings["score_bytes_read"] = shards.bytes_read
    return Plan.from_json(layerwise.broadcast_text(plan.to_json(), weights.device)), config


def _write_with_data(src: Path, out: Path, partial: Path, shards: Shards, model: Any, analysis: Analysis, plan: Plan,
                     config: Any, run: _DataRun, batches: Sequence[tuple], weights: "layerwise.Weights", spill: Any,
                     run_id: str, timings: dict, started: float) -> dict:
    from fxprune import stages
    from fxprune.data.recovery import check_ridge, reconstruct_stops
    from fxprune.hf import calibrated
    rank, _ = layerwise.rank_and_world()
    drop = stages.drop_from_plan(analysis, plan)
    stops, skipped = reconstruct_stops(analysis, drop) if run.steps else ({}, [])
    flags = calibrated.bias_flags(model, layerwise.bias_keys(stops))
    ties = tied_names(model)
    work = units(_output_keys(model, flags, ties))
    done: dict = {}
    if rank == 0:
        done = _journal(partial) if config is None else {}
        stored = [Unit(u.name, tuple(k for k in u.keys if k in shards.shapes), u.file) for u in work]  # biases: bytes
        _check_disk(shards, plan, stored, ties, out.parent if config is not None else partial, done)
        if config is not None:
            for flag, value in flags.items():
                setattr(config, flag, value)
            _start(partial, run_id, plan, config, timings)
    records: list[dict] = []
    tic = time.perf_counter()

    def write(unit: Unit, tensor_of: Any) -> None:
        if rank == 0:
            records.append(_write_unit(shards, plan, unit, ties, partial, tensor_of))

    def tensor_of(key: str) -> torch.Tensor:
        if key in shards.shapes or key in ties:
            return weights.sliced(key).cpu()
        return _zero_bias(shards, plan, ties, key)

    weights.cut = lambda key, value: sliced(value, kept_of(plan, key, ties))
    writer = layerwise.UnitWriter(work, write, tensor_of, layerwise.unit_fits(work, stops), done=set(done))
    reports: list = []
    if stops:
        pruned = stages.rewrite_graph(analysis, drop, layerwise.example_ids(batches), plan.options)
        weights.pruned_gm = pruned
        writer.release = lambda key: layerwise.dematerialise(pruned, key)
        ridge = check_ridge(run.step_options.get("reconstruct", {}).get("ridge", 1.0))
        reports = layerwise.reconstruct_walk(analysis, pruned, stops, batches, weights, writer, ridge, spill,
                                             run.progress)
    else:
        writer.flush(everything=True)
    timings["write_s"] = time.perf_counter() - tic
    timings["reconstruct"] = {"layers": len(reports), "skipped": [list(s) for s in skipped],
                              "errors": [[r.layer, round(r.before, 6), round(r.after, 6)] for r in reports]}
    resumed = [{**done[u.name], "resumed": True} for u in work if u.name in done]
    text = None
    if rank == 0:
        report = _finish(src, partial, out, work, resumed + records, timings, started, run_id)
        text = json.dumps(report)
    layerwise.barrier()
    return json.loads(layerwise.broadcast_text(text, weights.device))


def _output_keys(model: Any, flags: Mapping[str, bool], ties: Mapping[str, str]) -> list[str]:
    """The output's tensors in state_dict order: the source's, and the biases a flag adds."""
    if not flags:
        return [k for k in model.state_dict() if k not in ties]
    from transformers.initialization import no_init_weights
    probe = copy.deepcopy(model.config)
    for flag, value in flags.items():
        setattr(probe, flag, value)
    with torch.device("meta"), no_init_weights():
        built = type(model)._from_config(probe, dtype=model.dtype)
    built.tie_weights()
    return [k for k in built.state_dict() if k not in tied_names(built)]


def _zero_bias(shards: Shards, plan: Plan, ties: Mapping[str, str], key: str) -> torch.Tensor:
    """A bias a config flag adds that no refit set: zeros, as in memory (its layer's kept outputs)."""
    weight = key[:-len("bias")] + "weight"
    if not key.endswith(".bias") or weight not in shards.shapes:
        raise CheckpointError(f"the pruned model has tensor {key!r}, which neither the source nor recovery holds")
    rows = sliced_shape(shards.shapes[weight], kept_of(plan, weight, ties))[0]
    return torch.zeros(rows, dtype=_dtype_of(shards.dtypes[weight], weight))


def _check_paths(src: Path, out: Path) -> None:
    if not src.is_dir():
        raise CheckpointError(f"{src} is not a directory")
    if out == src or src in out.parents:
        raise CheckpointError(f"the output directory {out} is inside the input {src}: choose one outside it")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"the output directory {out} exists and is not empty: fxprune never writes "
                              f"over an output (remove it, or choose another --out)")


def _plan(model: Any, shards: Shards, ties: Mapping[str, str], options: PruneOptions, hf_compatible: bool,
          layer_indices: str, timings: dict, blocks_once: bool) -> tuple[Plan, Any]:
    tic = time.perf_counter()
    analysis = analyse_structure(model, options.split_axis, blocks_once)
    timings["structure_s"] = time.perf_counter() - tic
    tic = time.perf_counter()
    plan, config = make_checkpoint_plan(model, analysis, on_disk(analysis, shards, ties), options, hf_compatible,
                                        layer_indices)
    timings["score_s"] = time.perf_counter() - tic
    timings["score_bytes_read"] = shards.bytes_read
    return plan, config


def _resumed_plan(partial: Path, fingerprint: str) -> tuple[Optional[Plan], bool]:
    """The plan of an interrupted run of the same arguments, or (None, False) after clearing another's."""
    run = partial / _RUN
    if not partial.exists():
        return None, False
    try:
        same = json.loads(run.read_text(encoding="utf-8")).get("fingerprint") == fingerprint
        plan = Plan.from_json((partial / PLAN).read_text(encoding="utf-8")) if same else None
    except (OSError, ValueError):
        same, plan = False, None
    if plan is None:  # another run's (or an unfinished start's) leftovers: fxprune's own directory
        shutil.rmtree(partial)
        return None, False
    return plan, True


def _start(partial: Path, fingerprint: str, plan: Plan, config: Any, timings: dict) -> None:
    """The plan and config first, then the run record that makes the directory resumable."""
    tmp = partial.with_name(partial.name + ".new")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / PLAN).write_text(plan.to_json(), encoding="utf-8")
    config.save_pretrained(str(tmp))
    (tmp / _RUN).write_text(json.dumps({"fingerprint": fingerprint, "timings": timings}), encoding="utf-8")
    os.replace(tmp, partial)


def _journal(partial: Path) -> dict[str, dict]:
    """{unit name: its record} of the units an interrupted run finished (shard present, size as recorded)."""
    path = partial / _JOURNAL
    out = {}
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut by the interruption: that unit is redone
            continue
        shard = partial / record["file"]
        if shard.is_file() and shard.stat().st_size == record["file_bytes"]:
            out[record["name"]] = record
    return out


def _check_disk(shards: Shards, plan: Plan, work: Sequence[Unit], aliases: Mapping[str, str], where: Path,
                done: Mapping[str, dict]) -> None:
    """Refuse before writing when what is left of the output (from the plan's sizes) cannot fit."""
    needed = sum(shards.nbytes(k, sliced_shape(shards.shapes[k], kept_of(plan, k, aliases)))
                 for u in work if u.name not in done for k in u.keys) + _MARGIN
    free = shutil.disk_usage(where).free
    if free < needed:
        raise CheckpointError(f"not enough disk for the output: it needs {needed / 1e9:.2f} GB, {where} has "
                              f"{free / 1e9:.2f} GB free")


def _write_units(shards: Shards, plan: Plan, work: Sequence[Unit], aliases: Mapping[str, str], partial: Path,
                 done: Mapping[str, dict], progress: bool) -> Iterator[dict]:
    bar = _bar(progress, sum(shards.nbytes(k) for u in work for k in u.keys if u.name not in done))
    written = 0
    for unit in work:
        if unit.name in done:
            yield {**done[unit.name], "resumed": True}
            continue
        record = _write_unit(shards, plan, unit, aliases, partial)
        written += record["bytes_written"]
        if bar is not None:
            bar.set_postfix_str(f"{unit.name}, {written / 1e9:.2f} GB written")
            bar.update(record["bytes_read"])
        yield record
    if bar is not None:
        bar.close()


def _write_unit(shards: Shards, plan: Plan, unit: Unit, aliases: Mapping[str, str], partial: Path,
                tensor_of: Optional[Any] = None) -> dict:
    """Read, slice and write one unit's shard (``tensor_of(key)``: another source of its tensors), then
    record it in the journal (fsynced: a shard counts as finished only once its journal line is on disk)."""
    from safetensors.torch import save_file
    tic, before = time.perf_counter(), shards.bytes_read
    tensor_of = tensor_of or (lambda key: shards.read_sliced(key, kept_of(plan, key, aliases)))
    tensors = {key: tensor_of(key).contiguous() for key in unit.keys}
    tmp = partial / (unit.file + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    _fsync(tmp)
    os.replace(tmp, partial / unit.file)
    record = {"name": unit.name, "file": unit.file, "tensors": len(tensors),
              "shapes": {k: list(v.shape) for k, v in tensors.items()},
              "bytes_read": shards.bytes_read - before,
              "bytes_written": sum(v.numel() * v.element_size() for v in tensors.values()),
              "file_bytes": (partial / unit.file).stat().st_size,
              "seconds": round(time.perf_counter() - tic, 3)}
    with open(partial / _JOURNAL, "a", encoding="utf-8") as f:
        f.write(json.dumps({k: v for k, v in record.items() if k != "shapes"}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return record


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _finish(src: Path, partial: Path, out: Path, work: Sequence[Unit], records: list[dict], timings: dict,
            started: float, fingerprint: str) -> dict:
    """The index, the copied files and the report, then the one rename that makes ``out`` appear."""
    weight_map = {k: u.file for u in work for k in u.keys}
    total = sum(r["bytes_written"] for r in records)
    (partial / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                            indent=2), encoding="utf-8")
    copied = _copy_other_files(src, partial)
    run = json.loads((partial / _RUN).read_text(encoding="utf-8"))
    timings = {**run.get("timings", {}), **timings, "total_s": time.perf_counter() - started}
    report = {"format": "fxprune.hf.checkpoint/1", "source": str(src), "fingerprint": fingerprint,
              "units": [{k: v for k, v in r.items() if k != "shapes"} for r in records],
              "bytes_read": sum(r["bytes_read"] for r in records if not r.get("resumed")),
              "bytes_written": total, "resumed_units": sum(1 for r in records if r.get("resumed")),
              "copied": copied, "timings": {k: round(v, 3) if isinstance(v, float) else v
                                            for k, v in timings.items()}}
    (partial / REPORT).write_text(json.dumps(report, indent=1), encoding="utf-8")
    for name in (_JOURNAL, _RUN):
        (partial / name).unlink(missing_ok=True)
    if out.exists():
        out.rmdir()  # empty (checked at the start)
    os.replace(partial, out)
    return report


def _copy_other_files(src: Path, partial: Path) -> list[str]:
    """Tokenizer, generation config and any other non-weight file at the top of ``src``."""
    skip = {"config.json", INDEX, PLAN, REPORT}
    copied = []
    for path in sorted(src.iterdir()):
        if path.is_file() and path.name not in skip and not path.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(path, partial / path.name)
            copied.append(path.name)
    return copied


def _bar(progress: bool, total: int):
    if not progress:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="fxprune checkpoint", unit="B", unit_scale=True, leave=False)


__all__ = ["prune_checkpoint", "meta_model", "analyse_structure", "Shards", "OnDisk", "STREAMING_CRITERIA",
           "units"]
