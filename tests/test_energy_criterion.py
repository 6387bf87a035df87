"""The ``energy`` criterion: a unit's output energy at its consumers, ``Σ‖W_u x_u‖²``; for a whole
attention head group (several ``o_proj`` columns) the cross terms between its columns count — it is
exactly what removing the group takes from ``o_proj``'s output on the calibration data."""
from __future__ import annotations

import pytest
import torch

from fxprune.data.criteria import CRITERIA

transformers = pytest.importorskip("transformers")
import fxprune.hf  # noqa: E402  (needs transformers)

T = transformers
CONFIG = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
CALIBRATION = [torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(s)) for s in range(3)]


def _llama():
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(**CONFIG)).eval()


def _o_proj_inputs(model) -> torch.Tensor:
    seen = []
    hook = model.model.layers[0].self_attn.o_proj.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    with torch.no_grad():
        for x in CALIBRATION:
            model(x, use_cache=False)
    hook.remove()
    return torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).double()


def test_head_group_energy_is_what_removing_it_takes_from_o_proj():
    model = _llama()
    out = fxprune.hf.prune_with_result(model, (CALIBRATION[0],), sparsity={"num_attention_heads": 0.5},
                                       criterion="energy", calibration=CALIBRATION)
    x, w = _o_proj_inputs(model), model.model.layers[0].self_attn.o_proj.weight.detach().double()
    per_group = 2 * 8  # 2 query heads per KV head, head_dim 8
    removed = [float((x[:, g * per_group:(g + 1) * per_group] @ w[:, g * per_group:(g + 1) * per_group].T)
                     .pow(2).sum()) for g in range(2)]
    kept = out.plan.kept_indices["model.layers.0.self_attn.o_proj.weight"][1]
    dropped_group = 0 if kept[0] >= per_group else 1
    assert removed[dropped_group] < removed[1 - dropped_group]  # the group that carries less output goes
    from fxprune.data.criteria import gather_evidence, score_group
    analysis = out.result.analysis
    group = next(g for g in analysis.groups if any(m.key.endswith("o_proj.weight") and m.dim == 1 for m in g.members))
    evidence = gather_evidence(analysis, "energy", CALIBRATION)
    torch.testing.assert_close(score_group(analysis, group, "energy", evidence=evidence),
                               torch.tensor(removed, dtype=torch.float64), rtol=1e-5, atol=0)


def test_energy_is_a_listed_criterion_and_prunes_the_mlp():
    assert "energy" in CRITERIA
    pruned = fxprune.hf.prune(_llama(), (CALIBRATION[0],), sparsity={"intermediate_size": 0.25}, criterion="energy",
                              calibration=CALIBRATION)
    assert pruned.config.intermediate_size == 48
