"""gsm_optax: Global Sparse Momentum SGD (Ding et al., NeurIPS 2019) for optax."""

from gsm_optax import baselines
from gsm_optax._pool import default_pool
from gsm_optax._pool import keep_count
from gsm_optax._pool import pool_size
from gsm_optax._pool import resolve_pool
from gsm_optax.adam import GsmAdamWState
from gsm_optax.adam import budget_shrink_rate
from gsm_optax.adam import gsm_adamw
from gsm_optax.adam import gsm_channel_groups_adamw
from gsm_optax.adam import gsm_channels_adamw
from gsm_optax.adam import gsm_nm_adamw
from gsm_optax.diagnostics import MaskOverlap
from gsm_optax.diagnostics import mask_overlap
from gsm_optax.diagnostics import passive_decay
from gsm_optax.diagnostics import taylor_mask
from gsm_optax.export import load_sparse
from gsm_optax.export import nm_compress
from gsm_optax.export import nm_decompress
from gsm_optax.export import nm_storage_bytes
from gsm_optax.export import save_sparse
from gsm_optax.export import sparse_dense
from gsm_optax.export import to_bcoo
from gsm_optax.groups import ChannelGroupReport
from gsm_optax.groups import ChannelSlice
from gsm_optax.groups import GroupChannels
from gsm_optax.groups import channel_group_mask
from gsm_optax.groups import channel_group_report
from gsm_optax.groups import group_pool
from gsm_optax.groups import group_selector
from gsm_optax.groups import gsm_channel_groups
from gsm_optax.groups import mask_by_global_group_taylor
from gsm_optax.groups import prune_channel_groups
from gsm_optax.groups import resolve_groups
from gsm_optax.passive import ShrinkPassiveState
from gsm_optax.passive import gsm_channel_groups_sgd_shrink
from gsm_optax.passive import gsm_channels_sgd_shrink
from gsm_optax.passive import gsm_nm_sgd_shrink
from gsm_optax.passive import gsm_sgd_shrink
from gsm_optax.passive import shrink_passive
from gsm_optax.passive import shrink_passive_with
from gsm_optax.paths import key_path_name
from gsm_optax.paths import path_pool
from gsm_optax.pruning import apply_mask
from gsm_optax.pruning import global_magnitude_mask
from gsm_optax.pruning import prune
from gsm_optax.report import LeafSparsity
from gsm_optax.report import SparsityReport
from gsm_optax.report import sparsity_report
from gsm_optax.selection import global_kth_largest
from gsm_optax.selection import global_kth_largest_magnitude
from gsm_optax.structured import CHANNEL_SCORES
from gsm_optax.structured import ChannelReport
from gsm_optax.structured import LeafChannels
from gsm_optax.structured import LeafNM
from gsm_optax.structured import MaskByGlobalChannelTaylorState
from gsm_optax.structured import MaskByNMTaylorState
from gsm_optax.structured import NMReport
from gsm_optax.structured import channel_report
from gsm_optax.structured import channel_selector
from gsm_optax.structured import channel_stats
from gsm_optax.structured import global_channel_mask
from gsm_optax.structured import gsm_channels
from gsm_optax.structured import gsm_nm
from gsm_optax.structured import mask_by_global_channel_taylor
from gsm_optax.structured import mask_by_nm_taylor
from gsm_optax.structured import nm_mask
from gsm_optax.structured import nm_report
from gsm_optax.structured import nm_selector
from gsm_optax.structured import nm_stats
from gsm_optax.structured import prune_channels
from gsm_optax.structured import prune_nm
from gsm_optax.transform import MaskByGlobalTaylorState
from gsm_optax.transform import PassiveAgeDecayState
from gsm_optax.transform import Selector
from gsm_optax.transform import SmoothedTaylorState
from gsm_optax.transform import TaylorStep
from gsm_optax.transform import add_passive_age_decay
from gsm_optax.transform import gsm
from gsm_optax.transform import gsm_stats
from gsm_optax.transform import mask_by_global_taylor
from gsm_optax.transform import mask_transform
from gsm_optax.transform import taylor_selector

__version__ = "0.1.0"

__all__ = [
  "CHANNEL_SCORES",
  "ChannelGroupReport",
  "ChannelReport",
  "ChannelSlice",
  "GroupChannels",
  "GsmAdamWState",
  "LeafChannels",
  "LeafNM",
  "LeafSparsity",
  "MaskByGlobalChannelTaylorState",
  "MaskByGlobalTaylorState",
  "MaskByNMTaylorState",
  "MaskOverlap",
  "NMReport",
  "PassiveAgeDecayState",
  "Selector",
  "ShrinkPassiveState",
  "SmoothedTaylorState",
  "SparsityReport",
  "TaylorStep",
  "add_passive_age_decay",
  "apply_mask",
  "baselines",
  "budget_shrink_rate",
  "channel_group_mask",
  "channel_group_report",
  "channel_report",
  "channel_selector",
  "channel_stats",
  "default_pool",
  "global_channel_mask",
  "global_kth_largest",
  "global_kth_largest_magnitude",
  "global_magnitude_mask",
  "group_pool",
  "group_selector",
  "gsm",
  "gsm_adamw",
  "gsm_channel_groups",
  "gsm_channel_groups_adamw",
  "gsm_channel_groups_sgd_shrink",
  "gsm_channels",
  "gsm_channels_adamw",
  "gsm_channels_sgd_shrink",
  "gsm_nm",
  "gsm_nm_adamw",
  "gsm_nm_sgd_shrink",
  "gsm_sgd_shrink",
  "gsm_stats",
  "keep_count",
  "key_path_name",
  "load_sparse",
  "mask_by_global_channel_taylor",
  "mask_by_global_group_taylor",
  "mask_by_global_taylor",
  "mask_by_nm_taylor",
  "mask_overlap",
  "mask_transform",
  "nm_compress",
  "nm_decompress",
  "nm_mask",
  "nm_report",
  "nm_selector",
  "nm_stats",
  "nm_storage_bytes",
  "passive_decay",
  "path_pool",
  "pool_size",
  "prune",
  "prune_channel_groups",
  "prune_channels",
  "prune_nm",
  "resolve_groups",
  "resolve_pool",
  "save_sparse",
  "shrink_passive",
  "shrink_passive_with",
  "sparse_dense",
  "sparsity_report",
  "taylor_mask",
  "taylor_selector",
  "to_bcoo",
]
