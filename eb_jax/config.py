"""Shared configuration defaults and the checks every run's config must pass.

Config files in `configs/` start from `default_config()` and override what differs.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os

import ml_collections

from eb_jax import lowp, methods, names
from eb_jax.checkpoint import CheckpointError, jsonable
from eb_jax.data import DATASETS, DataError, dali
from eb_jax.models import MODELS, ViT, custom
from eb_jax.runlog import write_json
from eb_jax.ticket import EarlyBirdDetector


class ConfigError(ValueError):
    """A config value that cannot work; the message says which and how to fix it."""


def default_config() -> ml_collections.ConfigDict:
    """The paper's CIFAR search protocol (docs/method.md) on VGG16."""
    c = ml_collections.ConfigDict()
    c.model = "vgg16"  # a name in eb_jax.models.MODELS
    c.dataset = "cifar10"  # a name in eb_jax.data.DATASETS
    c.data_dir = ""  # TFDS data_dir; '' = TFDS's default ($TFDS_DATA_DIR or ~/tensorflow_datasets)
    c.num_epochs = 160
    c.batch_size = 256  # global, over all devices and hosts
    c.eval_batch_size = 256
    c.learning_rate = 0.1
    c.lr_boundaries = (80, 120)  # epochs at whose start lr *= lr_decay
    c.lr_decay = 0.1
    c.momentum = 0.9  # PyTorch SGD semantics, no Nesterov
    c.weight_decay = 1e-4  # on all parameters, BN included, as in the original
    c.sparsity = 1e-4  # s: s*sign(scale) added to every BN scale gradient in the stages
    # named in sparsity_stages; 0 disables
    c.sparsity_stages = ("search",)  # of 'dense', 'search', 'retrain', 'masked', 'soft'
    # The search stage's own LR schedule (the paper's Table 1 searches on [0.01, x0.1 at 100]
    # and retrains every ticket on one common schedule); learning_rate 0: the run's schedule
    c.search_lr = ml_collections.ConfigDict(
        {"learning_rate": 0.0, "lr_boundaries": (), "lr_decay": 0.1}
    )
    c.seed = 0
    _optimizer_fields(c)
    _method_fields(c)
    _number_format_fields(c)
    _runtime_fields(c)
    return c


def _optimizer_fields(c: ml_collections.ConfigDict) -> None:
    """Beyond the paper's SGD and step schedule: the transformer recipe's choices."""
    c.optimizer = "sgd"  # or 'adamw' (weight_decay x learning rate; kernels only)
    c.adam_betas = (0.9, 0.999)
    c.grad_clip_norm = 0.0  # 'adamw': clip the global gradient norm; 0: off
    c.lr_schedule = "step"  # 'step' (lr_boundaries, lr_decay) or 'cosine' (to 0 at num_epochs)
    c.warmup_epochs = 0  # 'cosine': linear warm-up from 0 over these epochs
    c.label_smoothing = 0.0


