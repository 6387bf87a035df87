"""Promise 8 from a batch of 1: an export-level capture from a 1-row example is not fixed to batch 1.

torch.export specialises a dynamic dim whose example size is 1; fxprune traces such a dim from the
example repeated to 2 rows. A ViT (torchvision's VisionTransformer: its class token is expanded to the
batch) and a HuggingFace decoder through ``fxprune.hf.prune`` (a 1-row prompt is what most users pass)
then run, and match the original, at other batch sizes and sequence lengths.
"""
from __future__ import annotations

import pytest
import torch
import torchvision

import fxprune


def small_vit() -> torch.nn.Module:
    """vit_b_16's architecture at a test's size (same class, same forward)."""
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=16, mlp_dim=32, num_classes=5).eval()


def test_vit_from_a_batch_of_one_runs_at_batch_three() -> None:
    model = small_vit()
    x1 = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    result = fxprune.prune(model, (x1,), 0.5, capture="export")
    x3 = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert result.graph_module(x3).shape == (3, 5)
    assert fxprune.verify(model, result, (x3,)).passed
    assert fxprune.verify(model, result, (x1,)).passed


def test_hf_decoder_from_a_one_row_prompt_runs_at_other_sizes() -> None:
    T = pytest.importorskip("transformers")
    import fxprune.hf
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = T.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(0))
    result = fxprune.hf.prune_with_result(model, (ids,), 0.5)
    other = torch.randint(0, 100, (3, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = result.model(other).logits
    assert got.shape == (3, 5, 100)
    assert fxprune.verify(result.result.analysis.gm, result.result, (other,)).passed
