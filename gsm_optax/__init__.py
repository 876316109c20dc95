"""gsm_optax: Global Sparse Momentum SGD (Ding et al., NeurIPS 2019) for optax."""

from gsm_optax import baselines
from gsm_optax._pool import default_pool
from gsm_optax._pool import keep_count
from gsm_optax._pool import pool_size
from gsm_optax._pool import resolve_pool
from gsm_optax.diagnostics import MaskOverlap
from gsm_optax.diagnostics import mask_overlap
from gsm_optax.diagnostics import passive_decay
from gsm_optax.diagnostics import taylor_mask
from gsm_optax.pruning import apply_mask
from gsm_optax.pruning import global_magnitude_mask
from gsm_optax.pruning import prune
from gsm_optax.report import LeafSparsity
from gsm_optax.report import SparsityReport
from gsm_optax.report import sparsity_report
from gsm_optax.selection import global_kth_largest
from gsm_optax.selection import global_kth_largest_magnitude
from gsm_optax.transform import MaskByGlobalTaylorState
from gsm_optax.transform import PassiveAgeDecayState
from gsm_optax.transform import SmoothedTaylorState
from gsm_optax.transform import add_passive_age_decay
from gsm_optax.transform import gsm
from gsm_optax.transform import gsm_stats
from gsm_optax.transform import mask_by_global_taylor

__version__ = "0.1.0"

__all__ = [
  "LeafSparsity",
  "MaskByGlobalTaylorState",
  "MaskOverlap",
  "PassiveAgeDecayState",
  "SmoothedTaylorState",
  "SparsityReport",
  "add_passive_age_decay",
  "apply_mask",
  "baselines",
  "default_pool",
  "global_kth_largest",
  "global_kth_largest_magnitude",
  "global_magnitude_mask",
  "gsm",
  "gsm_stats",
  "keep_count",
  "mask_by_global_taylor",
  "mask_overlap",
  "passive_decay",
  "pool_size",
  "prune",
  "resolve_pool",
  "sparsity_report",
  "taylor_mask",
]
