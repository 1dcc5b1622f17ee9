"""ViT quickstart: a 4-block ViT on scikit-learn's handwritten digits, offline, on 2 cores.

    python -m eb_jax.main --config configs/vit_quickstart.py

The ticket is drawn from gates on the attention heads (per block) and the MLP neurons
(globally), cut out, and retrained (docs/method.md, "ViT tickets"). AdamW with a cosine
schedule after a warm-up, as a ViT is trained; no augmentation. Measured (README): the
ticket emerges after epoch 10 of 40 and retrains to 91.7 % test accuracy at 0.56x the
training FLOPs of the same config with --config.method=dense (92.2 %).
"""

from eb_jax.config import default_config


def get_config():
    config = default_config()
    config.model = "vit_digits"
    config.dataset = "digits"
    config.num_epochs = 40
    config.batch_size = 64
    config.eval_batch_size = 120
    config.optimizer = "adamw"
    config.learning_rate = 2e-3
    config.weight_decay = 0.05
    config.lr_schedule = "cosine"
    config.warmup_epochs = 2
    config.lr_boundaries = ()
    config.label_smoothing = 0.1
    config.sparsity = 1e-4
    # Per block, floor(4 x 0.7) = 2 of the 4 heads go; 70 % of the MLP neurons globally.
    config.prune_ratio = 0.7
    config.log_every_steps = 0  # epochs are short: one line per epoch
    config.grid_ratios = (0.3, 0.5)
    config.grid_ticket_epochs = (2, 5, 10)
    return config
