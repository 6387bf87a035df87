"""Adapters that prune a model with the peer libraries, for side-by-side benchmarks with fxprune.

Two peers:

* **Torch-Pruning** 1.6.1 (``torch_pruning``, DepGraph): :func:`prune_with_torch_pruning`.
* **torch.ao structured pruning** (``torch.ao.pruning._experimental.pruner``):
  :func:`prune_with_torch_ao`.

Each adapter does what a typical user of that library does, following the library's own
examples, and nothing cleverer: the point is to measure the library, not our workarounds.
Where a library needs a manual fix after pruning, the adapter applies the fix its examples
show and the docstring lists it (those fixes are what fxprune promise 4 is about).

Both adapters work on a deep copy by default, so the caller's model is never mutated (both
libraries edit modules in place), and both check the result runs on the example inputs with
the original output shape. A library that refuses or fails raises :class:`PeerUnsupported`;
one that returns a model that does not run, changes the output shape or (torch.ao) disagrees
with its own masked model raises :class:`PeerBrokenResult`. No adapter ever returns a model
it knows to be wrong.

This file is also a command-line tool that runs one peer on one torchvision model in a
**separate process** with a wall-clock timeout and a memory cap (see :func:`run_isolated`),
because Torch-Pruning can run for a very long time or exhaust memory on some models (Swin)::

    python benchmarks/peers.py torch-pruning resnet18 --ratio 0.5 --image 64
    python benchmarks/peers.py torch-pruning swin_t --timeout 300 --mem-gb 8

``benchmarks/`` is not an installed package: import this file with ``benchmarks/`` on
``sys.path`` (``import peers``).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "PeerBrokenResult",
    "PeerError",
    "PeerUnsupported",
    "classifier_of",
    "prune_with_torch_ao",
    "prune_with_torch_pruning",
    "run_isolated",
]


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------

class PeerError(RuntimeError):
    """A peer library could not produce a correct pruned model."""

    def __init__(self, peer: str, model: str, reason: str) -> None:
        super().__init__(f"{peer} on {model}: {reason}")
        self.peer = peer
        self.model = model
        self.reason = reason


class PeerUnsupported(PeerError):
    """The peer cannot prune this model at all: it raised, or the model is outside what it supports."""


class PeerBrokenResult(PeerError):
    """The peer returned a model, but a wrong one: it fails on the example inputs, changes the
    output shape, or disagrees with the peer's own masked model."""


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def classifier_of(model: nn.Module, example_inputs: tuple[Any, ...] | None = None) -> nn.Linear:
    """Return the model's final ``nn.Linear`` (its classifier), for the peers' ignore lists.

    Without ``example_inputs``: the last ``nn.Linear`` in registration order (``model.modules()``),
    which is the classifier of every torchvision classification model (``fc``, ``classifier[-1]``,
    ``heads.head``, ``head``). With ``example_inputs``: the last ``nn.Linear`` *called* in a
    forward pass (eval mode, on a copy's flags restored afterwards), for models that register
    their head before their body. ``nn.MultiheadAttention.out_proj`` is an ``nn.Linear`` too but
    is never last in either order in the models we benchmark.

    Raises:
        ValueError: the model has no ``nn.Linear`` (e.g. SqueezeNet's classifier is a conv).

    Example:
        >>> m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> classifier_of(m) is m[2]
        True
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear; pass the classifier explicitly")
    if example_inputs is None:
        return linears[-1]
    called: list[nn.Linear] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: called.append(mod)) for m in linears]
    flags = {name: m.training for name, m in model.named_modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for h in hooks:
            h.remove()
        for name, m in model.named_modules():
            m.training = flags[name]
    if not called:
        raise ValueError(f"no nn.Linear of {type(model).__name__} ran on the example inputs")
    return called[-1]


def _model_name(model: nn.Module) -> str:
    return type(model).__name__


def _check_ratio(peer: str, model: nn.Module, ratio: float) -> None:
    if not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"{peer}: ratio must be in [0, 1), got {ratio!r}")


def _copy_with_layers(
    model: nn.Module, layers: Iterable[nn.Module], inplace: bool
) -> tuple[nn.Module, list[nn.Module]]:
    """Deep-copy ``model`` (unless ``inplace``) and map ``layers`` (modules of ``model``) onto the copy."""
    layers = list(layers)
    if inplace:
        return model, layers
    names = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
    missing = [type(m).__name__ for m in layers if id(m) not in names]
    if missing:
        raise ValueError(f"ignored_layers must be submodules of the model; not found: {missing}")
    twin = copy.deepcopy(model)
    return twin, [twin.get_submodule(names[id(m)]) for m in layers]


def _run(model: nn.Module, example_inputs: tuple[Any, ...]) -> Any:
    with torch.no_grad():
        return model(*example_inputs)


def _shapes(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, (list, tuple)):
        return type(out)(_shapes(o) for o in out)
    if isinstance(out, dict):
        return {k: _shapes(v) for k, v in out.items()}
    return type(out).__name__


def _set_training_flags(model: nn.Module, flags: dict[str, bool]) -> None:
    for name, m in model.named_modules():
        if name in flags:
            m.training = flags[name]


def _reraise_oom(exc: BaseException) -> None:
    """Let running out of memory surface as ``MemoryError`` instead of "unsupported"."""
    if isinstance(exc, MemoryError):
        raise exc
    if isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc):
        raise MemoryError(str(exc)) from exc


def _check_runs(peer: str, name: str, model: nn.Module, example_inputs: tuple[Any, ...], want: Any) -> None:
    flags = {n: m.training for n, m in model.named_modules()}
    model.eval()
    try:
        got = _shapes(_run(model, example_inputs))
    except Exception as exc:
        raise PeerBrokenResult(peer, name, f"pruned model fails on the example inputs: "
                                           f"{type(exc).__name__}: {exc}") from exc
    finally:
        _set_training_flags(model, flags)
    if got != want:
        raise PeerBrokenResult(peer, name, f"pruned model changed the output shape {want} -> {got}")


# --------------------------------------------------------------------------------------------
# Torch-Pruning
# --------------------------------------------------------------------------------------------

def prune_with_torch_pruning(
    model: nn.Module,
    example_inputs: tuple[Any, ...],
    ratio: float,
    ignored_layers: list[nn.Module] | None = None,
    *,
    global_pruning: bool = False,
    round_to: int | None = None,
    inplace: bool = False,
    check: bool = True,
) -> nn.Module:
    """Prune ``model`` with Torch-Pruning 1.6.1 (L1 group magnitude, uniform ratio, one shot).

    The calls, exactly (``tp.pruner.BasePruner`` is the 1.6 name; ``MetaPruner`` and
    ``MagnitudePruner`` are deprecated aliases of it)::

        imp = tp.importance.GroupMagnitudeImportance(p=1)
        pruner = tp.pruner.BasePruner(model, example_inputs, importance=imp,
                                      pruning_ratio=ratio, global_pruning=False,
                                      ignored_layers=[classifier], round_to=round_to)
        pruner.step()

    ``pruning_ratio`` is the fraction of channels removed from every prunable group.
    ``ignored_layers`` defaults to ``[classifier_of(model)]`` (the output size is an interface).

    Manual fixes this adapter applies, as Torch-Pruning's own torchvision examples do:

    * **torchvision ViT** (``VisionTransformer``: vit_b_16, vit_b_32, vit_l_*, vit_h_14):
      ``round_to = num_heads`` (``nn.MultiheadAttention`` asserts ``embed_dim % num_heads == 0``
      after pruning), and after ``step()`` the user must patch
      ``model.hidden_dim = model.conv_proj.out_channels``, because ``_process_input`` reshapes
      with the stale ``self.hidden_dim`` and fails otherwise. The class token and position
      embedding are found by TP's automatic "unwrapped parameter" detection (last dim).
    * **requires_grad**: DepGraph traces autograd ``grad_fn``; frozen parameters are not seen.
      The adapter sets ``requires_grad=True`` for tracing and restores every flag by name.
    * **training mode**: ``DependencyGraph._trace`` calls ``model.eval()`` and never restores
      the mode, so a model given in training mode comes back in eval mode; the adapter restores
      every module's ``training`` flag.

    Models that need nothing: ResNets, MobileNetV2/V3, VGG, DenseNet, EfficientNet, RegNet,
    ConvNeXt (layer_scale found as an unwrapped parameter). Known failures in TP's own
    torchvision example list: Swin (``swin_t``/``s``/``b``), ShuffleNetV2 (channel shuffle),
    RAFT. Run those via :func:`run_isolated` (timeout + memory cap).

    Args:
        model: the model; not mutated unless ``inplace``.
        example_inputs: positional arguments of one forward call, as a tuple.
        ratio: channel pruning ratio in [0, 1).
        ignored_layers: modules of ``model`` to leave unpruned; default: its classifier.
        global_pruning: rank channels across layers instead of per layer (default: uniform).
        round_to: keep channel counts a multiple of this (default: num_heads for ViT, else none).
        inplace: prune ``model`` itself (Torch-Pruning's native behaviour) instead of a copy.
        check: run the result on ``example_inputs`` and compare output shapes.

    Raises:
        PeerUnsupported: Torch-Pruning raised while building its graph or pruning.
        PeerBrokenResult: the pruned model fails on the example inputs or changed output shape.
    """
    import torch_pruning as tp  # optional dependency of the benchmarks only

    peer, name = "torch-pruning", _model_name(model)
    _check_ratio(peer, model, ratio)
    if not isinstance(example_inputs, tuple):
        raise TypeError(f"example_inputs must be a tuple, got {type(example_inputs).__name__}")
    if ignored_layers is None:
        ignored_layers = [classifier_of(model)]
    work, ignored = _copy_with_layers(model, ignored_layers, inplace)

    flags = {n: m.training for n, m in work.named_modules()}
    grads = {n: p.requires_grad for n, p in work.named_parameters()}
    work.eval()
    try:
        want = _shapes(_run(work, example_inputs)) if check else None
    except Exception as exc:
        raise TypeError(f"{name} fails on the example inputs before pruning: {exc}") from exc

    vit = _torchvision_vit(work)
    if vit and round_to is None:
        round_to = work.encoder.layers[0].num_heads
    for p in work.parameters():
        p.requires_grad_(True)

    try:
        imp = tp.importance.GroupMagnitudeImportance(p=1)
        pruner = tp.pruner.BasePruner(
            work,
            example_inputs,
            importance=imp,
            pruning_ratio=float(ratio),
            global_pruning=global_pruning,
            ignored_layers=ignored,
            round_to=round_to,
        )
        pruner.step()
    except Exception as exc:
        _reraise_oom(exc)
        raise PeerUnsupported(peer, name, f"{type(exc).__name__}: {exc}") from exc
    finally:
        if inplace or sys.exc_info()[0] is None:
            for n, p in work.named_parameters():  # pruned params are new objects; names are kept
                if n in grads:
                    p.requires_grad_(grads[n])
            _set_training_flags(work, flags)

    if vit:  # the manual fix from Torch-Pruning's torchvision example
        work.hidden_dim = work.conv_proj.out_channels

    if check:
        _check_runs(peer, name, work, example_inputs, want)
    return work


def _torchvision_vit(model: nn.Module) -> bool:
    try:
        from torchvision.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover - torchvision is a test dependency
        return False
    return isinstance(model, VisionTransformer)


# --------------------------------------------------------------------------------------------
# torch.ao structured pruning
# --------------------------------------------------------------------------------------------

def _ao_patterns() -> dict[tuple[Any, ...], Any]:
    from torch.ao.pruning._experimental.pruner.base_structured_sparsifier import (
        _get_default_structured_pruning_patterns,
    )
    return _get_default_structured_pruning_patterns()


def _ao_match(modules: dict[str, nn.Module], pattern: tuple[Any, ...], node: torch.fx.Node) -> list[torch.fx.Node] | None:
    from torch.ao.pruning._experimental.pruner.match_utils import apply_match
    return apply_match(modules, pattern, node, [])


def _ao_preflight(gm: torch.fx.GraphModule, targets: Sequence[str]) -> list[str]:
    """Return why each target layer cannot be pruned exactly by torch.ao's pattern matcher.

    torch.ao's ``prune()`` walks every node and applies the first pattern whose chain matches,
    following only the **first user** of each node. So a layer is safe only if (a) some pattern
    matches starting at it, (b) every node of the matched chain but the last has exactly one
    user (otherwise the other users -- a residual add, a second branch -- keep expecting the
    old width), and (c) the layer is called once.
    """
    modules = dict(gm.named_modules())
    patterns = _ao_patterns()
    calls: dict[str, list[torch.fx.Node]] = {t: [] for t in targets}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in calls:
            calls[node.target].append(node)
    problems: list[str] = []
    for target in targets:
        nodes = calls[target]
        if len(nodes) != 1:
            problems.append(f"{target}: called {len(nodes)} times in the traced graph")
            continue
        node = nodes[0]
        users = ", ".join(_describe(u, modules) for u in node.users) or "nothing"
        chain = None
        for pattern in patterns:
            chain = _ao_match(modules, pattern, node)
            if chain is not None:
                break
        if chain is None:
            problems.append(f"{target} ({type(modules[target]).__name__}) -> {users}: "
                            "no torch.ao pattern matches")
            continue
        for n in chain[:-1]:
            if len(n.users) != 1:
                problems.append(
                    f"{target}: {_describe(n, modules)} has {len(n.users)} users "
                    f"({', '.join(_describe(u, modules) for u in n.users)}); torch.ao follows "
                    "only the first")
                break
    return problems


def _describe(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(modules[node.target]).__name__})"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {node.target}"


def prune_with_torch_ao(
    model: nn.Module,
    example_inputs: tuple[Any, ...],
    ratio: float,
    ignored_layers: list[nn.Module] | None = None,
    *,
    check: bool = True,
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> torch.fx.GraphModule:
    """Prune ``model`` with torch.ao's experimental structured pruner (``SaliencyPruner``, row L1).

    What a user of ``torch.ao.pruning._experimental.pruner`` writes::

        pruner = SaliencyPruner({})
        pruner.prepare(model, [{"tensor_fqn": "conv1.weight", "sparsity_level": ratio}, ...])
        pruner.step()            # computes the row masks (FakeStructuredSparsity parametrizations)
        pruned = pruner.prune()  # fx-traces the model, matches patterns, shrinks modules in place

    The config lists every ``nn.Conv2d`` / ``nn.Linear`` except the ignored layers (default: the
    classifier -- torch.ao's ``(nn.Linear, "output")`` pattern would otherwise shrink the
    output). The result is a ``torch.fx.GraphModule`` (what ``prune()`` returns), not an
    instance of the input's class.

    **What torch.ao can prune.** ``prune()`` only knows straight chains, matched from the
    pruned layer through its *first* user: ``Linear -> [activation] -> Linear``,
    ``Conv2d -> [activation] -> Conv2d``, ``Conv2d -> activation -> pool -> Conv2d`` (and
    pool/activation swapped), ``Conv2d -> AdaptiveAvg/MaxPool2d -> flatten -> Linear`` (no
    activation allowed in between), ``LSTM -> getitem -> [LayerNorm] -> Linear``, or the layer
    being the graph output. No BatchNorm, no residual add, no concat, no depthwise/grouped
    coupling, no attention. So it fails on every torchvision classification model (all have BN
    after convs or residuals); this adapter checks that up front (:func:`_ao_preflight`) and
    raises :class:`PeerUnsupported` naming each offending layer, rather than letting ``prune()``
    raise "still contains FakeStructuredSparsity" or, worse, silently shrink a layer whose
    second user (a residual) keeps the old width.

    A surprise: for ``Conv2d -> ... -> Conv2d`` where the *second* conv has padding > 0 and the
    first has a bias (PyTorch's default ``bias=True``), torch.ao's ``prune_conv2d_padded``
    does not remove anything -- it only zeroes the masked rows and keeps all channels. Such
    layers come back full size; use ``bias=False`` or unpadded convs to see real shrinking.

    Args:
        model: the model; never mutated (a deep copy is pruned).
        example_inputs: positional arguments of one forward call, as a tuple.
        ratio: fraction of output rows of each configured layer to remove, in [0, 1).
        ignored_layers: modules of ``model`` to leave out of the config; default: its classifier.
        check: compare the pruned model with torch.ao's own masked model (after ``step()``,
            before ``prune()``) on ``example_inputs``, in eval mode.
        atol, rtol: tolerances of that comparison.

    Raises:
        PeerUnsupported: the model cannot be fx-traced, has no prunable layer, or has a layer
            outside torch.ao's patterns (the message lists them), or torch.ao raised.
        PeerBrokenResult: the pruned model fails, changes the output shape or differs from
            the masked model.
    """
    from torch.ao.pruning._experimental.pruner import SaliencyPruner

    peer, name = "torch.ao", _model_name(model)
    _check_ratio(peer, model, ratio)
    if not isinstance(example_inputs, tuple):
        raise TypeError(f"example_inputs must be a tuple, got {type(example_inputs).__name__}")
    if ignored_layers is None:
        ignored_layers = [classifier_of(model)] if any(isinstance(m, nn.Linear) for m in model.modules()) else []
    work, ignored = _copy_with_layers(model, ignored_layers, inplace=False)
    ignored_ids = {id(m) for m in ignored}

    try:
        gm = torch.fx.symbolic_trace(work)
    except Exception as exc:
        raise PeerUnsupported(peer, name, f"torch.fx.symbolic_trace failed: {type(exc).__name__}: {exc}") from exc

    targets = [n for n, m in work.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)) and id(m) not in ignored_ids]
    if not targets:
        raise PeerUnsupported(peer, name, "no nn.Conv2d / nn.Linear outside the ignored layers")
    problems = _ao_preflight(gm, targets)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} layers in all)" if len(problems) > 5 else "")
        raise PeerUnsupported(peer, name, f"{len(problems)}/{len(targets)} layers outside torch.ao's "
                                          f"straight-chain patterns: {shown}")

    flags = {n: m.training for n, m in work.named_modules()}
    work.eval()
    try:
        want = _run(work, example_inputs)
        sparsifier = SaliencyPruner({})
        sparsifier.prepare(work, [{"tensor_fqn": f"{t}.weight", "sparsity_level": float(ratio)}
                                  for t in targets])
        sparsifier.step()
        masked = _run(work, example_inputs) if check else None
        pruned = sparsifier.prune()
    except Exception as exc:
        _reraise_oom(exc)
        raise PeerUnsupported(peer, name, f"{type(exc).__name__}: {exc}") from exc
    finally:
        _set_training_flags(work, flags)

    if check:
        pruned.eval()
        try:
            got = _run(pruned, example_inputs)
        except Exception as exc:
            raise PeerBrokenResult(peer, name, f"pruned model fails on the example inputs: "
                                               f"{type(exc).__name__}: {exc}") from exc
        finally:
            _set_training_flags(pruned, flags)
        if _shapes(got) != _shapes(want):
            raise PeerBrokenResult(peer, name, f"output shape {_shapes(want)} -> {_shapes(got)}")
        if isinstance(got, torch.Tensor) and not torch.allclose(got, masked, atol=atol, rtol=rtol):
            err = (got - masked).abs().max().item()
            raise PeerBrokenResult(peer, name, f"pruned model differs from torch.ao's masked model "
                                               f"(max abs error {err:.3g})")
    return pruned


# --------------------------------------------------------------------------------------------
# isolated runs (timeout + memory cap) and the command line
# --------------------------------------------------------------------------------------------

PEERS = {"torch-pruning": prune_with_torch_pruning, "torch-ao": prune_with_torch_ao}


def _limit_memory(mem_gb: float) -> None:
    # RLIMIT_DATA caps heap + anonymous mmaps (Linux >= 4.7), i.e. tensor storage, without
    # counting the large *virtual* reservations of CUDA/ROCm libraries that RLIMIT_AS would.
    limit = int(mem_gb * 1024**3)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def run_isolated(
    peer: str,
    model_name: str,
    ratio: float = 0.5,
    image: int = 224,
    timeout_s: float = 600.0,
    mem_gb: float = 8.0,
) -> dict[str, Any]:
    """Run one peer on one torchvision model (random weights) in a fresh Python process.

    The child has a wall-clock ``timeout_s`` and a memory cap of ``mem_gb`` GiB
    (``RLIMIT_DATA``); it reports JSON: ``status`` (``ok``, ``unsupported``, ``broken``, ``oom``,
    ``error``, ``timeout``, ``killed``), parameter and MAC counts before/after, the pruning time
    and the child's peak RSS (``ru_maxrss`` of a fresh process is the task's own peak).
    """
    cmd = [sys.executable, os.path.abspath(__file__), peer, model_name,
           "--ratio", str(ratio), "--image", str(image), "--json"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              preexec_fn=lambda: _limit_memory(mem_gb))
    except subprocess.TimeoutExpired:
        return {"peer": peer, "model": model_name, "status": "timeout", "wall_s": time.perf_counter() - t0}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    return {"peer": peer, "model": model_name, "status": "killed" if proc.returncode < 0 else "error",
            "returncode": proc.returncode, "stderr_tail": proc.stderr[-2000:],
            "wall_s": time.perf_counter() - t0}


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("peer", choices=sorted(PEERS))
    parser.add_argument("model", help="torchvision.models builder name, e.g. resnet18")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--json", action="store_true", help="print one JSON line and nothing else")
    parser.add_argument("--isolate", action="store_true", help="run in a subprocess with the limits below")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--mem-gb", type=float, default=8.0)
    args = parser.parse_args(argv)

    if args.isolate:
        print(json.dumps(run_isolated(args.peer, args.model, args.ratio, args.image, args.timeout, args.mem_gb)))
        return 0

    import torchvision

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from fxprune.measure import count_macs, count_params, peak_rss_mb

    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, weights=None).eval()
    x = (torch.randn(1, 3, args.image, args.image),)
    result: dict[str, Any] = {"peer": args.peer, "model": args.model, "ratio": args.ratio, "image": args.image,
                              "params_before": count_params(model), "macs_before": count_macs(model, x)}
    t0 = time.perf_counter()
    try:
        pruned = PEERS[args.peer](model, x, args.ratio)
        result["status"] = "ok"
    except PeerUnsupported as exc:
        result.update(status="unsupported", reason=exc.reason)
    except PeerBrokenResult as exc:
        result.update(status="broken", reason=exc.reason)
    except MemoryError as exc:
        del model
        result.update(status="oom", reason=f"MemoryError {exc}".strip())
    result["prune_s"] = round(time.perf_counter() - t0, 3)
    if result["status"] == "ok":
        result.update(params_after=count_params(pruned), macs_after=count_macs(pruned, x))
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
