"""``recalibrate-batchnorm``: re-estimate every BatchNorm's running statistics on calibration data.

After pruning, each BatchNorm still holds the mean and variance it measured on the unpruned network,
although its input changed (fewer channels upstream). This pass runs the pruned graph on the calibration
batches — at the fx level ``nn.BatchNorm*`` modules, at the export level ``aten.batch_norm`` /
``_native_batch_norm_legit_no_training`` reading their buffers — and writes the population mean and
unbiased variance of each BatchNorm's input into a copy of the graph (see
:func:`fxprune.data.recovery.recalibrate_batchnorm`). The input graph is left as it was. Needs no source:
it runs on any captured graph with BatchNorms, pruned or not.

>>> from fxprune.passes import RecalibrateBatchNorm
>>> new = RecalibrateBatchNorm().with_calibration(loader)(gm).graph_module        # doctest: +SKIP
>>> Pipeline.parse("prune-channels{sparsity=0.5},recalibrate-batchnorm")(gm, calibration=loader)  # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass
from fxprune.passes.pipeline import register
from fxprune.passes.recovery_data import RecoveryPass


@register
@dataclass(frozen=True)
class RecalibrateBatchNorm(RecoveryPass):
    """Running statistics of every BatchNorm, re-measured on the (pruned) graph's calibration inputs."""

    name = "recalibrate-batchnorm"
