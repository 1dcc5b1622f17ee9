"""ViT-S/16 on ImageNet (imagenet2012) with an early-bird ticket of heads and MLP neurons.

    python -m eb_jax.main --config configs/vit_s16_imagenet.py --config.data_dir=DIR

DeiT-S's recipe (Touvron et al. 2021): 300 epochs, batch 1024, AdamW lr 1e-3 (5e-4 x
1024 / 512), weight decay 0.05 on the kernels and embeddings, 5 warm-up epochs then a
cosine decay, label smoothing 0.1; bf16 compute. Gate sparsity 1e-4 while searching
(EarlyBERT's). Augmentation: eb_jax's random-resized crop and flip only; DeiT's
RandAugment (m9, mstd 0.5), mixup 0.8, CutMix 1.0, random erasing 0.25, repeated
augmentation and stochastic depth 0.1 are not implemented, so expect DeiT-S's 79.8 %
top-1 to be out of reach (a plain ViT-S/16 without them overfits ImageNet-1k).
Needs imagenet2012 prepared in DIR (see the README).
"""

from eb_jax.config import default_config


def get_config():
    config = default_config()
    config.model = "vit_s16"
    config.dataset = "imagenet2012"
    config.num_epochs = 300
    config.batch_size = 1024
    config.eval_batch_size = 1000
    config.optimizer = "adamw"
    config.learning_rate = 1e-3
    config.weight_decay = 0.05
    config.lr_schedule = "cosine"
    config.warmup_epochs = 5
    config.lr_boundaries = ()
    config.label_smoothing = 0.1
    config.precision.search = "bf16"
    config.precision.retrain = "bf16"
    config.prune_ratio = 0.3
    return config
