"""Labels: the three states, the label-missing settings, the observed-label store, label
statistics, the pseudo-label stores (``labels.stores``) and the trainer's background label
traffic (``labels.traffic``).

The names most modules need are re-exported here; the stores and the traffic (torch) are
imported from their own modules.
"""

from .observed import ObservedLabels, SparseColumns, block_rows, save_csr
from .settings import SETTINGS, make_observed, observed_csr, parse_setting
from .states import MISSING, NEG, POS
from .stats import class_prior, label_stats

__all__ = ["MISSING", "NEG", "POS", "SETTINGS", "ObservedLabels", "SparseColumns", "block_rows", "class_prior",
           "label_stats", "make_observed", "observed_csr", "parse_setting", "save_csr"]
