"""Expert placement: which logical expert each physical slot of an engine serves, and how to choose it.

``placement`` holds :class:`Placement` (``phy2log [L, P]``); ``policies`` computes balanced ones from
expert loads (``rebalance``: DeepSeek's EPLB, vectorized, and a better default); ``loop`` is DeepSeek's
algorithm written the plain way, the reference the vectorized one must equal; ``metrics`` measures a
placement against its load (per-GPU and per-node loads, lower bounds); ``stats`` keeps the engines'
load statistics (a sliding window folded onto logical experts) and checks loads; ``stability``
relabels a new placement so experts stay where they were.
"""

from planners.eplb.metrics import BalanceReport, balance_report, replication_bound
from planners.eplb.placement import EnginePlacements, Placement
from planners.eplb.policies import POLICIES, gpu_loads, rebalance
from planners.eplb.stats import EngineLoadWindows, ExpertLoadWindow, check_load, synthetic_load
from planners.errors import EplbError, PlacementError

__all__ = ["Placement", "EnginePlacements", "rebalance", "POLICIES", "gpu_loads", "BalanceReport", "balance_report", "replication_bound",
           "ExpertLoadWindow", "EngineLoadWindows", "check_load", "synthetic_load", "EplbError", "PlacementError"]
