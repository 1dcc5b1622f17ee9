"""Every method as data: a declared sequence of phases, training stages and a pruning step.

`method_phases(config)` returns the method's phases; `pipeline.run` walks them and never
asks which method it runs. A new method is one entry in `_DECLARATIONS` plus, if it
prunes in a new way, one criterion in `eb_jax.prune.criteria.REGISTRY`.

A `Stage` trains the network it is handed for its epochs; a `Prune` phase turns the
trained network into the next one: channel criteria give per-BN keep-masks that the
surgery cuts out, weight criteria give an unstructured mask the next stage holds at 0.
"""

from __future__ import annotations

import dataclasses

from eb_jax import names
from eb_jax.prune.criteria import MAGNITUDE, SFP, SNIP, THINET, TICKET, cuts_channels


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stretch of training.

    `name`: what it trains (names.STAGES). `until`: 'schedule' trains to the end of its
    schedule (a search draws its ticket from the final scales); 'ticket' (a search) stops
    when the ticket is drawn: when it emerges, or after config.ticket_epoch epochs
    (config.keep_searching trains on to the end all the same). `schedule`: CONTINUE
    goes on with the run's LR schedule and ends at num_epochs; FRESH starts the schedule
    again at the stage's first step and trains num_epochs more. BN-scale sparsity applies
    where config.sparsity_stages names the stage.
    """

    name: str
    until: str = "schedule"
    schedule: str = names.CONTINUE


@dataclasses.dataclass(frozen=True)
class Prune:
    """The pruning phase: its `criterion` (a name in eb_jax.prune.criteria.REGISTRY), how the
    pruned network's weights start (inherited, re-initialised or rewound to init) and
    the fraction `ratio` it prunes."""

    criterion: str
    start: str = names.INHERIT
    ratio: float = 0.5


def method_phases(config) -> tuple:
    """The declared phases of `config.method` with the config's options applied (its
    Prune prunes config.prune_ratio)."""
    method = config.method
    if method == names.EB:
        if config.keep_searching:  # the whole trajectory for Fig. 3, nothing cut
            return (Stage(names.SEARCH, until="ticket"),)
        phases = (
            Stage(names.SEARCH, until="ticket"),
            Prune(TICKET, config.retrain),
            Stage(names.RETRAIN, schedule=config.retrain_schedule),
        )
    elif method == names.LT and config.lt_granularity == names.WEIGHTS:
        phases = _LT_WEIGHTS
    else:
        phases = _DECLARATIONS[method]
    ratio = config.prune_ratio
    return tuple(dataclasses.replace(s, ratio=ratio) if isinstance(s, Prune) else s for s in phases)


_DECLARATIONS = {
    names.DENSE_METHOD: (Stage(names.DENSE),),
    # Network slimming: search all epochs, cut, fine-tune on a second schedule.
    names.NS: (
        Stage(names.SEARCH),
        Prune(TICKET, names.INHERIT),
        Stage(names.RETRAIN, schedule=names.FRESH),
    ),
    # The structured one-shot lottery ticket: network slimming's ticket, rewound.
    names.LT: (
        Stage(names.SEARCH),
        Prune(TICKET, names.REWIND),
        Stage(names.RETRAIN, schedule=names.FRESH),
    ),
    names.THINET: (
        Stage(names.DENSE),
        Prune(THINET, names.INHERIT),
        Stage(names.RETRAIN, schedule=names.FRESH),
    ),
    names.SNIP: (Prune(SNIP, names.INHERIT), Stage(names.MASKED)),
    # Soft filter pruning ends with the hard cut, evaluated without fine-tuning.
    names.SFP: (Stage(names.SOFT), Prune(SFP, names.INHERIT)),
}

# Frankle & Carbin's one-shot lottery ticket, the paper's LT row.
_LT_WEIGHTS = (
    Stage(names.DENSE),
    Prune(MAGNITUDE, names.REWIND),
    Stage(names.MASKED, schedule=names.FRESH),
)


def stages(phases) -> list[Stage]:
    return [s for s in phases if isinstance(s, Stage)]


def prune_phase(phases) -> Prune | None:
    """The method's Prune phase (each method has at most one), or None."""
    return next((s for s in phases if isinstance(s, Prune)), None)


def draws_tickets(phases) -> bool:
    """Whether a stage searches BN-scale tickets (the run keeps a TicketSearch)."""
    return any(s.name == names.SEARCH for s in stages(phases))


def after_prune(phases, stage: Stage) -> bool:
    """Whether `stage` trains a pruned network (it then runs in precision.retrain)."""
    return phases.index(stage) > next(
        (i for i, s in enumerate(phases) if isinstance(s, Prune)), len(phases)
    )


def final_stage(phases) -> Stage | None:
    """The stage the run's result comes from, or None if a prune step ends the method."""
    return phases[-1] if isinstance(phases[-1], Stage) else None


def check(config) -> None:
    """Raises ValueError for an option the config's method cannot use."""
    method, phases = config.method, method_phases(config)
    only_eb = {
        "keep_searching": config.keep_searching,
        "ticket_epoch": config.ticket_epoch,
        "retrain_schedule": config.retrain_schedule != names.CONTINUE,
    }
    for field, used in only_eb.items():
        if used and method != names.EB:
            raise ValueError(f"{field} applies to method='eb' only, not {method!r}")
    if config.retrain != names.INHERIT and method != names.EB:
        raise ValueError(
            f"retrain={config.retrain!r} applies to method='eb' only ({method!r} fixes how its "
            "pruned network starts); leave retrain='inherit'"
        )
    if config.lt_granularity != names.CHANNELS and method != names.LT:
        raise ValueError(f"lt_granularity applies to method='lt' only, not {method!r}")
    prune = prune_phase(phases)
    channel_cut = prune is not None and cuts_channels(prune.criterion)
    if config.round_to and prune is not None and prune.criterion != TICKET:
        raise ValueError(
            f"round_to widens a BN-scale ticket with the next-largest scales; {method!r} "
            "chooses its channels otherwise: set round_to=0"
        )
    if config.prune_residual and not (channel_cut and prune.criterion == TICKET):
        raise ValueError(
            f"prune_residual applies to methods that cut a BN-scale ticket, not {method!r}"
        )
    if config.swa_start_epoch and final_stage(phases) is None:
        raise ValueError(
            f"swa_start_epoch needs a final training stage; {method!r} ends with a cut"
        )
    if config.search_lr.learning_rate and not draws_tickets(phases):
        raise ValueError(f"search_lr applies to methods with a search stage, not {method!r}")
    if config.swa_start_epoch and config.keep_searching:
        raise ValueError("swa_start_epoch needs a final stage; keep_searching ends with none")
    unknown = set(config.sparsity_stages) - set(names.STAGES)
    if unknown:
        raise ValueError(
            f"sparsity_stages names unknown stage(s) {sorted(unknown)}; choose from {names.STAGES}"
        )
