"""The pass library, installed as ``fxprune.passes``: one module per pass, named after it (and
``selection``, the options the two selecting passes share).

Every pass is a frozen dataclass registered by its kebab-case name (see :mod:`fxprune.passes.pipeline`), so it
can be called directly, listed in ``torch.fx.passes.infra.pass_manager.PassManager(passes=[...])``, or
named in a pipeline spec::

    Pipeline.parse("fold-batchnorm,prune-channels{sparsity=0.5},dead-channels")

=====================  ==========================================================================
name                   what it does
=====================  ==========================================================================
prune-channels         one-shot structured pruning (``fxprune.prune``) at a given sparsity
apply-plan             re-apply a saved JSON plan (``fxprune.apply_plan``)
fold-batchnorm         fold eval-mode BatchNorm into the conv / linear before it
dead-channels          drop channels that no output depends on (sliced away, never read)
mask-channels          soft pruning: mask the channels a prune would drop (explicit ``mul`` nodes)
materialize            turn a masked graph into the physically smaller one
recalibrate-batchnorm  re-measure BatchNorm running statistics on calibration data
compensate-bias        add dropped channels' mean contributions to their consumers' biases
reconstruct            refit consumers of dropped channels to the original's outputs (least squares)
drop-blocks            remove whole residual blocks (decoder layers, ResNet/ViT blocks), scored on data
drop-experts           remove whole MoE experts with their router rows (lanes or stacked experts)
=====================  ==========================================================================

The three recovery passes read calibration data given when the pipeline runs:
``Pipeline.parse("prune-channels{sparsity=0.5},reconstruct")(gm, calibration=loader)``.
"""
from fxprune.passes.apply_plan import ApplyPlan
from fxprune.passes.compensate_bias import CompensateBias
from fxprune.passes.dead_channels import DeadChannels
from fxprune.passes.drop_blocks import DropBlocks
from fxprune.passes.drop_experts import DropExperts
from fxprune.passes.fold_batchnorm import FoldBatchNorm
from fxprune.passes.mask_channels import MaskChannels
from fxprune.passes.materialize import Materialize
from fxprune.passes.prune_channels import PruneChannels
from fxprune.passes.recalibrate_batchnorm import RecalibrateBatchNorm
from fxprune.passes.reconstruct import Reconstruct

__all__ = ["ApplyPlan", "CompensateBias", "DeadChannels", "DropBlocks", "DropExperts", "FoldBatchNorm", "MaskChannels", "Materialize",
           "PruneChannels", "RecalibrateBatchNorm", "Reconstruct"]
