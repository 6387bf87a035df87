"""Real trained models for the quality benchmarks, trained here on data that ships with this machine.

Two models, each trained once with fixed seeds on fixed splits and cached under ``benchmarks/.cache/``
(git-ignored; safetensors, so loading never unpickles anything). The cache key includes every
hyper-parameter, so changing one retrains.

- :func:`trained_digits_cnn`: a small residual CNN with BatchNorm on scikit-learn's ``load_digits``
  (8x8 grey digits, 10 classes, 112 k parameters): 99.6% test accuracy after ~20 CPU-seconds of
  training on one thread.
- :func:`trained_llama`: a HuggingFace ``LlamaForCausalLM`` built from a config (1.87 M parameters,
  4 layers, 6 heads, byte-level vocabulary) trained on the English documentation text that ships with
  Python (``pydoc_data.topics``, 465 k characters) for 300 steps (~2 CPU-minutes; 10 minutes of wall
  time on a loaded 2-core machine); metric: byte-level perplexity on the held-out last 10% of that
  text (5.54 dense). Example inputs, calibration batches and evaluation batches all have
  ``batch`` (16) rows, so a graph specialised to the example's batch size runs them all.

``python benchmarks/quality_models.py`` trains (or loads) both and prints their metrics.

Each returns a :class:`Trained` bundle: the model (eval mode), example inputs, train / calibration /
test splits, ``evaluate(model) -> metric`` and ``finetune(model, epochs=1)`` (the training loop used
to train it, for the benchmark's "after one epoch of fine-tuning" column).

>>> import sys; sys.path.insert(0, "benchmarks")                      # doctest: +SKIP
>>> from quality_models import trained_digits_cnn
>>> digits = trained_digits_cnn()                                      # doctest: +SKIP
>>> round(digits.evaluate(digits.model), 3)                            # doctest: +SKIP
0.99
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

CACHE = Path(__file__).resolve().parent / ".cache"


@dataclass(frozen=True)
class Trained:
    """A trained model with its data and metric."""

    name: str
    model: nn.Module
    """The trained model, in eval mode (a fresh copy per call: prune it freely)."""
    example_inputs: tuple
    train: tuple
    """Training split, as tensors (``(images, labels)`` or ``(token windows,)``)."""
    calibration: tuple
    """A fixed subset of the training split, for calibration."""
    test: tuple
    """Held-out split the metric reads."""
    metric: str
    """``"accuracy"`` (higher is better) or ``"perplexity"`` (lower is better)."""
    evaluate: Callable[[nn.Module], float]
    finetune: Callable[..., nn.Module]
    """``finetune(model, epochs=1)``: the training loop, in place on ``model``; returns it."""
    train_seconds: float = 0.0
    """Seconds the training took when this model was first trained (0 when it came from the cache)."""


# --- the cache ----------------------------------------------------------------------------------
def _cache_path(name: str, config: dict) -> Path:
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    return CACHE / f"{name}-{digest}.safetensors"


def _cached(name: str, config: dict, model: nn.Module, train: Callable[[nn.Module], None]) -> float:
    """Load ``model``'s weights from the cache, or train it and store them; the training seconds."""
    from safetensors.torch import load_file, save_file
    path = _cache_path(name, config)
    if path.exists():
        model.load_state_dict(load_file(str(path)))
        return 0.0
    t0 = time.perf_counter()
    train(model)
    seconds = time.perf_counter() - t0
    CACHE.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return seconds


# --- vision: a residual CNN on scikit-learn's digits ----------------------------------------------
DIGITS = {"width": 32, "epochs": 40, "batch": 64, "lr": 3e-3, "seed": 0, "test": 500, "calibration": 512}


class Residual(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))


class DigitsNet(nn.Module):
    """stem -> residual block -> strided conv (8x8 -> 4x4, width x2) -> residual block -> pool -> fc."""

    def __init__(self, width: int = 32, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        self.block1 = Residual(width)
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(2 * width), nn.ReLU())
        self.block2 = Residual(2 * width)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.down(self.block1(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))


def digits_splits(config: dict = DIGITS) -> tuple[tuple, tuple, tuple]:
    """(train, calibration, test) of ``load_digits``: pixels scaled to [0, 1], a seeded permutation."""
    from sklearn.datasets import load_digits
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(config["seed"]))
    test, train = order[: config["test"]], order[config["test"]:]
    calibration = train[: config["calibration"]]
    return (images[train], labels[train]), (images[calibration], labels[calibration]), \
        (images[test], labels[test])


def accuracy(model: Callable, images: torch.Tensor, labels: torch.Tensor, batch: int = 250) -> float:
    """Top-1 accuracy of ``model`` (any callable returning logits), in batches, without gradients."""
    correct = 0
    with torch.no_grad():
        for i in range(0, len(labels), batch):
            correct += int((model(images[i: i + batch]).argmax(dim=1) == labels[i: i + batch]).sum())
    return correct / len(labels)


def _warmup_cosine(step: int, steps: int) -> float:
    """Linear warm-up over the first 10% of steps, then a cosine decay to zero."""
    warm = max(1, steps // 10)
    return min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))


