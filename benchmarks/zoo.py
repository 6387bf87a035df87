"""The torchvision classification zoo, pruned and verified: regenerates ``benchmarks/zoo.md``.

Every model of ``torchvision.models.list_models(module=torchvision.models)`` (random weights, eval mode)
is pruned at 50% with L1, uniform, classifier output kept (the default), at the ``fx`` level (where
``torch.fx.symbolic_trace`` captures it) and at the ``export`` level. Each model and level runs in a
**fresh subprocess**, so a crash or a leak stays there and the child's ``ru_maxrss`` is its own peak.

Per row: status, parameters and MACs before/after (MACs from :func:`fxprune.measure.count_macs`, i.e.
``FlopCounterMode``), the model's own forward time, the time of each stage (capture, match, score and
select, rewrite), the peak resident memory of the prune against the memory of the model's tensors, and
the verify error (exact or approximate). The status is ``ok`` only when the pruned model runs, keeps the
output shape, has fewer parameters, passes ``fxprune.verify`` and the input model is byte-for-byte
unchanged; ``no-trace`` means ``symbolic_trace`` cannot capture the model (the fx level does not apply).

Results are kept in ``benchmarks/zoo.json`` (one record per model and level) and merged, so a partial
run (``--models``) updates its rows and the table is rebuilt from all records::

    python benchmarks/zoo.py                              # everything (about an hour on 2 cores)
    python benchmarks/zoo.py --models resnet18 'swin_*' --levels export
    python benchmarks/zoo.py --repeat 3                   # timings: median of 3 runs
    python benchmarks/zoo.py --table-only                 # rebuild zoo.md from zoo.json
    python benchmarks/zoo.py --worker resnet18 fx         # one run in this process, prints JSON
    python benchmarks/zoo.py --source timm --jobs 2       # one model per timm family -> zoo_timm.md/.json

``--source timm`` runs one model per timm family (``TIMM_MODELS``) in one fresh process per model, at
both levels and with Torch-Pruning (``benchmarks/peers.py``) beside them, one thread each; MACs are not
counted there. Its table gives the status per family and level (``write_timm_table``).

``benchmarks/`` is not an installed package; the script imports the installed ``fxprune``.
"""
from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402
LEVELS = ("fx", "export")
TORCH_PRUNING = "torch-pruning"
SOURCES = ("torchvision", "timm")
SPARSITY = 0.5

#: The smallest square input each family accepts (default 64): ViT/MaxViT fix 224 in their
#: position embedding / partition sizes; Swin is run at 224 so its windows shift as designed.
SIZES = {"vit_": 224, "swin_": 224, "maxvit_": 224, "inception_v3": 75}
DEFAULT_SIZE = 64


def input_size(name: str) -> int:
    for prefix, size in SIZES.items():
        if name.startswith(prefix):
            return size
    return DEFAULT_SIZE


def zoo_models(source: str = "torchvision") -> list[str]:
    if source == "timm":
        return list(TIMM_MODELS.values())
    import torchvision
    return list(torchvision.models.list_models(module=torchvision.models))


def build(name: str, source: str = "torchvision") -> tuple[Any, tuple]:
    """A random-weight model in eval mode (:func:`common.random_model`, :func:`timm_model`) and its
    example input (both seeded)."""
    import torch
    if source == "timm":
        model = timm_model(name)
        shape = (1, *timm_input_size(name))
    else:
        model = common.random_model(name)
        shape = (1, 3, input_size(name), input_size(name))
    return model, (torch.randn(*shape, generator=torch.Generator().manual_seed(1)),)


