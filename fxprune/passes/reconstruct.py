"""``reconstruct``: refit each consumer of a dropped channel so its output matches the original's.

For every conv2d (ungrouped, zero-padded) and linear layer that lost input channels, in graph order:
least-squares weights and bias over its kept inputs, ``W = C (G + λD)⁻¹``, where ``G`` is the Gram
matrix of the inputs the *pruned* model produces at that layer (earlier layers already refitted, so
each layer corrects the error upstream of it) and ``C`` the cross moments with the *original* layer's
output on the same calibration batches; float64, ``λ = ridge · mean(diag G)``. A Gram matrix that the
requested ridge cannot invert falls back to more ridge with a ``RecoveryWarning`` naming the layer;
layers it cannot refit (grouped or transposed convs, shared weights) are listed in the report with the
reason. The report gives each layer's relative output error before and after
(see :func:`fxprune.data.recovery.reconstruct`).

The pass needs the graph before pruning: in a pipeline it is the input of the last pruning pass;
directly, ``Reconstruct().with_calibration(loader, source=original_gm)``.

>>> Pipeline.parse("prune-channels{sparsity=0.5},reconstruct{ridge=0.01},recalibrate-batchnorm")(
...     gm, calibration=loader)                                                    # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass

from fxprune.data.recovery import check_ridge
from fxprune.passes.pipeline import register
from fxprune.passes.recovery_data import RecoveryPass


@register
@dataclass(frozen=True)
class Reconstruct(RecoveryPass):
    """Consumers of dropped channels refitted by ridge least squares to the original's outputs."""

    name = "reconstruct"

    ridge: float = 1e-3
    """Damping ``λ / mean(diag G)`` of the normal equations (0: none; a singular Gram then falls back)."""

    def validate(self) -> None:
        check_ridge(self.ridge, self.name)
