"""ResNet-50 on ImageNet (imagenet2012): the paper's protocol (docs/method.md).

    python -m eb_jax.main --config configs/resnet50_imagenet.py --config.data_dir=DIR

90 epochs, batch 256, SGD momentum 0.9, weight decay 1e-4, lr 0.1 x0.1 at epochs 30 and
60, BN-scale sparsity 1e-4 while searching only (the original's ResNet-50 retraining
script drops it). Needs imagenet2012 prepared in DIR (see the README).
"""

from eb_jax.config import default_config


def get_config():
    config = default_config()
    config.model = "resnet50"
    config.dataset = "imagenet2012"
    config.num_epochs = 90
    config.lr_boundaries = (30, 60)
    return config
