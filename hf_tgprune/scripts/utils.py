"""Small, pure helpers of the scripts (`recipes/prune_cifar.py`): argument parsing with YAML/JSON config files (as
TRL's `TrlParser`), the output-folder and resume guards, stage timers and the results file. Nothing here trains.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

from ..core.utils import write_json_atomic

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
RESULTS_NAME = "results.json"


class RecipeError(ValueError):
    """Bad recipe input detected before any training; the message names the argument and the fix."""


# --- arguments -------------------------------------------------------------------------------------------------
def _read_config_file(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise RecipeError(f"Config file {path!r} does not exist.")
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith(".json"):
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise RecipeError(f"Config file {path!r} must hold a mapping of argument names to values.")
    return data


def _to_cli(config: Mapping[str, Any]) -> list[str]:
    """A config mapping as command-line arguments (lists become several values, booleans explicit)."""
    argv: list[str] = []
    for key, value in config.items():
        if value is None:
            continue
        argv.append(f"--{key}")
        if isinstance(value, (list, tuple)):
            argv.extend(str(v) for v in value)
        elif isinstance(value, bool):
            argv.append(str(value))
        elif isinstance(value, (dict,)):
            argv.append(json.dumps(value))
        else:
            argv.append(str(value))
    return argv


def expand_config_args(argv: Sequence[str]) -> list[str]:
    """Replace a config file by its arguments, so that command-line arguments after it override it.

    Accepted forms: `script.py config.yaml` (a single YAML/JSON file, as TRL's scripts) and
    `script.py --config config.yaml [--more overrides]`. The file's keys are argument names.
    """
    argv = list(argv)
    if len(argv) >= 1 and argv[0].endswith(CONFIG_SUFFIXES) and not argv[0].startswith("-"):
        return _to_cli(_read_config_file(argv[0])) + argv[1:]
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise RecipeError("--config needs a YAML or JSON file.")
        return argv[:i] + _to_cli(_read_config_file(argv[i + 1])) + argv[i + 2 :]
    return argv


class PruningParser(HfArgumentParser):
    """`HfArgumentParser` that also reads its arguments from YAML/JSON files (see `expand_config_args`)."""

    def parse_args_and_config(self, args: Sequence[str] | None = None) -> tuple:
        """The dataclasses from `args` (default: `sys.argv[1:]`) with config files expanded in place; a value
        refused by a dataclass's `__post_init__` (e.g. `--sparsity 1.5`) is a `RecipeError`."""
        argv = list(sys.argv[1:] if args is None else args)
        try:
            return self.parse_args_into_dataclasses(args=expand_config_args(argv))
        except ValueError as error:
            raise RecipeError(str(error)) from error


# --- output folder ---------------------------------------------------------------------------------------------
def check_output_dir(output_dir: str | None, overwrite: bool, resume: bool = False) -> None:
    """Refuse an existing, non-empty `output_dir` unless `overwrite` or `resume` (checked before anything is
    written); `resume` needs the `results.json` of the run to continue."""
    if not output_dir:
        raise RecipeError("--output_dir is required.")
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise RecipeError(f"--output_dir {output_dir!r} exists and is not a folder.")
    if resume:
        if not (path / RESULTS_NAME).is_file():
            raise RecipeError(
                f"--resume_from_checkpoint: {output_dir!r} holds no {RESULTS_NAME} of an earlier run to continue. "
                "Check --output_dir, or drop --resume_from_checkpoint to start a new run."
            )
        return
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise RecipeError(
            f"--output_dir {output_dir!r} exists and is not empty. Pass --resume_from_checkpoint True to continue "
            "the run in it, --overwrite_output_dir to write into it (files of a previous run with the same names "
            "are replaced), or choose another folder."
        )


# Arguments that cannot change a finished result (where it is written, how it is logged, shared or measured); all
# others must be those of the run that `--resume_from_checkpoint True` continues.
RESULT_NEUTRAL_ARGUMENTS = frozenset({
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "logging_dir", "logging_strategy", "logging_steps",
    "logging_first_step", "logging_nan_inf_filter", "report_to", "disable_tqdm", "run_name", "log_level",
    "log_level_replica", "log_on_each_node", "push_to_hub", "hub_model_id", "hub_token", "hub_strategy",
    "hub_private_repo", "hub_revision", "hub_always_push", "plots", "dataloader_num_workers", "dataloader_pin_memory",
    "dataloader_persistent_workers", "dataloader_prefetch_factor", "save_total_limit", "save_on_each_node",
    "per_device_eval_batch_size", "eval_accumulation_steps", "ddp_timeout", "local_rank", "_n_gpu", "sparsities",
    "sparsity", "export_sparse_inference", "inference_batch_sizes", "inference_repeats",
})  # fmt: skip


def result_arguments(*argument_objects) -> dict:
    """The run's arguments as JSON values (TrainingArguments through its own `to_dict`), recorded in results.json."""
    values = {}
    for arguments in argument_objects:
        as_dict = arguments.to_dict() if hasattr(arguments, "to_dict") else dataclasses.asdict(arguments)
        values.update(as_dict)
    return json.loads(json.dumps(values, default=str))


def check_same_arguments(previous: dict | None, current: dict) -> None:
    """Refuse to resume a run with arguments that determine a result differently (a mixed results.json otherwise).

    Raises:
        RecipeError: listing every differing argument, old and new value.
    """
    if previous is None:
        return
    differing = sorted(
        name
        for name in previous.keys() | current.keys()
        if name not in RESULT_NEUTRAL_ARGUMENTS and previous.get(name) != current.get(name)
    )
    if differing:
        listed = "; ".join(f"--{name} {previous.get(name)!r} -> {current.get(name)!r}" for name in differing)
        raise RecipeError(
            f"--resume_from_checkpoint True continues the run in --output_dir, but these arguments differ from that "
            f"run's: {listed}. Resume with the same arguments, or start a new run in another --output_dir."
        )


def resume_requested(value: str | None, output_dir: str) -> bool:
    """`--resume_from_checkpoint`: None (a new run), `True` or the output folder itself (continue that run)."""
    if value is None or str(value).lower() in ("false", "none", ""):
        return False
    if str(value).lower() == "true" or Path(value).resolve() == Path(output_dir).resolve():
        return True
    raise RecipeError(
        f"--resume_from_checkpoint {value!r}: the recipe resumes a whole run, stage by stage. Pass "
        "--resume_from_checkpoint True with the run's --output_dir (finished stages are reused, a half-done "
        "retraining continues from its last checkpoint)."
    )


def check_sparsities(sparsity: float, sparsities: Sequence[float] | None, sparsity_given: bool) -> list[float]:
    """The sparsities to run; errors for values outside [0, 1) and for two that share a folder name."""
    if sparsities and sparsity_given:
        raise RecipeError(
            f"--sparsity {sparsity} and --sparsities {list(sparsities)} were both given: --sparsities runs the "
            "sweep and --sparsity would be ignored. Pass only one of them."
        )
    chosen = list(sparsities or [sparsity])
    for value in chosen:
        if not 0.0 <= value < 1.0:
            raise RecipeError(f"--sparsities: every value must be in [0, 1); got {value}.")
    names = [run_dirname(value) for value in chosen]
    if len(set(names)) != len(names):
        raise RecipeError(
            f"--sparsities {chosen} has duplicates (or values equal to 6 significant digits, which would share "
            f"the folders {names}); pass distinct values."
        )
    return chosen


def run_dirname(sparsity: float) -> str:
    """Folder name of one sparsity's model: `sparsity-0.9`, `sparsity-0.9508`."""
    return f"sparsity-{sparsity:.6g}"


def hub_repo_for(hub_model_id: str | None, output_dir: str, sparsity: float, sweep: bool) -> str:
    """Hub repo of one run: `hub_model_id` (default: the output folder's name), suffixed per sparsity in sweeps."""
    base = hub_model_id or Path(output_dir).absolute().name
    return f"{base}-sparsity-{100 * sparsity:.4g}" if sweep else base


def stage_args(args, output_dir: str, **changes: Any):
    """A copy of the training config for one stage, writing to `output_dir`, never pushing by itself."""
    changes.setdefault("push_to_hub", False)
    return dataclasses.replace(args, output_dir=str(output_dir), **changes)


# --- timing, metrics, results ----------------------------------------------------------------------------------
class StageTimer:
    """Wall time of named stages (seconds), in the order they ran."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextlib.contextmanager
    def measure(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    @property
    def total(self) -> float:
        return time.perf_counter() - self._start


def strip_prefix(metrics: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """`{"test_accuracy": 0.9, "test_runtime": 1.2}` -> `{"accuracy": 0.9, "runtime": 1.2}` (numbers only)."""
    start = f"{prefix}_"
    return {
        key[len(start) :] if key.startswith(start) else key: float(value)
        for key, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON file the recipe wrote; a truncated or corrupted one is a `RecipeError` naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise RecipeError(f"{str(path)!r} is truncated or corrupted ({err}); it cannot be resumed.") from err


def write_json(path: str | os.PathLike, data: Mapping[str, Any]) -> None:
    """Write `data` as indented JSON atomically (a reader never sees a half-written file)."""
    write_json_atomic(data, path)


def compact_sparsity(report: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of `sparsity_report` that go into results.json (per-layer, prunable and total)."""
    return {
        "prunable": dict(report["prunable"]),
        "total": dict(report["total"]),
        "layers": {name: dict(layer) for name, layer in report["layers"].items()},
    }


def format_summary(results: Mapping[str, Any]) -> str:
    """A plain-text table of the accuracies in a results dict (what the recipe prints at the end)."""

    def pct(metrics: Mapping[str, Any] | None, key: str = "accuracy") -> str:
        value = (metrics or {}).get(key)
        return "   -  " if value is None else f"{100 * value:6.2f}"

    lines = [f"{'model':<28}{'top-1':>8}{'top-5':>8}  sparsity (prunable / total)"]
    for label, key in (("teacher", "teacher"), ("dense student", "dense_student")):
        test = (results.get(key) or {}).get("test")
        if test is not None:
            lines.append(f"{label:<28}{pct(test):>8}{pct(test, 'top5_accuracy'):>8}")
    for run in results.get("runs", []):
        sparsity = run.get("sparsity_report") or {}
        measured = ""
        if sparsity:
            measured = f"  {100 * sparsity['prunable']['sparsity']:.2f}% / {100 * sparsity['total']['sparsity']:.2f}%"
        for stage in ("after_pruning", "after_retraining"):
            if run.get(stage) is not None:
                label = f"{100 * run['sparsity']:.4g}% {stage.replace('_', ' ')}"
                lines.append(f"{label:<28}{pct(run[stage]):>8}{pct(run[stage], 'top5_accuracy'):>8}{measured}")
    speeds = [(run["sparsity"], run["inference"]) for run in results.get("runs", []) if run.get("inference")]
    for sparsity, speed in speeds:
        figures = ", ".join(
            f"batch {row['batch_size']}: {row['dense_ms']:.4g} -> {row['sparse_ms']:.4g} ms ({row['speedup']:.2f}x)"
            for row in speed["latencies"]
        )
        lines.append(f"inference {100 * sparsity:.4g}% dense -> sparse export ({speed['device']}): {figures}")
    return "\n".join(lines)
