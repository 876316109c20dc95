"""Baselines of the GSM paper as optax transforms and pytree functions.

One-shot and iterative magnitude pruning with masked fine-tuning (Han et al.
2015), gradual magnitude pruning (Zhu & Gupta 2017), ADMM weight pruning
(Zhang et al. 2018) and lottery tickets (Frankle & Carbin 2019).

The transforms (`keep_masked`, `gradual_magnitude_pruning`, `add_admm_penalty`)
are `optax.GradientTransformationExtraArgs`: they ignore the extra keyword
arguments of `optax.chain`, accept abstract params at `init` and work with
`optax.tree_utils.tree_map_params`.
"""

from gsm_optax.baselines.admm import LENET5_ADMM_SETTING
from gsm_optax.baselines.admm import AddADMMPenaltyState
from gsm_optax.baselines.admm import ADMMSetting
from gsm_optax.baselines.admm import ADMMState
from gsm_optax.baselines.admm import add_admm_penalty
from gsm_optax.baselines.admm import admm_dual_update
from gsm_optax.baselines.admm import admm_hard_prune
from gsm_optax.baselines.admm import admm_init
from gsm_optax.baselines.admm import admm_penalty_grads
from gsm_optax.baselines.admm import admm_penalty_loss
from gsm_optax.baselines.admm import admm_project
from gsm_optax.baselines.admm import admm_step
from gsm_optax.baselines.gmp import GradualMagnitudePruningState
from gsm_optax.baselines.gmp import gmp_sparsity_schedule
from gsm_optax.baselines.gmp import gradual_magnitude_pruning
from gsm_optax.baselines.magnitude import KeepMaskedState
from gsm_optax.baselines.magnitude import iterative_compression_schedule
from gsm_optax.baselines.magnitude import keep_masked
from gsm_optax.baselines.magnitude import layer_keep_counts_from_density
from gsm_optax.baselines.magnitude import layerwise_magnitude_mask
from gsm_optax.baselines.magnitude import magnitude_prune
from gsm_optax.baselines.magnitude import masked_update
from gsm_optax.baselines.magnitude import topk_mask
from gsm_optax.baselines.tickets import apply_ticket
from gsm_optax.baselines.tickets import ticket_mask

__all__ = [
  "ADMMSetting",
  "ADMMState",
  "AddADMMPenaltyState",
  "GradualMagnitudePruningState",
  "KeepMaskedState",
  "LENET5_ADMM_SETTING",
  "add_admm_penalty",
  "admm_dual_update",
  "admm_hard_prune",
  "admm_init",
  "admm_penalty_grads",
  "admm_penalty_loss",
  "admm_project",
  "admm_step",
  "apply_ticket",
  "gmp_sparsity_schedule",
  "gradual_magnitude_pruning",
  "iterative_compression_schedule",
  "keep_masked",
  "layer_keep_counts_from_density",
  "layerwise_magnitude_mask",
  "magnitude_prune",
  "masked_update",
  "ticket_mask",
  "topk_mask",
]