def _method_fields(c: ml_collections.ConfigDict) -> None:
    """The method, its ticket and its pruning."""
    # The method (docs/method.md). 'eb': EB Train, search until the ticket emerges, cut,
    # retrain to num_epochs. 'ns': network slimming, search all num_epochs, cut, fine-tune
    # (inherit) for another num_epochs. 'lt': one-shot lottery ticket: train, prune, rewind
    # to initialisation, train again (lt_granularity). 'thinet': train, prune each layer by
    # the next layer's reconstruction, fine-tune. 'snip': prune weights at initialisation
    # by connection sensitivity, train. 'sfp': train zeroing the weakest filters after
    # every epoch, then cut them. 'dense': standard training, no pruning.
    c.method = "eb"
    c.prune_ratio = 0.5  # p: the fraction of channels (or weights: 'snip', 'lt' weights)
    # pruned: over the whole network for BN-scale tickets and weights, per layer for
    # 'thinet' and 'sfp'
    c.monitor_ratios = (0.3, 0.5, 0.7)  # detectors run side by side (prune_ratio added)
    c.eb_window = 5  # masks (code rule) or consecutive distances (paper rule) compared
    c.eb_eps = 0.1  # emerged when the distances are <= eps (code) / < eps (paper)
    c.eb_rule = "code"  # 'code': the released code's rule; 'paper': the paper's
    c.keep_searching = False  # 'eb': search to num_epochs recording every mask (paper
    # Fig. 3), then stop without cutting
    c.ticket_epoch = 0  # 'eb': draw the ticket after this many epochs (Fig. 1); 0: detect
    # Cutting the ticket and retraining it (docs/method.md).
    # 'eb' only ('ns' inherits, 'lt' rewinds): 'inherit' (EB Train FF), 'reinit' (fresh
    # init) or 'rewind' (kept channels at initialisation)
    c.retrain = "inherit"
    # 'eb' only: 'continue' retrains from the ticket's epoch to num_epochs on the ongoing
    # LR schedule (EB Train FF); 'fresh' trains num_epochs more on a new schedule (the
    # paper's EB Train re-init row: retrain='reinit', retrain_schedule='fresh')
    c.retrain_schedule = "continue"
    c.lt_granularity = "channels"  # 'lt': 'channels' (network slimming's ticket, rewound)
    # or 'weights' (Frankle & Carbin: global weight magnitude, unstructured; the paper's)
    c.thinet_images = 128  # 'thinet': training images sampled (seeded) per layer
    c.thinet_locations = 10  # 'thinet': random (channel, position) samples per image
    c.snip_batches = 1  # 'snip': training batches the sensitivity is averaged over
    # python -m eb_jax.experiments: the prune ratios of its grids (--ratios overrides), and
    # the ticket epochs of Fig. 1/2/5; () = 1/16, 1/8, 1/4, 1/2, 3/4 and all of num_epochs
    c.grid_ratios = (0.3, 0.5, 0.7)
    c.grid_ticket_epochs = ()
    c.min_channels = 1  # no layer ends empty: its largest-|scale| channels stay
    c.round_to = 0  # round kept counts up to a multiple (8 GPU, 128 TPU); 0: off
    c.prune_residual = False  # ResNet-18/50: prune the residual widths too


def _number_format_fields(c: ml_collections.ConfigDict) -> None:
    # Number formats (docs/method.md): 'fp32'; 'bf16' (bf16 compute, fp32 weights and BN
    # statistics: TPU/GPU speed); 'bfp8' (8-bit block floating point: weights, activations,
    # errors, gradients, momentum, word lengths in `bfp`). 'search' covers every stage
    # before the pruning step ('dense' training too), 'retrain' every stage after it. The
    # paper's LF: search 'bfp8', retrain 'fp32'; LL: both 'bfp8'.
    c.precision = ml_collections.ConfigDict({"search": "fp32", "retrain": "fp32"})
    c.bfp = ml_collections.ConfigDict(
        {
            "weight_bits": 8,
            "activation_bits": 8,
            "error_bits": 8,
            "gradient_bits": 8,
            "momentum_bits": 8,
            "rounding": "stochastic",
        }  # or 'nearest'
    )
    # Stochastic weight averaging (SWALP): the weights averaged at the end of every epoch
    # from this epoch of the final stage's schedule on, BN statistics recomputed for the
    # average, which is the run's final model (the paper: 140 of 160). 0: off.
    c.swa_start_epoch = 0


def _runtime_fields(c: ml_collections.ConfigDict) -> None:
    """Where and how the run executes: hosts, kernels, logs, checkpoints, data loading."""
    # Several processes (hosts) in one run through jax.distributed (README: multi-host).
    # coordinator_address 'host:port' with num_processes and this process's process_id;
    # or auto=True for the platform's own detection (Cloud TPU pod slices, SLURM).
    c.distributed = ml_collections.ConfigDict(
        {"coordinator_address": "", "num_processes": 1, "process_id": 0, "auto": False}
    )
    c.conv_impl = "auto"  # 'auto' (fast path picked per backend), 'xla' or 'patches'
    c.cpu_xla_flags = True  # XLA's Eigen convolution on CPU (eb_jax.platform)
    c.reuse_host_memory = True  # glibc keeps freed host memory for the next step (platform)
    c.log_every_steps = 100  # progress lines within an epoch
    c.write_plots = True  # each run's PNGs: mask_distance.png and cost.png
    c.checkpoint_every_steps = 1000  # plus one at every epoch end; 0: epoch ends only
    c.checkpoints_to_keep = 3
    c.energy_sample_seconds = 5.0  # energy counters read this often (RAPL wraps; README)
    c.async_checkpoints = True
    c.num_data_threads = 4  # threads preparing batches (in each worker process, if any)
    # Processes decoding + augmenting per-example datasets (ImageNet); -1: one per core
    # this process may use, less one for the training loop; 0: in the threads.
    c.num_data_workers = -1
    # Who decodes JPEG datasets (ImageNet): 'grain' (Pillow in num_data_workers host
    # processes) or 'dali' (NVIDIA DALI on the GPUs, requirements-gpu.txt; grain still
    # reads the records). In-memory datasets (digits, CIFAR) take 'grain'.
    c.input_backend = "grain"