# --- the timm zoo ---------------------------------------------------------------------------------
#: One model per timm family (a module of ``timm.models``): its smallest variant by parameter count that
#: runs at its default input size capped at 224, as ``python benchmarks/zoo.py --pick-timm`` lists them
#: for timm 1.0.31.
TIMM_MODELS: dict[str, str] = {
    'beit': 'beit_base_patch16_224',
    'byoanet': 'eca_botnext26ts_256',
    'byobnet': 'test_byobnet',
    'cait': 'cait_xxs24_224',
    'coat': 'coat_tiny',
    'convit': 'convit_tiny',
    'convmixer': 'convmixer_768_32',
    'convnext': 'test_convnext',
    'cpubone': 'cpubone_nano',
    'crossvit': 'crossvit_tiny_240',
    'csatv2': 'csatv2',
    'cspnet': 'cs3darknet_focus_s',
    'cspnext': 'cspnext_tiny',
    'davit': 'davit_tiny',
    'deepseek_vit': 'deepseek_vit_412m',
    'deit': 'deit_tiny_patch16_224',
    'densenet': 'densenet121',
    'dla': 'dla46x_c',
    'dpn': 'dpn48b',
    'edgenext': 'edgenext_xx_small',
    'efficientformer': 'efficientformer_l1',
    'efficientformer_v2': 'efficientformerv2_s0',
    'efficientnet': 'test_efficientnet',
    'efficientvim': 'efficientvim_m1',
    'efficientvit_mit': 'efficientvit_b0',
    'efficientvit_msra': 'efficientvit_m0',
    'eva': 'vit_tiny_patch16_dinov3_qkvb',
    'fasternet': 'fasternet_t0',
    'fastvit': 'fastvit_t8',
    'focalnet': 'focalnet_tiny_srf',
    'gcvit': 'gcvit_xxtiny',
    'gemma4_vit': 'gemma4_vit_167m',
    'ghostnet': 'ghostnet_050',
    'hardcorenas': 'hardcorenas_b',
    'hgnet': 'hgnetv2_b0',
    'hiera': 'hiera_tiny_224',
    'hieradet_sam2': 'sam2_hiera_tiny',
    'hrnet': 'hrnet_w18_small',
    'iformer': 'iformer_t',
    'inception_next': 'inception_next_atto',
    'inception_resnet_v2': 'inception_resnet_v2',
    'inception_v3': 'inception_v3',
    'inception_v4': 'inception_v4',
    'lcnetv2': 'lcnetv2_small',
    'levit': 'levit_128s',
    'lowformer': 'lowformer_b0',
    'mambaout': 'test_mambaout',
    'maxxvit': 'test_coatnet',
    'metaformer': 'poolformerv2_s12',
    'mlp_mixer': 'gmlp_ti16_224',
    'mobilenetv3': 'mobilenetv3_small_050',
    'mobilenetv5': 'mobilenetv5_base',
    'mobilevit': 'mobilevit_xxs',
    'mvitv2': 'mvitv2_tiny',
    'naflexvit': 'naflexvit_base_patch16_parfac_gap',
    'nasnet': 'nasnetalarge',
    'nest': 'nest_tiny',
    'nextvit': 'nextvit_small',
    'nfnet': 'test_nfnet',
    'pit': 'pit_ti_224',
    'pnasnet': 'pnasnet5large',
    'pvt_v2': 'pvt_v2_b0',
    'qwen3_vit': 'qwen3_vit_88m',
    'rdnet': 'rdnet_tiny',
    'regnet': 'regnetx_002',
    'repghost': 'repghostnet_050',
    'repvit': 'repvit_m1',
    'res2net': 'res2next50',
    'resnest': 'resnest14d',
    'resnet': 'test_resnet',
    'resnetv2': 'resnetv2_18',
    'rexnet': 'rexnet_100',
    'selecsls': 'selecsls42',
    'senet': 'legacy_seresnet18',
    'sequencer': 'sequencer2d_s',
    'shvit': 'shvit_s1',
    'sknet': 'skresnet18',
    'starnet': 'starnet_s050',
    'swiftformer': 'swiftformer_xs',
    'swin_transformer': 'swin_tiny_patch4_window7_224',
    'swin_transformer_v2': 'swinv2_tiny_window16_256',
    'swin_transformer_v2_cr': 'swinv2_cr_tiny_224',
    'tiny_vit': 'tiny_vit_5m_224',
    'tnt': 'tnt_s_legacy_patch16_224',
    'tresnet': 'tresnet_m',
    'twins': 'twins_svt_small',
    'vgg': 'vgg11',
    'visformer': 'visformer_tiny',
    'vision_transformer': 'test_vit',
    'vision_transformer_hybrid': 'vit_tiny_r_s16_p8_224',
    'vision_transformer_relpos': 'test_vit_relpos',
    'vision_transformer_sam': 'samvit_base_patch16_224',
    'vitamin': 'vitamin_small_224',
    'volo': 'volo_d1_224',
    'vovnet': 'ese_vovnet19b_slim_dw',
    'xception': 'legacy_xception',
    'xception_aligned': 'xception41p',
    'xcit': 'xcit_nano_12_p8_224',
}
TIMM_MAX_INPUT = 224
#: Families none of whose variants runs at 224: their smallest runs at its default size (CrossViT: 240).
TIMM_DEFAULT_INPUT = frozenset({"crossvit_tiny_240"})
#: The standard deviation of the noise added to a parameter whose entries are all equal.
JITTER = 0.02


def timm_model(name: str) -> Any:
    """timm model ``name`` with seeded random weights, in eval mode.

    timm initialises many parameters to one constant: LayerNorm weights to 1 and biases to 0, layer
    scales to 1e-5 or 0, zero-initialised last norms of residual branches. A branch scaled by 0 (or
    1e-5) contributes nothing, so pruning it would verify trivially; every parameter whose entries are
    all equal gets N(0, 0.02) noise added, so every branch reaches the output."""
    import timm
    import torch
    torch.manual_seed(0)
    model = _create_timm(name).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() and bool((p == p.reshape(-1)[0]).all()):
                p.add_(torch.randn_like(p) * JITTER)
    return model


