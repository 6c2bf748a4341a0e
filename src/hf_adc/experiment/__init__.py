"""What the recipes and benchmarks share, one module per concern:

- `arguments`: `DataArguments`, `ModelArguments`, `SplitArguments` (a flag per registered bridge knob);
- `defaults`: the recipes' defaults and `with_defaults`, the one way they reach the parser;
- `models`: the data, the ViT and the split a run trains (`load_data`, `load_vit`, `build_split`);
- `pretrained`: the default checkpoint, made once by `run_pretraining` and cached (`default_checkpoint`);
- `run`: one split training run in one process (`run_split_training`, `train_from_arguments`) and its steps;
- `report`: what a run writes and prints (`save_split`, `summary_text`, `federation_table`).

Client and server in separate processes live in `hf_adc.distributed`, which builds on this package (its `launch`
runs a client with the steps of `run`); their arguments (`RemoteArguments`, `FederationArguments`) are also
reachable here, imported on first use, so that loading a model never imports the transport.
"""

from .arguments import DataArguments, ModelArguments, SplitArguments
from .defaults import (
    BUDGET_FLAGS,
    MAIN_JOB_DATA,
    PRETRAIN_RECIPE,
    PRETRAINING_DEFAULTS,
    SERVE_RECIPE,
    TRAIN_RECIPE,
    TRAINING_DEFAULTS,
    DefaultRule,
    RecipeDefaults,
    given_flags,
    with_defaults,
)
from .models import build_split, fresh_classifier, load_data, load_vit, load_vit_for_labels, with_transforms
from .pretrained import DEFAULT_PRETRAINING, cache_dir, default_checkpoint, resolve_checkpoint, run_pretraining
from .report import federation_table, save_split, summary_text, write_results
from .run import release_process_group, run_recipe, run_split_training, train_from_arguments, train_split

_DISTRIBUTED = {
    "JOIN_TOKEN_VARIABLE": "arguments",
    "RemoteArguments": "arguments",
    "FederationArguments": "arguments",
}


def __getattr__(name: str):
    if name in _DISTRIBUTED:
        from importlib import import_module

        return getattr(import_module(f"hf_adc.distributed.{_DISTRIBUTED[name]}"), name)
    raise AttributeError(f"module 'hf_adc.experiment' has no attribute {name!r}")


__all__ = [
    "BUDGET_FLAGS",
    "DEFAULT_PRETRAINING",
    "MAIN_JOB_DATA",
    "PRETRAIN_RECIPE",
    "PRETRAINING_DEFAULTS",
    "SERVE_RECIPE",
    "TRAINING_DEFAULTS",
    "TRAIN_RECIPE",
    "DataArguments",
    "DefaultRule",
    "ModelArguments",
    "RecipeDefaults",
    "SplitArguments",
    "build_split",
    "cache_dir",
    "default_checkpoint",
    "federation_table",
    "fresh_classifier",
    "given_flags",
    "load_data",
    "load_vit",
    "load_vit_for_labels",
    "release_process_group",
    "resolve_checkpoint",
    "run_recipe",
    "run_pretraining",
    "run_split_training",
    "train_from_arguments",
    "save_split",
    "summary_text",
    "train_split",
    "with_defaults",
    "with_transforms",
    "write_results",
]