# Every field of default_config(), classified once (tests/test_config.py fails on a field
# that is not). TRAJECTORY: what the run computes, bit for bit: a resume with other values
# is refused, and an experiment grid reuses a finished run only where they all match.
# GROWABLE: num_epochs may grow when a run resumes: it trains on as a run started with
# the larger value would have (refused under lr_schedule='cosine', which num_epochs
# shapes). FREE: where and how fast the run executes, and what a grid runs; free to change.
TRAJECTORY_FIELDS = (
    # the network, data and optimisation
    "model", "dataset", "batch_size", "seed", "learning_rate", "lr_boundaries", "lr_decay",
    "search_lr", "momentum", "weight_decay", "sparsity", "sparsity_stages", "optimizer",
    "adam_betas", "grad_clip_norm", "lr_schedule", "warmup_epochs", "label_smoothing",
    # the method and its ticket
    "method", "prune_ratio", "monitor_ratios", "eb_window", "eb_eps", "eb_rule",
    "keep_searching", "ticket_epoch", "retrain", "retrain_schedule", "lt_granularity",
    "thinet_images", "thinet_locations", "snip_batches", "min_channels", "round_to",
    "prune_residual", "precision", "bfp", "swa_start_epoch",
    # the numbers' path: the convolution code, the decoder, and the steps at which the
    # devices' BN statistics are averaged (every checkpoint)
    "conv_impl", "cpu_xla_flags", "input_backend", "checkpoint_every_steps",
)  # fmt: skip
GROWABLE_FIELDS = ("num_epochs",)
FREE_FIELDS = (
    "data_dir", "eval_batch_size", "grid_ratios", "grid_ticket_epochs", "distributed",
    "reuse_host_memory", "log_every_steps", "write_plots", "checkpoints_to_keep",
    "energy_sample_seconds", "async_checkpoints", "num_data_threads", "num_data_workers",
)  # fmt: skip


def config_record(config) -> dict:
    """The trajectory-defining fields and num_epochs as JSON values, and their hash:
    what checkpoints and report.json record of the config."""
    fields = {k: jsonable(config[k]) for k in TRAJECTORY_FIELDS + GROWABLE_FIELDS if k in config}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    return {"fields": fields, "hash": digest}


def config_differences(config, recorded: dict, fields=TRAJECTORY_FIELDS) -> list[str]:
    """'field: VALUE there, VALUE now' for each of `fields` where `config` differs from a
    run's recorded fields (a field newer than the run counts as its default there)."""
    now, default = (config_record(c)["fields"] for c in (config, default_config()))
    there = {k: recorded.get(k, default.get(k)) for k in fields}
    differ = [k for k in fields if there[k] != now.get(k)]
    return [f"{k}: {there[k]!r} there, {now.get(k)!r} now" for k in differ]


def check_resumable(config, record: dict, workdir: str) -> None:
    """CheckpointError unless `config` may resume the run whose checkpoint's JSON record
    is `record`: the same trajectory fields, and num_epochs the same or (step LR
    schedule) larger."""
    diffs = config_differences(config, record["config"]["fields"])
    before = record["config"]["fields"].get("num_epochs", config.num_epochs)
    if config.num_epochs < before:
        diffs.append(f"num_epochs: {before} there, {config.num_epochs} now (it may only grow)")
    elif config.num_epochs > before and config.lr_schedule == "cosine":
        diffs.append(
            f"num_epochs: {before} there, {config.num_epochs} now (the cosine schedule spans "
            "num_epochs: it cannot grow)"
        )
    if diffs:
        raise CheckpointError(
            f"{workdir} holds a run with a different config ({'; '.join(diffs)}); resume "
            "with the same values or start a new run with another --workdir"
        )


