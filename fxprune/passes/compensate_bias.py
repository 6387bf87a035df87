"""``compensate-bias``: add each dropped channel's mean contribution to its consumer's bias.

A dropped channel ``c`` fed each consumer (conv/linear) ``W[:, c] · x_c``; over the calibration data its
mean is ``W[:, c] · E[x_c]``, measured in the *original* model. This pass adds that mean, summed over
the dropped channels (and a conv's kernel), to the consumer's bias — creating a bias where the layer has
none (fx: the module's ``bias``; export: a new parameter read by the ``aten.conv2d`` / ``aten.linear``
node). Unlike ``propagate_bias`` (:mod:`fxprune.core.bias_folding`), which folds only the constant part a dropped
channel carries (its bias through BatchNorm and activations), this uses the data's means, so a channel
whose activation varies little around a non-zero mean is compensated too. Approximate by nature; the
report gives each layer's bias norm before and after (see :func:`fxprune.data.recovery.compensate_bias`).

The pass needs the graph before pruning: in a pipeline it is the input of the last pruning pass
(``prune-channels``, ``apply-plan``, which record their plan on the graph); directly,
``CompensateBias().with_calibration(loader, source=original_gm)``.

>>> Pipeline.parse("prune-channels{sparsity=0.5},compensate-bias")(gm, calibration=loader)  # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass
from fxprune.passes.pipeline import register
from fxprune.passes.recovery_data import RecoveryPass


@register
@dataclass(frozen=True)
class CompensateBias(RecoveryPass):
    """Dropped channels' mean contributions (from calibration data) folded into the consumers' biases."""

    name = "compensate-bias"
