"""The pruning-method protocol and its registry: `pruning_method` names one entry here.

A method is a small class with its own settings dataclass (`config_class`, filled from
`PruningArguments.pruning_method_args`). A `hf_tgprune.Pruner` composes it through a few hooks, each given the
pruner (never the Trainer):

- `prune(pruner)`: masks to install before training (`None`: none yet, e.g. a method that prunes later);
- `mask_callback(pruner)`: the callback that enforces the masks during training (default: `GlobalMaskCallback`);
- `callbacks(pruner)`: further callbacks (e.g. one that prunes after a warm-up);
- `compute_loss(pruner, model, inputs)`: the method's own training loss, or `None` for the trainer's (KD or CE);
- `state_dict()` / `load_state_dict(state)` and `resume(pruner, masks)`: what a checkpoint needs to continue a
  half-finished run exactly.

The pruner offers `model`, `teacher`, `args`, `masks`, `report`, `prunable_parameters()`, `min_layer_density()`,
`compute_scores()`, `select_masks()`, `compute_masks()`, `install()`, `set_masks()` and `recalibrate_batchnorm()`.
Add a method with one file:

    @register_method
    class MyMethod(PruningMethod):
        name = "my_method"
        criterion = "snip"

        def prune(self, pruner):
            return pruner.compute_masks()
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from ..core.registry import Registry
from ..core.scoring import get_scoring_method


@dataclasses.dataclass
class MethodConfig:
    """Settings of one pruning method (`pruning_method_args`); subclasses add fields with `help` metadata."""

    @classmethod
    def from_args(cls, args: Mapping[str, Any] | str | None, method: str) -> MethodConfig:
        """Build from a dict, a JSON object string or a `key=value,key=value` string (as on the command line)."""
        values = parse_method_args(args)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(
                f"pruning_method_args {unknown} are not settings of pruning_method={method!r}; its settings are "
                f"{sorted(fields) or 'none'}."
            )
        converted = {}
        for key, value in values.items():
            converted[key] = _convert(value, fields[key].type) if isinstance(value, str) else value
        return cls(**converted)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_method_args(args: Mapping[str, Any] | str | None) -> dict[str, Any]:
    if args is None or args == "":
        return {}
    if isinstance(args, Mapping):
        return dict(args)
    text = args.strip()
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"pruning_method_args is not valid JSON ({err}): {args!r}") from err
    values = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"pruning_method_args must be 'key=value,key=value' or a JSON object, got {args!r}")
        values[key.strip()] = value.strip()
    return values


def _convert(value: str, annotation: Any) -> Any:
    text = str(annotation)
    if value.lower() == "none" and "None" in text:
        return None
    if "bool" in text:
        return value.lower() in ("1", "true", "yes")
    if "int" in text:
        return int(value)
    if "float" in text:
        return float(value)
    return value


class PruningMethod:
    """Base class: a one-shot method (score once, one mask, fixed through training) unless hooks are overridden.

    Class attributes:
        name: the `pruning_method` value.
        criterion: the registered scoring criterion (`hf_tgprune.core.scoring`) that ranks weights; None prunes nothing.
        config_class: the method's settings dataclass.
        own_loss: True when the method trains with its own loss (it then needs no teacher for retraining).
        one_shot: True when the masks are fixed by `prune()` and do not depend on training, so one scoring pass can
            serve several sparsities.
        default_rounds: the scoring rounds (`pruning_rounds`) used when the user leaves it unset; one-shot methods
            only.
        default_allocation: the `layer_allocation` used when the user leaves it unset.
        regrows: True when pruned weights keep receiving gradients and may come back (simulated pruning).
        shardable: True when a method whose masks change during training runs on weights sharded by FSDP2
            (its mask callback works on local shards); one-shot methods always do.
        description: one line for listings.
    """

    name: ClassVar[str]
    criterion: ClassVar[str | None] = None
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    own_loss: ClassVar[bool] = False
    one_shot: ClassVar[bool] = True
    default_rounds: ClassVar[int] = 1
    default_allocation: ClassVar[str] = "global"
    regrows: ClassVar[bool] = False
    shardable: ClassVar[bool] = False
    description: ClassVar[str] = ""

    def __init__(self, config: MethodConfig | None = None):
        self.config = config if config is not None else self.config_class()

    # --- what the method needs (validated before any work) --------------------------------------------------------
    def scoring_needs_teacher(self, args) -> bool:
        return self.criterion is not None and get_scoring_method(self.criterion).needs_teacher and args.alpha > 0

    def needs_teacher(self, args) -> bool:
        """A teacher is needed to score, or to retrain with KD (unless the method trains with its own loss, or
        `alpha=0` leaves only the cross-entropy in the KD loss)."""
        return self.scoring_needs_teacher(args) or (args.retrain_with_kd and args.alpha > 0 and not self.own_loss)

    def needs_calibration_data(self) -> bool:
        return self.criterion is not None and not get_scoring_method(self.criterion).data_free

    def check_steps(self, max_steps: int) -> None:
        """Raise ValueError, naming the fix, when a training run of `max_steps` optimizer steps is too short for the
        method's schedule (checked when the run is set up, before any training; nothing to check by default)."""

    def final_mask_step(self, sparsity: float, max_steps: int) -> int:
        """The optimizer step from which the masks of a run of `max_steps` steps no longer change (0: from the start;
        a method whose step schedule ends later says when)."""
        return 0

    # --- hooks ------------------------------------------------------------------------------------------------------
    def prune(self, pruner) -> dict[str, torch.Tensor] | None:
        """Masks to install before training (exactly `round(sparsity·N)` pruned for one-shot methods)."""
        return pruner.compute_masks()

    def callbacks(self, pruner) -> list:
        """Callbacks to add beside the mask callback (made once, with the pruner)."""
        return []

    def mask_callback(self, pruner):
        """The callback that enforces the pruner's masks during training; None: `GlobalMaskCallback`."""
        return None

    def compute_loss(self, pruner, model, inputs):
        """`(loss, logits)` of the method's own training loss, or None for the trainer's loss."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """JSON-able values, plus tensors under the key `"tensors"`, to resume a half-finished run."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()` (called on resume, before `resume`)."""

    def resume(self, pruner, masks: dict[str, torch.Tensor] | None) -> None:
        """Continue from a checkpoint's masks (the default: fixed masks; none yet: prune when the method does)."""
        if masks is not None:
            pruner.install(masks)