def write_config(config, workdir: str) -> None:
    """WORKDIR/config.json: the run's whole resolved config (written as the run starts)."""
    write_json(os.path.join(workdir, "config.json"), jsonable(config.to_dict()), indent=1)


CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load_config(name_or_path: str, **overrides) -> ml_collections.ConfigDict:
    """`get_config()` of a config file, by path or by name in configs/ ('quickstart'),
    with `overrides` applied: the notebook and script counterpart of --config."""
    path = name_or_path
    if not os.path.exists(path):
        path = os.path.join(CONFIGS_DIR, os.path.basename(name_or_path).removesuffix(".py") + ".py")
    if not os.path.exists(path):
        raise ConfigError(f"no config file {name_or_path!r} (looked in {CONFIGS_DIR} too)")
    spec = importlib.util.spec_from_file_location(f"eb_jax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"the config file {path} has no get_config() function")
    config = module.get_config()
    unknown = sorted(set(overrides) - set(config.keys()))
    if unknown:
        raise ConfigError(f"the config has no field(s) {', '.join(unknown)}")
    config.update(overrides)
    return config


def stage_precision(config, after_prune: bool) -> lowp.Precision:
    """The number format of a stage before (precision.search) or after (precision.retrain)
    the method's pruning step."""
    name = config.precision.retrain if after_prune else config.precision.search
    b = config.bfp
    fmt = lowp.BFPFormat(
        b.weight_bits,
        b.activation_bits,
        b.error_bits,
        b.gradient_bits,
        b.momentum_bits,
        stochastic=b.rounding == "stochastic",
    )
    return lowp.Precision(name, fmt)


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raises ConfigError for values no run can use (`num_devices`: over all processes)."""
    for field in ("batch_size", "eval_batch_size"):
        value = config[field]
        if value <= 0 or value % num_devices:
            raise ConfigError(
                f"{field}={value} must be a positive multiple of the {num_devices} devices; "
                f"set --config.{field}={max(num_devices, value // num_devices * num_devices)}"
            )
    if config.num_epochs <= 0:
        raise ConfigError(f"num_epochs={config.num_epochs} must be positive")
    if list(config.lr_boundaries) != sorted(config.lr_boundaries):
        raise ConfigError(f"lr_boundaries={tuple(config.lr_boundaries)} must be ascending epochs")
    if config.learning_rate <= 0:
        raise ConfigError(f"learning_rate={config.learning_rate} must be positive")
    search = config.search_lr
    if search.learning_rate < 0 or list(search.lr_boundaries) != sorted(search.lr_boundaries):
        raise ConfigError(
            f"search_lr: learning_rate={search.learning_rate} must be >= 0 (0: the run's "
            f"schedule) and lr_boundaries={tuple(search.lr_boundaries)} ascending epochs"
        )
    if config.sparsity < 0 or config.weight_decay < 0:
        raise ConfigError("sparsity and weight_decay must be >= 0")
    if config.num_data_workers < -1 or config.num_data_threads < 1:
        raise ConfigError(
            "num_data_workers must be -1 (one per core), 0 (none) or a count, and "
            "num_data_threads >= 1"
        )
    _check_input_backend(config)
    if config.checkpoints_to_keep < 1 or config.checkpoint_every_steps < 0:
        raise ConfigError("checkpoints_to_keep must be >= 1 and checkpoint_every_steps >= 0")
    if not config.energy_sample_seconds > 0:
        raise ConfigError(f"energy_sample_seconds={config.energy_sample_seconds} must be > 0")
    _check_method(config)
    _check_number_formats(config)
    _check_optimizer(config)
    _check_model(config)
    try:
        methods.check(config)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_input_backend(config) -> None:
    if config.input_backend not in names.INPUT_BACKENDS:
        raise ConfigError(
            f"input_backend={config.input_backend!r} must be one of {names.INPUT_BACKENDS}"
        )
    if config.input_backend == names.DALI and config.dataset in DATASETS:
        try:
            dali.check_backend(DATASETS[config.dataset])
        except DataError as e:
            raise ConfigError(str(e)) from None


def _check_method(config) -> None:
    choices = {
        "method": names.METHODS,
        "retrain": names.RETRAIN_MODES,
        "retrain_schedule": names.SCHEDULES,
        "lt_granularity": names.GRANULARITIES,
    }
    for field, allowed in choices.items():
        if config[field] not in allowed:
            raise ConfigError(f"{field}={config[field]!r} must be one of {allowed}")
    for ratio in (config.prune_ratio, *config.monitor_ratios):
        if not 0 <= ratio < 1:
            raise ConfigError(f"prune ratio {ratio} must be in [0, 1), e.g. 0.5")
    if not 0 <= config.ticket_epoch <= config.num_epochs:
        raise ConfigError(
            f"ticket_epoch={config.ticket_epoch} must be in [0, num_epochs={config.num_epochs}] "
            "(0: detect the ticket)"
        )
    if config.min_channels < 1 or config.round_to < 0:
        raise ConfigError("min_channels must be >= 1 and round_to >= 0")
    try:
        EarlyBirdDetector(config.eb_window, config.eb_eps, config.eb_rule)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for field in ("thinet_images", "thinet_locations", "snip_batches"):
        if config[field] < 1:
            raise ConfigError(f"{field}={config[field]} must be >= 1")


def _check_number_formats(config) -> None:
    for stage in ("search", "retrain"):
        if config.precision[stage] not in lowp.PRECISIONS:
            raise ConfigError(
                f"precision.{stage}={config.precision[stage]!r} must be one of {lowp.PRECISIONS}"
            )
    if config.bfp.rounding not in ("stochastic", "nearest"):
        raise ConfigError(f"bfp.rounding={config.bfp.rounding!r} must be 'stochastic' or 'nearest'")
    try:
        stage_precision(config, after_prune=False)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not 0 <= config.swa_start_epoch < config.num_epochs:
        raise ConfigError(
            f"swa_start_epoch={config.swa_start_epoch} must be in [0, num_epochs) (0: no SWA)"
        )


def _check_optimizer(config) -> None:
    choices = {"optimizer": ("sgd", "adamw"), "lr_schedule": ("step", "cosine")}
    for field, allowed in choices.items():
        if config[field] not in allowed:
            raise ConfigError(f"{field}={config[field]!r} must be one of {allowed}")
    if not 0 <= config.warmup_epochs < config.num_epochs:
        raise ConfigError(f"warmup_epochs={config.warmup_epochs} must be in [0, num_epochs)")
    if not 0 <= config.label_smoothing < 1 or config.grad_clip_norm < 0:
        raise ConfigError("label_smoothing must be in [0, 1) and grad_clip_norm >= 0")
    quantized = "bfp8" in (config.precision.search, config.precision.retrain)
    if config.optimizer == "adamw" and quantized:
        raise ConfigError("precision 'bfp8' quantises SGD's momentum; use optimizer='sgd'")


def _check_model(config) -> None:
    reason = model_refuses(config)
    if reason:
        raise ConfigError(reason)


def model_refuses(config) -> str | None:
    """Why the config's model cannot run it, or None: a ViT takes no bfp8 (it quantises
    conv activations) and no conv-filter criterion (ThiNet, SFP); nor does a factory's."""
    if custom.is_custom(config.model):
        return _custom_refuses(config)
    model = MODELS.get(config.model)
    if not (isinstance(model, functools.partial) and issubclass(model.func, ViT)):
        return None
    if "bfp8" in (config.precision.search, config.precision.retrain):
        return f"model {config.model!r} takes precision 'fp32' or 'bf16', not 'bfp8'"
    if config.method in (names.THINET, names.SFP):
        return f"method {config.method!r} prunes conv filters; a ViT runs eb, ns, lt, snip, dense"
    return None


def _custom_refuses(config) -> str | None:
    """Why a factory's model ('package.module:Factory') cannot run the config, or None."""
    try:
        custom.resolve(config.model)
    except ValueError as e:
        return str(e)
    if config.method in (names.THINET, names.SFP):
        return (
            f"method {config.method!r} needs the layer each conv's filters feed, declared only "
            f"for the built-in models; {config.model!r} runs eb, ns, lt, snip, dense"
        )
    precisions = (config.precision.search, config.precision.retrain)
    if "bfp8" in precisions:
        return f"model {config.model!r} takes precision 'fp32' or 'bf16', not 'bfp8'"
    if "bf16" in precisions and not custom.takes_dtype(config.model):
        return f"precision 'bf16' needs a `dtype` argument of {config.model!r}; it takes none"
    return None