def train_classifier(model: nn.Module, train: tuple, epochs: int, batch: int, lr: float, seed: int) -> nn.Module:
    """AdamW with warm-up and a cosine schedule, cross-entropy, seeded shuffles; ``model`` is trained in place."""
    images, labels = train
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(labels) / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _warmup_cosine(s, steps))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=gen)
        for i in range(0, len(labels), batch):
            idx = order[i: i + batch]
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def trained_digits_cnn(config: dict = DIGITS) -> Trained:
    """The residual digits CNN, trained (or loaded from the cache) with ``config``."""
    torch.manual_seed(config["seed"])
    train, calibration, test = digits_splits(config)
    model = DigitsNet(config["width"])
    fit = lambda m: train_classifier(m, train, config["epochs"], config["batch"], config["lr"], config["seed"])
    seconds = _cached("digits_cnn", config, model, fit)

    def finetune(m: nn.Module, epochs: int = 1, lr: float = 1e-3) -> nn.Module:
        return train_classifier(m, train, epochs, config["batch"], lr, config["seed"] + 1)

    return Trained("digits_cnn", model.eval(), (test[0][:1],), train, calibration, test, "accuracy",
                   lambda m: accuracy(m, *test), finetune, seconds)


# --- language: a small LLaMA on Python's own documentation ----------------------------------------
LLAMA = {"hidden": 192, "intermediate": 512, "layers": 4, "heads": 6, "kv_heads": 6, "seq": 128,
         "batch": 16, "steps": 300, "lr": 3e-3, "seed": 0, "test_fraction": 0.1, "calibration": 64}


def english_bytes() -> torch.Tensor:
    """The text of ``pydoc_data.topics`` (Python's documentation topics) as UTF-8 bytes, in key order."""
    from pydoc_data.topics import topics
    text = "\n\n".join(topics[k] for k in sorted(topics))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def llama_splits(config: dict = LLAMA) -> tuple[tuple, tuple, tuple]:
    """Byte windows of ``seq + 1`` tokens: (train, calibration, test); the test split is the text's tail."""
    data = english_bytes()
    cut = int(len(data) * (1 - config["test_fraction"]))
    width = config["seq"] + 1
    windows = lambda t: t[: len(t) // width * width].view(-1, width)
    train, test = windows(data[:cut]), windows(data[cut:])
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(config["seed"]))
    return (train,), (train[order[: config["calibration"]]],), (test,)


def llama_model(config: dict = LLAMA) -> nn.Module:
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=config["hidden"],
                                   intermediate_size=config["intermediate"],
                                   num_hidden_layers=config["layers"], num_attention_heads=config["heads"],
                                   num_key_value_heads=config["kv_heads"],
                                   max_position_embeddings=config["seq"], use_cache=False,
                                   tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg)


def logits_of(output: Any) -> torch.Tensor:
    """Logits from an HF output, a tuple (export-level graphs return the output's leaves), or a tensor."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, dict):
        return output["logits"]
    return output[0]


def lm_loss(model: Callable, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy of ``windows`` (``[B, seq + 1]``)."""
    logits = logits_of(model(windows[:, :-1]))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))


def perplexity(model: Callable, windows: torch.Tensor, batch: int = 32) -> float:
    """exp(mean next-byte NLL) over every window, without gradients."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            chunk = windows[i: i + batch]
            total += float(lm_loss(model, chunk)) * chunk.numel()
            count += chunk.numel()
    return math.exp(total / count)


def train_lm(model: nn.Module, windows: torch.Tensor, steps: int, batch: int, lr: float, seed: int) -> nn.Module:
    """AdamW with warm-up and a cosine schedule, seeded batches of windows; ``model`` is trained in place."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _warmup_cosine(s, steps))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        loss = lm_loss(model, windows[torch.randint(len(windows), (batch,), generator=gen)])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    return model.eval()


def trained_llama(config: dict = LLAMA) -> Trained:
    """The small LLaMA, trained (or loaded from the cache) with ``config``."""
    torch.manual_seed(config["seed"])
    train, calibration, test = llama_splits(config)
    model = llama_model(config)
    fit = lambda m: train_lm(m, train[0], config["steps"], config["batch"], config["lr"], config["seed"])
    seconds = _cached("llama", config, model, fit)

    def finetune(m: nn.Module, epochs: int = 1, lr: float = 1e-3, windows: Optional[int] = None) -> nn.Module:
        """``epochs`` passes over the training split (or its first ``windows`` windows)."""
        data = train[0] if windows is None else train[0][:windows]
        steps = epochs * math.ceil(len(data) / config["batch"])
        return train_lm(m, data, steps, config["batch"], lr, config["seed"] + 1)

    rows = config["batch"]  # an export graph may be specialised to the example's batch: use one size
    test = (test[0][: len(test[0]) // rows * rows],)
    return Trained("llama", model.eval(), (calibration[0][:rows, :-1],), train, calibration, test,
                   "perplexity", lambda m: perplexity(m, test[0], rows), finetune, seconds)


if __name__ == "__main__":
    torch.set_num_threads(1)
    for build in (trained_digits_cnn, trained_llama):
        t = build()
        params = sum(p.numel() for p in t.model.parameters())
        print(f"{t.name}: {params:,} parameters, {t.metric} {t.evaluate(t.model):.4f}, "
              f"trained in {t.train_seconds:.1f} s")
