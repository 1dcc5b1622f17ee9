"""ResNet-18 on ImageNet (imagenet2012): the paper's protocol (docs/method.md).

    python -m eb_jax.main --config configs/resnet18_imagenet.py --config.data_dir=DIR

90 epochs, batch 256, SGD momentum 0.9, weight decay 1e-4, lr 0.1 x0.1 at epochs 30 and
60, BN-scale sparsity 1e-4 while searching and, as the original's scripts, while the
ticket retrains. Needs imagenet2012 prepared in DIR (see the README).
"""

from eb_jax.config import default_config


def get_config():
    config = default_config()
    config.model = "resnet18"
    config.dataset = "imagenet2012"
    config.num_epochs = 90
    config.lr_boundaries = (30, 60)
    config.sparsity_stages = ("search", "retrain")  # the original keeps it (main_c.py -sr)
    config.grid_ratios = (0.1, 0.3)  # the paper's Table 3 ratios for ResNet-18
    return config
