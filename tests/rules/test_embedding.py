"""Embeddings: the embedding dim is a producer (Embedding, EmbeddingBag, F.embedding)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune



class TokenMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.fc = nn.Linear(12, 4)

    def forward(self, idx):
        return self.fc(torch.relu(self.emb(idx))).mean(1)


class Bag(nn.Module):
    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(20, 12, mode="sum")
        self.fc = nn.Linear(12, 3)

    def forward(self, idx):
        return self.fc(self.bag(idx))


class LooseTable(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(20, 10))
        self.fc = nn.Linear(10, 2)

    def forward(self, idx):
        return self.fc(F.embedding(idx, self.table))


CASES = {"embedding": TokenMLP, "embedding_bag": Bag, "functional": LooseTable}


@pytest.mark.parametrize("case", sorted(CASES))
def test_embedding_prunes_and_verifies(prune_checked, case, level):
    torch.manual_seed(0)
    prune_checked(CASES[case]().eval(), torch.randint(0, 20, (3, 5)), level)


def test_embedding_dim_is_the_producer(level):
    torch.manual_seed(0)
    result = fxprune.prune(TokenMLP().eval(), torch.randint(0, 20, (3, 5)), 0.5, capture=level)
    assert result.plan.kept_indices["emb.weight"][1] == result.plan.kept_indices["fc.weight"][1]
    gm = result.graph_module
    assert gm.get_parameter("emb.weight").shape == (20, 6)  # both levels
    if level == "fx":
        assert gm.emb.embedding_dim == 6
