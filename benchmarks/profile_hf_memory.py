"""Where ``fxprune.hf.prune`` spends its memory on SmolLM2-135M-Instruct, fp32 against bf16 (issue 18's
"half the peak memory" target).

Each dtype runs in a fresh process (as ``bench_llm.py`` rows do): the model is loaded, the RSS sampled
every 50 ms while ``energy`` prunes 20% of the MLP width on 8x128 calibration tokens, and the RSS printed
at each phase (export, analysis, the calibration walk, scoring the groups, rewrite, rebuild, output check), with
the peak and the phase it fell in, relative to the RSS before the call (``bench_llm``'s "peak MB").

``--warm``: each process first prunes a tiny random LLaMA the same way, so what the first prune in a
process costs once whatever the model (torch.export's and transformers' lazy imports and caches, about
50 MB) is in the RSS before the call: what is left is what this model costs.

    nice python benchmarks/profile_hf_memory.py [--warm]
"""
from __future__ import annotations

import bisect
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def phases():
    from fxprune import stages
    from fxprune.hf import in_memory
    return ((in_memory, "export"), (stages, "analyze"), (stages, "score"), (stages, "gather_evidence"),
            (stages, "score_groups"), (stages, "rewrite_graph"), (in_memory, "_rebuild"),
            (in_memory, "_check_outputs"))


def warm_up() -> None:
    """One prune of a tiny random LLaMA (the route's one-time imports and caches), freed before the base."""
    import gc
    import torch
    import transformers
    import fxprune.hf
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    tiny = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    fxprune.hf.prune(tiny, (ids,), {"intermediate_size": 0.25}, "energy", calibration=[ids])
    gc.collect()


def profile(dtype: str, warm: bool = False) -> dict:
    import torch
    import fxprune.hf
    from bench_llm import WHAT, load_model, token_windows
    from profile_layerwise import marked, rss_bytes
    if warm:
        warm_up()
    torch.manual_seed(0)
    model = load_model(dtype)
    windows = token_windows(8, 128, "calibration")
    batches = [torch.stack(windows[i:i + 2]) for i in range(0, 8, 2)]
    marks: list = []
    for module, name in phases():
        marked(marks, module, name)
    samples, running = [], [True]

    def sample() -> None:
        while running[0]:
            samples.append((time.time(), rss_bytes()))
            time.sleep(0.05)
    base, start = rss_bytes(), time.time()
    threading.Thread(target=sample, daemon=True).start()
    fxprune.hf.prune(model, (batches[0],), WHAT["mlp20"], "energy", calibration=batches)
    running[0] = False
    times = [t for t, _ in samples]
    at = [(round(t - start, 1), m, round((samples[min(len(samples) - 1, bisect.bisect(times, t))][1] - base) / 2**20))
          for t, m in marks]
    peak_time, peak = max(samples, key=lambda s: s[1])
    return {"dtype": dtype, "warm": warm, "model_mb": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20),
            "rss_before_mb": round(base / 2**20), "peak_delta_mb": round((peak - base) / 2**20),
            "peak_after": [m for t, m in marks if t <= peak_time][-2:], "phases_mb_over_before": at}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        print(json.dumps(profile(sys.argv[2], "--warm" in sys.argv)))
        return
    for dtype in ("float32", "bfloat16"):
        done = subprocess.run([sys.executable, __file__, "--worker", dtype, *sys.argv[1:]], capture_output=True,
                              text=True)
        result = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else done.stderr[-2000:]
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
