"""The recipes' defaults, and the one way they are applied: as flags put before the user's argv, so that they go
through the parser like anything typed (TRL's way) and a flag the user gives always wins."""

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

# recipes/train.py (and recipes/serve.py, which must agree with its clients).
TRAINING_DEFAULTS = {
    "output_dir": "outputs/train",
    "per_device_train_batch_size": "64",
    "per_device_eval_batch_size": "128",
    "learning_rate": "6e-4",
    "weight_decay": "0.05",
    "lr_scheduler_type": "cosine",
    "warmup_steps": "0.05",
    "logging_steps": "25",
    "eval_strategy": "steps",
    "eval_steps": "0.2",
    "save_strategy": "no",
    "report_to": "none",
}
# The main job's data, when neither a model, a dataset nor classes are given: fine-tune on Fashion-MNIST 5-9.
MAIN_JOB_DATA = {"classes": "5-9", "max_train_samples": "10000"}
# Any of these sets how long training lasts; without one, the budget is one epoch of uncompressed traffic.
BUDGET_FLAGS = ("communication_budget", "budget_epochs", "max_steps", "num_train_epochs")
# recipes/pretrain.py: central training of a starting checkpoint.
PRETRAINING_DEFAULTS = {
    "output_dir": "outputs/pretrained",
    "per_device_train_batch_size": "64",
    "per_device_eval_batch_size": "128",
    "learning_rate": "1e-3",
    "weight_decay": "0.05",
    "lr_scheduler_type": "cosine",
    "warmup_steps": "0.05",
    "num_train_epochs": "3",
    "logging_steps": "50",
    "save_strategy": "no",
    "report_to": "none",
    "remove_unused_columns": "false",
}


@dataclass(frozen=True)
class DefaultRule:
    """Defaults that hold only when none of `unless_given` and all of `only_with` are on the command line."""

    values: Mapping[str, str]
    unless_given: tuple[str, ...] = ()
    only_with: tuple[str, ...] = ()

    def applies(self, given: set[str]) -> bool:
        return not given & set(self.unless_given) and set(self.only_with) <= given


@dataclass(frozen=True)
class RecipeDefaults:
    """A recipe's defaults: `values`, plus the `rules` that apply to this command line."""

    values: Mapping[str, str]
    rules: tuple[DefaultRule, ...] = field(default=())

    def resolve(self, given: set[str]) -> dict[str, str]:
        resolved = dict(self.values)
        for rule in self.rules:
            if rule.applies(given):
                resolved.update(rule.values)
        return resolved


TRAIN_RECIPE = RecipeDefaults(
    TRAINING_DEFAULTS,
    rules=(
        DefaultRule({"budget_epochs": "1"}, unless_given=BUDGET_FLAGS),
        DefaultRule(MAIN_JOB_DATA, unless_given=("model_name_or_path", "dataset_name", "classes")),
    ),
)
# A server takes the clients' defaults (they must agree) in its own folder; a federation's budget is the server's
# plan, so it gets the clients' budget default.
SERVE_RECIPE = RecipeDefaults(
    {**TRAINING_DEFAULTS, "output_dir": "outputs/serve"},
    rules=(DefaultRule({"budget_epochs": "1"}, unless_given=BUDGET_FLAGS, only_with=("num_clients",)),),
)
PRETRAIN_RECIPE = RecipeDefaults(PRETRAINING_DEFAULTS)


def given_flags(argv: list[str]) -> set[str]:
    """The names of the `--flags` on a command line (`--name value` and `--name=value` alike)."""
    return {arg.split("=")[0].removeprefix("--") for arg in argv if arg.startswith("--")}


def with_defaults(argv: list[str], defaults: Mapping[str, str] | RecipeDefaults) -> list[str]:
    """`argv` with `--name value` prepended for each default the user did not set. Without a GPU the default
    is also `--use_cpu true`: without it, accelerate's multi-process launch on CPUs runs each process alone."""
    given = given_flags(argv)
    values = defaults.resolve(given) if isinstance(defaults, RecipeDefaults) else dict(defaults)
    if not torch.cuda.is_available():
        values["use_cpu"] = "true"
    extra = [item for name, value in values.items() if name not in given for item in (f"--{name}", value)]
    return extra + argv