def timm_input_size(name: str) -> tuple[int, int, int]:
    """(C, H, W): the model's default input, each side capped at 224 (unless in TIMM_DEFAULT_INPUT)."""
    import timm
    channels, height, width = timm.get_pretrained_cfg(name).input_size
    if name in TIMM_DEFAULT_INPUT:
        return channels, height, width
    return channels, min(height, TIMM_MAX_INPUT), min(width, TIMM_MAX_INPUT)


def _create_timm(name: str) -> Any:
    """``timm.create_model``, for the capped input size: a model with an ``img_size`` argument (ViT-like:
    its patch grid or windows are fixed at build time) is built for it; CNNs take any size."""
    import timm
    size = timm_input_size(name)
    if size == tuple(timm.get_pretrained_cfg(name).input_size):
        return timm.create_model(name, pretrained=False)
    try:
        return timm.create_model(name, pretrained=False, img_size=size[1])
    except TypeError:  # no img_size argument
        return timm.create_model(name, pretrained=False)


def pick_timm_models() -> dict[str, str]:
    """Each timm family's smallest variant by parameter count (models are built on the ``meta``
    device: no memory, no initialisation cost)."""
    import timm
    import torch
    picked = {}
    for family in timm.list_modules():
        sizes = []
        for name in timm.list_models(module=family):
            try:
                with torch.device("meta"):
                    model = timm.create_model(name, pretrained=False)
            except Exception:  # a variant that needs arguments (or a package) the zoo does not give
                continue
            sizes.append((sum(p.numel() for p in model.parameters()), name))
        runs = [name for _, name in sorted(sizes) if _runs_capped(name)]
        if sizes:
            picked[family] = runs[0] if runs else min(sizes)[1]
    return picked


def _runs_capped(name: str) -> bool:
    import torch
    try:
        with torch.device("meta"):
            _create_timm(name).eval()(torch.empty(1, *timm_input_size(name)))
        return True
    except Exception:  # e.g. CrossViT, whose branches' patch grids need 240
        return False


# --- the worker: one model, one level, in this process --------------------------------------------
def fingerprint(model: Any) -> tuple[str, str]:
    """A hash of every tensor's bytes (no copy of the weights) and the model's code, if any."""
    digest = hashlib.blake2b(digest_size=16)
    for key, value in model.state_dict(keep_vars=True).items():
        t = value.detach().contiguous()
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(__import__("torch").uint8).numpy())
    return digest.hexdigest(), str(getattr(model, "code", ""))


def tensor_mb(model: Any) -> float:
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2 ** 20


