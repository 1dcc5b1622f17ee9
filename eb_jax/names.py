"""The names a run is made of, in one leaf module: methods, stages, retrain modes, input
backends.

Config files, checkpoints and report.json hold these strings; code compares against the
constants here, never against bare literals.
"""

from __future__ import annotations

# Methods (config.method); docs/method.md says what each does.
DENSE_METHOD = "dense"
EB = "eb"  # EB Train
NS = "ns"  # network slimming
LT = "lt"  # lottery ticket (one-shot)
THINET = "thinet"
SNIP = "snip"
SFP = "sfp"  # soft filter pruning
METHODS = (EB, NS, LT, THINET, SNIP, SFP, DENSE_METHOD)

# Stages: what one stretch of training trains.
DENSE = "dense"  # the dense network, no ticket drawn
SEARCH = "search"  # the dense network with a ticket drawn from its BN scales every epoch
RETRAIN = "retrain"  # a network cut down to a ticket
MASKED = "masked"  # the dense network with weights held at zero by an unstructured mask
SOFT = "soft"  # the dense network, its weakest filters zeroed after every epoch (SFP)
STAGES = (DENSE, SEARCH, RETRAIN, MASKED, SOFT)

# How a pruned network's weights start training.
INHERIT, REINIT, REWIND = "inherit", "reinit", "rewind"
RETRAIN_MODES = (INHERIT, REINIT, REWIND)

# Where a retraining stage's learning-rate schedule starts.
CONTINUE, FRESH = "continue", "fresh"  # at the ticket's epoch / from epoch 0 again
SCHEDULES = (CONTINUE, FRESH)

# What 'lt' prunes.
CHANNELS, WEIGHTS = "channels", "weights"
GRANULARITIES = (CHANNELS, WEIGHTS)

# Who decodes per-example (JPEG) datasets: grain workers with Pillow on the host, or
# NVIDIA DALI on the GPUs (data/dali.py).
GRAIN, DALI = "grain", "dali"
INPUT_BACKENDS = (GRAIN, DALI)
