"""A small ViT (4x4 patches, 6 blocks, 3 heads, width 192) on CIFAR-10, early-bird ticket.

    python -m eb_jax.main --config configs/vit_tiny_cifar10.py

200 epochs, batch 128, AdamW lr 1e-3, weight decay 0.05 on the kernels and embeddings,
5 warm-up epochs then a cosine decay, label smoothing 0.1; eb_jax's CIFAR augmentation
(4-pixel padded random crop and flip; no RandAugment or mixup). Gate sparsity 1e-4 while
searching (EarlyBERT's).
"""

from eb_jax.config import default_config


def get_config():
    config = default_config()
    config.model = "vit_cifar"
    config.dataset = "cifar10"
    config.num_epochs = 200
    config.batch_size = 128
    config.optimizer = "adamw"
    config.learning_rate = 1e-3
    config.weight_decay = 0.05
    config.lr_schedule = "cosine"
    config.warmup_epochs = 5
    config.lr_boundaries = ()
    config.label_smoothing = 0.1
    config.grid_ratios = (0.3, 0.5, 0.7)
    return config
