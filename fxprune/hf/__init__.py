"""HuggingFace models in, HuggingFace models out: prune a ``PreTrainedModel`` into a smaller
``PreTrainedModel`` of the same class that ``save_pretrained`` / ``from_pretrained`` round-trip and whose
``generate`` runs.

>>> import fxprune.hf, transformers, torch
>>> model = transformers.LlamaForCausalLM(config).eval()                           # doctest: +SKIP
>>> ids = torch.randint(0, config.vocab_size, (2, 16))
>>> pruned = fxprune.hf.prune(model, (ids,), sparsity=0.5)                          # doctest: +SKIP
>>> pruned.config.intermediate_size, pruned.config.num_key_value_heads             # doctest: +SKIP
(5504, 4)
>>> pruned.save_pretrained("pruned/")                                               # doctest: +SKIP
>>> fxprune.hf.prune_checkpoint("llama-8b/", "llama-8b-pruned/", sparsity=0.2)      # doctest: +SKIP

How: the model is exported (``torch.export``, a dynamic batch and sequence, no KV cache) and analysed at
the export level with whole attention heads as units; :mod:`fxprune.hf.policy` makes a plan a config can
hold (one width per kind in every layer, GQA's ratio, ``head_dim`` and rotary frequencies unchanged); the
graph is rewritten as usual. Then a fresh model of the same class is built from the new config (HF's
own ``from_config``) and loaded with the original ``state_dict`` sliced per the plan, so HF's own forward
runs at any shape. Its outputs are compared with the pruned graph's on the example inputs: a model that
would compute something else is never returned. ``pruned.config.fxprune`` records what changed and why
(it is saved in ``config.json``); :func:`prune_with_result` also returns the plan and the graph.

A checkpoint bigger than memory goes disk to disk, one decoder layer at a time, with
:func:`prune_checkpoint` (:mod:`fxprune.hf.checkpoint`); the same options and the same result.

transformers is an optional dependency: ``pip install fxprune[hf]``.
"""
from fxprune.hf.checkpoint import STREAMING_CRITERIA, prune_checkpoint
from fxprune.hf.in_memory import (CALIBRATED_CRITERION, FORMAT, HFPruneResult, HiddenSizeReadError,
                                  hf_options, new_config, prune, prune_with_result, sliced_state_dict)

__all__ = ["CALIBRATED_CRITERION", "FORMAT", "HFPruneResult", "HiddenSizeReadError", "STREAMING_CRITERIA",
           "hf_options", "new_config", "prune", "prune_checkpoint", "prune_with_result", "sliced_state_dict"]
