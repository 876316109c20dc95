"""ViT on Fashion-MNIST, pruned with GSM + AdamW to C = 10 over the attention and MLP kernels.

Patches of 7 x 7 (16 tokens and a class token) at ``model_size="tiny"`` (2 layers,
64 wide; a few minutes on 2 CPU cores), patches of 4 at "small" (6 layers, 192
wide: one accelerator). The pool is the attention (query, key, value, out) and
MLP kernels; the patch embedding, positions, class token, LayerNorms, biases and
the head stay dense. Every optimizer section is AdamW with warm-up + cosine
(``configs/austen_gpt.py``'s ``adamw_section``); GSM is ``gsm_optax.gsm_adamw``.
"""

import ml_collections

from configs import austen_gpt
from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model = "vit"
  config.model_size = "tiny"
  config.dataset = "fashion_mnist"
  config.batch_size = 128
  config.compression = 10.0
  section = austen_gpt.adamw_section
  config.dense = section(epochs=6, learning_rate=2e-3, weight_decay=0.05)
  config.gsm = austen_gpt.gsm_section(
    epochs=6, learning_rate=1e-3, weight_decay=0.05, warmup_epochs=0.0
  )
  config.finetune = section(epochs=3, learning_rate=1e-3, weight_decay=0.05, warmup_epochs=0.0)
  config.gmp = section(epochs=3, learning_rate=1e-3, weight_decay=0.05, warmup_epochs=0.0)
  config.gmp.update(update_every_steps=50, initial_sparsity=0.0, layerwise=False)
  config.admm = section(epochs=3, learning_rate=1e-3, weight_decay=0.05, warmup_epochs=0.0)
  config.admm.update(
    steps_per_iteration=468, rho=3e-3, rho_growth=1.3, densities_from=None, densities=None
  )
  return config