class ScheduledPruningMethod(PruningMethod):
    """Base of methods whose masks change at epoch boundaries through a `ScheduledMaskCallback` (DG2PF, IMP).

    `schedule_callback(...)` builds the callback (the method's `mask_callback`); `state_dict()` is the callback's
    (events applied, finished, dense weights while simulating), and `load_state_dict()` restores it on resume.
    """

    one_shot = False

    def __init__(self, config: MethodConfig | None = None):
        super().__init__(config)
        self.callback = None

    def schedule_callback(self, pruner, events, mask_fn, simulated_until=None):
        from ..core.callbacks import ScheduledMaskCallback

        self.callback = ScheduledMaskCallback(
            pruner, events, mask_fn, pruner.args.sparsity, simulated_until=simulated_until
        )
        return self.callback

    def state_dict(self) -> dict[str, Any]:
        return self.callback.state_dict() if self.callback is not None else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.callback is not None:
            self.callback.load_state_dict(state)


def keep_all(pruner) -> dict[str, torch.Tensor]:
    """Masks that keep every prunable weight: the start of a schedule that prunes during training."""
    return {name: torch.ones_like(p, dtype=torch.bool) for name, p in pruner.prunable_parameters().items()}


METHODS: Registry[type[PruningMethod]] = Registry("pruning_method")


def register_method(cls: type[PruningMethod]) -> type[PruningMethod]:
    """Class decorator: register a `PruningMethod` under `cls.name` (a name can be registered once)."""
    if cls.criterion is not None:
        get_scoring_method(cls.criterion)  # its criterion must exist
    return METHODS.register(cls.name, cls)


def get_method(name: str) -> type[PruningMethod]:
    return METHODS.get(name)


def build_method(name: str, method_args: Mapping[str, Any] | str | None = None) -> PruningMethod:
    """An instance of the method `name` with its settings from `method_args` (validated)."""
    cls = get_method(name)
    return cls(cls.config_class.from_args(method_args, name))
