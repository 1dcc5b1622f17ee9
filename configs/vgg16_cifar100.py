"""VGG16 on CIFAR-100: the paper's search protocol (docs/method.md).

    python -m eb_jax.main --config configs/vgg16_cifar100.py --config.data_dir=DIR

160 epochs, batch 256, SGD momentum 0.9, weight decay 1e-4, lr 0.1 x0.1 at epochs 80
and 120, BN-scale sparsity 1e-4 while searching and, as the original's scripts, while the
ticket retrains. Needs cifar100 prepared in DIR (see the README).
"""

from eb_jax.config import default_config


def get_config():
    config = default_config()
    config.model = "vgg16"
    config.dataset = "cifar100"
    config.sparsity_stages = ("search", "retrain")  # the original keeps it (main_c.py -sr)
    config.grid_ratios = (0.1, 0.3, 0.5)  # the paper's Table 2 ratios for VGG16 on CIFAR-100
    return config