def macs(model: Any, inputs: tuple) -> int:
    """MACs with nn.MultiheadAttention's eval fast path off: FlopCounterMode does not see inside
    ``torch._native_multi_head_attention``, which would hide ViT's projections and attention."""
    import torch
    from fxprune.measure import count_macs
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        return count_macs(model, inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


def used_params(gm: Any) -> int:
    """Parameters the graph reads: an export graph keeps a get_attr for every parameter of the model,
    even one no node uses (GoogLeNet's eval-mode aux heads), an fx graph only what it calls."""
    import torch
    seen: dict[int, int] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.users:
            value = gm.get_parameter(node.target) if _is_param(gm, node.target) else None
            if value is not None:
                seen[id(value)] = value.numel()
        elif node.op == "call_module":
            seen.update({id(p): p.numel() for p in gm.get_submodule(node.target).parameters()})
    return sum(seen.values()) if seen else sum(p.numel() for p in gm.parameters() if isinstance(p, torch.Tensor))


def _is_param(gm: Any, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


def no_rule_reasons(analysis: Any) -> list[str]:
    """Distinct 'no rule for ...' reasons among frozen units (what keeps channels for lack of a rule)."""
    return sorted({r for g in analysis.groups for r in g.reasons if "no rule for" in r})


def run_worker(name: str, level: str, source: str = "torchvision",
               built: Optional[tuple[Any, tuple]] = None) -> dict[str, Any]:
    import torch
    from fxprune.core.analysis import AnalysisOptions, match
    from fxprune.api import verify
    from fxprune.stages import PruneResult, make_plan, rewrite_graph
    from fxprune.options import PruneOptions
    from fxprune.core.capture import capture
    from fxprune.errors import CaptureError
    from fxprune.data.criteria import score_groups
    from fxprune.core.select import select
    from fxprune.measure import count_params, current_rss_mb, measure

    torch.set_grad_enabled(False)
    model, inputs = built or build(name, source)
    if level == TORCH_PRUNING:
        return run_torch_pruning(name, model, inputs)
    record: dict[str, Any] = {"model": name, "level": level, "input": list(inputs[0].shape)}
    record["model_params"] = count_params(model)
    count = source != "timm"  # the timm table shows no MACs: on a shared machine their forward passes cost
    record["macs_before"] = macs(model, inputs) if count else None
    t0, c0 = time.perf_counter(), time.process_time()
    ref_shape = tuple(model(*inputs).shape)
    record.update(forward_s=time.perf_counter() - t0, forward_cpu_s=time.process_time() - c0)
    record["tensor_mb"] = tensor_mb(model)
    before = fingerprint(model)
    record["rss_base_mb"] = current_rss_mb()
    with measure() as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            captured = capture(model, inputs, level)
        except CaptureError as exc:
            record.update(status="no-trace" if level == "fx" else "no-export", error=str(exc))
            return record
        t1 = time.perf_counter()
        analysis = match(captured.gm, captured.level, AnalysisOptions())
        t2 = time.perf_counter()
        scores = score_groups(analysis, analysis.groups, "l1")
        options = PruneOptions(SPARSITY, "l1", level)
        drop = select(analysis, scores, options)
        plan = make_plan(analysis, drop, options)
        t3 = time.perf_counter()
        pruned = rewrite_graph(analysis, drop, inputs, options)
        t4, c4 = time.perf_counter(), time.process_time()
    record["params_before"] = used_params(captured.gm)
    record.update(prune_cpu_s=c4 - c0, capture_s=t1 - t0, match_s=t2 - t1, select_s=t3 - t2, rewrite_s=t4 - t3,
                  prune_s=t4 - t0, rss_peak_mb=mem.rss_peak_mb, maxrss_mb=mem.maxrss_mb)
    record["groups"] = len(analysis.groups)
    record["prunable_groups"] = sum(g.prunable for g in analysis.groups)
    record["no_rule"] = no_rule_reasons(analysis)
    del scores
    record["params_after"] = used_params(pruned)
    record["macs_after"] = macs(pruned, inputs) if count else None
    new_shape = tuple(pruned(*inputs).shape)
    report = verify(model, PruneResult(pruned, plan, analysis, drop, inputs), inputs)
    record.update(verify_abs=report.max_abs_error, verify_rel=report.max_rel_error,
                  exact=report.exact, verify_passed=report.passed, drift_rel=report.max_rel_drift)
    failures = []
    if new_shape != ref_shape:
        failures.append(f"output shape {new_shape} != {ref_shape}")
    if record["params_after"] >= record["params_before"]:
        failures.append("nothing pruned")
    if not report.passed:
        failures.append(str(report))
    if fingerprint(model) != before:
        failures.append("the input model changed")
    record["status"] = "ok" if not failures else "FAIL"
    if failures:
        record["error"] = "; ".join(failures)
    return record


def run_torch_pruning(name: str, model: Any, inputs: tuple) -> dict[str, Any]:
    """Torch-Pruning on the same model and input (``peers.prune_with_torch_pruning``: L1, uniform 50%,
    the classifier ignored). ``ok`` = the result runs, keeps the output shape and is smaller; it cannot
    be verified against a reference (Torch-Pruning keeps no record of what it dropped)."""
    import peers
    import torch
    from fxprune.measure import count_params
    record: dict[str, Any] = {"model": name, "level": TORCH_PRUNING, "input": list(inputs[0].shape),
                              "params_before": count_params(model)}
    before = fingerprint(model)
    t0 = time.perf_counter()
    try:
        with torch.enable_grad():  # Torch-Pruning traces autograd's grad_fn graph
            pruned = peers.prune_with_torch_pruning(model, inputs, SPARSITY, ignored_layers=classifiers(model))
    except peers.PeerBrokenResult as exc:
        record.update(status="broken", error=exc.reason)
    except (peers.PeerError, TypeError, ValueError, RuntimeError) as exc:
        record.update(status="crash", error=getattr(exc, "reason", f"{type(exc).__name__}: {exc}"))
    else:
        record.update(status="ok", params_after=count_params(pruned))
        if record["params_after"] >= record["params_before"]:
            record.update(status="FAIL", error="nothing pruned")
    record["prune_s"] = time.perf_counter() - t0
    if fingerprint(model) != before:
        record.update(status="FAIL", error="the input model changed")
    record["error"] = record.get("error", "").splitlines()[0][:300] if record.get("error") else None
    return record


def classifiers(model: Any) -> list[Any]:
    """The model's classifier layers (timm's ``get_classifier()``; distilled models have two), so the
    peer keeps the output size as fxprune does; the last ``nn.Linear`` for other models."""
    import peers
    import torch
    if not hasattr(model, "get_classifier"):
        return [peers.classifier_of(model)]
    heads = model.get_classifier()
    heads = heads if isinstance(heads, (tuple, list)) else (heads,)
    return [h for h in heads if isinstance(h, torch.nn.Module) and any(True for _ in h.parameters())]


def worker_main(name: str, levels: str, source: str = "torchvision") -> int:
    """Run ``name`` at each of the comma-separated ``levels`` in this process, one JSON line each."""
    import traceback
    from fxprune.measure import peak_rss_mb
    if source == "timm":
        common.pin_threads(1)
    built = None
    for level in levels.split(","):
        try:
            built = built or build(name, source)
            record = run_worker(name, level, source, built)
        except Exception as exc:  # a crash is a result too: report it, with where it happened
            tb = traceback.extract_tb(exc.__traceback__)
            where = next((f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(tb)
                          if "/fxprune/" in f.filename), "")
            record = {"model": name, "level": level, "status": "CRASH",
                      "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                               + (f" (at {where})" if where else "")}
        record["process_maxrss_mb"] = peak_rss_mb()
        print(json.dumps(record), flush=True)
    return 0


# --- the driver: one subprocess per model and level --------------------------------------------------
def run_isolated(name: str, level: str, timeout_s: float) -> dict[str, Any]:
    return run_levels(name, (level,), timeout_s)[0]


def run_levels(name: str, levels: tuple[str, ...], timeout_s: float, source: str = "torchvision",
               mem_gb: Optional[float] = None) -> list[dict[str, Any]]:
    """One fresh process runs ``name`` at ``levels`` in turn; a record per level (a level the process
    did not reach gets the timeout or the crash). ``mem_gb`` caps the child's memory (RLIMIT_DATA)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, ",".join(levels), "--source", source]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if source == "timm":
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    limit = (lambda: common.limit_memory(mem_gb)) if mem_gb else None
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, preexec_fn=limit)
        stdout, missing = proc.stdout, {"status": "CRASH", "error": f"exit {proc.returncode}: "
                                                                   f"{proc.stderr.strip().splitlines()[-1:] or ''}"}
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        missing = {"status": "TIMEOUT", "error": f"over {timeout_s:.0f} s"}
    done = {r["level"]: r for r in (json.loads(ln) for ln in stdout.splitlines() if ln.startswith("{"))}
    records = [done.get(level) or {"model": name, "level": level, **missing} for level in levels]
    for record in records:
        record["wall_s"] = time.perf_counter() - t0
    return records


TIMED = ("forward_s", "forward_cpu_s", "prune_cpu_s", "capture_s", "match_s", "select_s", "rewrite_s", "prune_s", "rss_peak_mb",
         "maxrss_mb", "process_maxrss_mb", "wall_s")


def median_record(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The first run's outcome with the median of every timing and memory figure."""
    record = dict(runs[0])
    for key in TIMED:
        values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
        if values:
            record[key] = statistics.median(values)
    record["runs"] = len(runs)
    if any(r.get("status") != record.get("status") for r in runs):
        record["status_varies"] = sorted({r.get("status", "?") for r in runs})
    return record


def select_models(patterns: Optional[list[str]], names: list[str]) -> list[str]:
    if not patterns:
        return names
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    unknown = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unknown:
        raise SystemExit(f"no model of the zoo matches {unknown}")
    return chosen


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {"records": {}}


def save(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def progress(i: int, n: int, r: dict[str, Any]) -> str:
    if r.get("status") == "ok" and r["level"] == TORCH_PRUNING:
        detail = f"params {r['params_after'] / r['params_before']:.2f}x  prune {r['prune_s']:.1f}s"
    elif r.get("status") == "ok":
        macs = f"MACs {r['macs_after'] / max(r['macs_before'], 1):.2f}x  " if r.get("macs_before") else ""
        detail = (f"params {r['params_after'] / r['params_before']:.2f}x  {macs}prune {r['prune_s']:.1f}s  "
                  f"peak {r.get('maxrss_mb', 0):.0f}MB  err {r['verify_rel']:.1e}")
    else:
        detail = r.get("error", "")[:160]
    return f"[{i}/{n}] {r['model']:22s} {r['level']:6s} {r['status']:8s} {detail}"


# --- the table -----------------------------------------------------------------------------------
def _m(n: Optional[float], unit: float = 1e6) -> str:
    return "" if n is None else f"{n / unit:.1f}" if n / unit < 100 else f"{n / unit:.0f}"


def _s(x: Optional[float]) -> str:
    return "" if x is None else f"{x:.2f}" if x < 10 else f"{x:.1f}"


def table_row(r: dict[str, Any]) -> str:
    if r.get("status") not in ("ok", "FAIL"):
        return f"| {r['model']} | {r['level']} | {r['status']} | {r.get('error', '')[:120]} |" + " |" * 10
    ratio = r["params_after"] / r["params_before"]
    macs = f"{_m(r['macs_before'])} → {_m(r['macs_after'])}"
    over = (r.get("maxrss_mb") or 0) - (r.get("rss_base_mb") or 0)
    err = f"{r['verify_rel']:.1e} {'exact' if r['exact'] else 'approx'}"
    drift = f"{r['drift_rel']:.2f}" if "drift_rel" in r else ""
    if not drift and not r["exact"]:  # verified before the kept-statistics reference, which nothing checked
        err += " (unchecked: not rerun)"
    status = r["status"] if r["status"] == "ok" else f"FAIL: {r.get('error', '')[:80]}"
    return (f"| {r['model']} | {r['level']} | {status} | {_m(r['params_before'])} → {_m(r['params_after'])}"
            f" ({ratio:.2f}) | {macs} | {_s(r['forward_s'])} | {_s(r['capture_s'])} | {_s(r['match_s'])} |"
            f" {_s(r['select_s'])} | {_s(r['rewrite_s'])} | {_s(r['prune_s'])} |"
            f" {r.get('maxrss_mb', 0):.0f} (+{max(over, 0):.0f} / {r['tensor_mb']:.0f}) | {err} | {drift} |")


HEADER = ("| model | level | status | params M before → after (ratio) | MMACs before → after | forward s | capture s | match s "
          "| score+select s | rewrite s | prune s | peak RSS MB (+over base / tensors) | verify rel. error "
          "| rel. drift from original |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def summary(records: list[dict[str, Any]], models: list[str]) -> list[str]:
    lines = []
    for level in LEVELS:
        rows = [r for r in records if r["level"] == level]
        count = {s: sum(r["status"] == s for r in rows) for s in ("ok", "no-trace")}
        bad = [f"{r['model']} ({r['status']})" for r in rows if r["status"] not in ("ok", "no-trace")]
        missing = [m for m in models if not any(r["model"] == m for r in rows)]
        line = (f"- **{level}**: {count['ok']} of {len(models)} pruned and verified"
                + (f", {count['no-trace']} not traceable by `symbolic_trace`" if count["no-trace"] else ""))
        if bad:
            line += f"; failing: {', '.join(bad)}"
        if missing:
            line += f"; not run: {', '.join(missing)}"
        lines.append(line)
    return lines


def slowest(records: list[dict[str, Any]], n: int = 8) -> list[str]:
    ok = sorted((r for r in records if r["status"] == "ok"), key=lambda r: -r["prune_s"])[:n]
    return [f"- {r['model']} ({r['level']}): prune {r['prune_s']:.1f} s (forward {r['forward_s']:.2f} s; capture "
            f"{r['capture_s']:.1f}, match {r['match_s']:.1f}, score+select {r['select_s']:.1f}, rewrite "
            f"{r['rewrite_s']:.1f})" for r in ok]


def write_table(data: dict[str, Any], path: Path) -> None:
    models = zoo_models()
    records = [data["records"][k] for k in sorted(data["records"], key=_order(models))]
    no_rule = sorted({f"{r['level']}: {reason}" for r in records for reason in r.get("no_rule", [])})
    meta = data.get("meta", {})
    text = [
        "# The torchvision zoo, pruned and verified",
        "",
        "Generated by `python benchmarks/zoo.py` (do not edit by hand). Every classification model of "
        "`torchvision.models.list_models(module=torchvision.models)`, random weights, eval mode, pruned at "
        f"{SPARSITY:.0%} with L1, uniform, classifier output kept; `fx` = `symbolic_trace` graph, `export` = "
        "`torch.export` ATen graph. Input 1×3×64×64 except ViT/Swin/MaxViT (224) and inception_v3 (75).",
        "",
        f"Machine: {meta.get('machine', '?')}; torch {meta.get('torch', '?')}, torchvision "
        f"{meta.get('torchvision', '?')}. Timings are the median of {meta.get('repeat', 1)} run(s) each in a "
        "fresh process, on a shared machine: read them as orders of magnitude.",
        "",
        "Columns: *status* `ok` = runs, same output shape, fewer parameters, `fxprune.verify` passed, input "
        "model unchanged. *params* counts the parameters the graph reads (an export graph also holds unused "
        "ones, e.g. GoogLeNet's and Inception's eval-mode aux heads; an fx graph drops them). *prune s* = capture + match + score+select + rewrite (rewrite includes refreshing "
        "the traced values). *peak RSS* is the process' peak during the prune, with how much it rose over the "
        "model already in memory and the size of the model's tensors. *verify rel. error* is the largest "
        "difference to the reference — the original model with the dropped channels contributing nothing and "
        "every normalisation's statistics over the kept channels only — relative to the output's scale; it "
        "must be within tolerance (1e-4) for every model. `approx`: some dropped channel reaches "
        "LayerNorm-family statistics, so the reference recomputes them. *rel. drift from original* is, for "
        "information, how far the pruned outputs are from the unpruned model's (random weights: large).",
        "",
        "## Summary",
        "",
        *summary(records, models),
        "",
        "Slowest prunes:",
        "",
        *slowest(records),
        "",
        "## Results",
        "",
        HEADER,
        *[table_row(r) for r in records],
        "",
    ]
    if no_rule:
        text += ["## Channels kept for lack of a rule", "",
                 "Ops without a rule freeze the channels they touch (correct, but those channels cannot "
                 "shrink):", "", *[f"- {line}" for line in no_rule], ""]
    path.write_text("\n".join(text))


def _order(models: list[str]):
    index = {m: i for i, m in enumerate(models)}
    return lambda key: (index.get(key.split("/")[0], 10 ** 6), LEVELS.index(key.split("/")[1]))


def main(argv: Optional[Iterable[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", choices=SOURCES, default="torchvision", help="the model zoo")
    parser.add_argument("--models", nargs="*", help="names or fnmatch patterns (default: the whole zoo)")
    parser.add_argument("--levels", nargs="*", choices=LEVELS + (TORCH_PRUNING,),
                        help=f"default: {', '.join(LEVELS)} (timm: and {TORCH_PRUNING})")
    parser.add_argument("--repeat", type=int, default=1, help="runs per model and level (median timings)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    parser.add_argument("--json", type=Path, help="default: zoo.json (timm: zoo_timm.json)")
    parser.add_argument("--out", type=Path, help="default: zoo.md (timm: zoo_timm.md)")
    parser.add_argument("--mem-gb", type=float, default=10.0, help="memory cap per timm process (GiB)")
    parser.add_argument("--jobs", type=int, default=1, help="timm: models run side by side (one thread each)")
    parser.add_argument("--table-only", action="store_true", help="rebuild the table from --json")
    parser.add_argument("--pick-timm", action="store_true", help="print each timm family's smallest model")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "LEVEL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(*args.worker, args.source)
    if args.pick_timm:
        print(json.dumps(pick_timm_models(), indent=4))
        return 0
    if args.source == "timm":
        return timm_main(args)
    args.json, args.out = args.json or HERE / "zoo.json", args.out or HERE / "zoo.md"
    args.levels = args.levels or list(LEVELS)
    data = load(args.json)
    if not args.table_only:
        import torch
        import torchvision
        data["meta"] = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "torch": torch.__version__,
                        "torchvision": torchvision.__version__, "repeat": args.repeat}
        names = select_models(args.models, zoo_models())
        jobs = [(n, level) for n in names for level in args.levels]
        for i, (name, level) in enumerate(jobs, 1):
            runs = [run_isolated(name, level, args.timeout) for _ in range(args.repeat)]
            record = median_record(runs)
            data["records"][f"{name}/{level}"] = record
            print(progress(i, len(jobs), record), flush=True)
            save(args.json, data)
    write_table(data, args.out)
    print(f"wrote {args.out}")
    return 0


# --- the timm driver and table ------------------------------------------------------------------------
TIMM_LEVELS = LEVELS + (TORCH_PRUNING,)


def timm_main(args: argparse.Namespace) -> int:
    """One fresh process per model runs its levels in turn (importing torch and timm once: on a loaded
    2-core machine that import alone takes seconds); ``--jobs`` processes at a time, one thread each."""
    from concurrent.futures import ThreadPoolExecutor, as_completed
    from tqdm import tqdm
    args.json, args.out = args.json or HERE / "zoo_timm.json", args.out or HERE / "zoo_timm.md"
    levels = tuple(args.levels or TIMM_LEVELS)
    data = load(args.json)
    if not args.table_only:
        import timm
        import torch
        import torch_pruning
        data["meta"] = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "torch": torch.__version__,
                        "timm": timm.__version__, "torch_pruning": torch_pruning.__version__, "threads": 1,
                        "jobs": args.jobs, "loadavg_at_start": list(os.getloadavg()),
                        "git": os.environ.get("ZOO_REVISION") or common._git_head()}
        names = select_models(args.models, zoo_models("timm"))
        with ThreadPoolExecutor(args.jobs) as pool, tqdm(total=len(names), desc="timm zoo", unit="model") as bar:
            runs = [pool.submit(run_levels, name, levels, args.timeout, "timm", args.mem_gb) for name in names]
            for done in as_completed(runs):
                for record in done.result():
                    data["records"][f"{record['model']}/{record['level']}"] = record
                    bar.write(progress(0, 0, record).split(" ", 1)[1])
                bar.update(1)
                save(args.json, data)
    write_timm_table(data, args.out)
    print(f"wrote {args.out}")
    return 0


def _cell(r: Optional[dict[str, Any]]) -> str:
    """A status cell: ``ok`` with the parameter ratio (and ``approx`` when verify is approximate)."""
    if r is None:
        return "not run"
    if r["status"] == "ok":
        note = "" if r["level"] == TORCH_PRUNING or r.get("exact", True) else " approx"
        return f"ok {r['params_after'] / r['params_before']:.2f}{note}"
    return r["status"]


def _error(r: Optional[dict[str, Any]]) -> str:
    if r is None or r["status"] == "ok" or not r.get("error"):
        return ""
    text = r["error"].replace("|", "/").replace("\n", " ")
    return f"{r['level']}: {text[:150]}"


def timm_summary(records: dict[str, Any], families: dict[str, str]) -> list[str]:
    lines = []
    for level in TIMM_LEVELS:
        rows = [records.get(f"{m}/{level}") for m in families.values()]
        counts: dict[str, int] = {}
        for r in rows:
            status = "not run" if r is None else r["status"]
            counts[status] = counts.get(status, 0) + 1
        detail = ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: -kv[1]) if s != "ok")
        exact = sum(1 for r in rows if r and r["status"] == "ok" and r.get("exact"))
        what = "pruned" if level == TORCH_PRUNING else f"pruned and verified ({exact} exact)"
        lines.append(f"- **{level}**: {counts.get('ok', 0)} of {len(rows)} {what}" + (f"; {detail}" if detail else ""))
    return lines


def write_timm_table(data: dict[str, Any], path: Path) -> None:
    records, meta = data["records"], data.get("meta", {})
    families = {f: m for f, m in TIMM_MODELS.items()}
    rows = []
    for family, name in families.items():
        cells = [records.get(f"{name}/{level}") for level in TIMM_LEVELS]
        size = next((r["input"] for r in cells if r and r.get("input")), None)
        errors = "; ".join(e for e in (_error(r) for r in cells) if e)
        rows.append(f"| {family} | {name} | {size[-1] if size else ''} | " + " | ".join(_cell(r) for r in cells)
                    + f" | {errors} |")
    text = [
        "# The timm zoo, pruned and verified",
        "",
        "Generated by `python benchmarks/zoo.py --source timm` (do not edit by hand). One model per timm "
        "family (module of `timm.models`): its smallest variant by parameter count, random weights (seed 0; "
        f"parameters timm initialises to one constant get N(0, {JITTER}) noise, so no branch is silenced), eval "
        f"mode, its default input size capped at {TIMM_MAX_INPUT} (a model with an `img_size` argument whose "
        f"default is larger is built for {TIMM_MAX_INPUT}), pruned at {SPARSITY:.0%} with L1, uniform, classifier "
        "output kept. Each model runs in a fresh process, one thread.",
        "",
        f"Machine: {meta.get('machine', '?')}; torch {meta.get('torch', '?')}, timm {meta.get('timm', '?')}, "
        f"Torch-Pruning {meta.get('torch_pruning', '?')}; fxprune at commit {meta.get('git', '?')}; load average at "
        f"start {meta.get('loadavg_at_start', [0])[0]:.1f} on {meta.get('jobs', 1)} side-by-side job(s) (other work ran "
        "beside it: timings are not comparable across rows). Families without a result were not reached in "
        "the run (`not run`).",
        "",
        "Status: `ok R` = the pruned model runs, keeps the output shape, has R× the parameters, passes "
        "`fxprune.verify` and the input model is unchanged (`approx`: a group passes through normalisation "
        "statistics, so verify's reference recomputes them over the kept channels; the pruned model "
        "equals it to float tolerance all the same); `no-trace` = `torch.fx.symbolic_trace` cannot capture the model "
        "(fxprune's `CaptureError` names the line and suggests `capture=\"export\"`), `no-export` = "
        "`torch.export` cannot; `FAIL` = a check failed; `CRASH` = fxprune raised. Torch-Pruning "
        "(`benchmarks/peers.py`, L1, uniform, classifier ignored): `ok R` = its result runs and keeps the "
        "output shape (it cannot be verified), `broken` = it returned a model that fails or changes the "
        "output shape, `crash` = it raised.",
        "",
        "## Summary",
        "",
        *timm_summary(records, families),
        "",
        "## Per family",
        "",
        "| family | model | input | fx | export | Torch-Pruning | why not ok |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    path.write_text("\n".join(text))


if __name__ == "__main__":
    sys.exit(main())
