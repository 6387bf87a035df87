"""The ``gm.meta`` keys fxprune writes on the GraphModules it returns, declared once.

A pass hands the next one what it cannot recompute (a plan, a report) through ``gm.meta``; a
GraphModule copied by ``fx.GraphModule(root, graph)`` keeps them.

>>> from fxprune.core.meta import PRUNED_PLAN_KEY
>>> PRUNED_PLAN_KEY
'fxprune_pruned_plan'
"""

#: The plan (JSON) of the masks that ``mask-channels`` inserted, for ``materialize`` to apply.
PLAN_KEY = "fxprune_plan"
#: The plan (JSON) a pruning pass applied, so the recovery passes can map layers back to the original.
PRUNED_PLAN_KEY = "fxprune_pruned_plan"
#: The :class:`~fxprune.data.recovery.RecoveryReport` of every recovery pass run so far, in order.
REPORTS_KEY = "fxprune_recovery"
