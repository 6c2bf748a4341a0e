"""`ADCTrainingArguments`: `TrainingArguments` plus a communication budget."""

import math
import re
from dataclasses import dataclass, field

from transformers import TrainingArguments

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(size: str | int | float) -> int:
    """Bytes in a human size: `750MB` (10**6), `2GiB` (2**30), `1.5e9`, `123`. Case-insensitive."""
    if isinstance(size, (int, float)):
        return int(size)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*", size.lower())
    if match is None or match.group(2) not in _UNITS:
        raise ValueError(
            f"communication_budget={size!r} is not a size: use bytes or a number with a unit of "
            f"{', '.join(unit.upper() for unit in _UNITS if unit)} (e.g. '750MB', '2GiB')."
        )
    return int(float(match.group(1)) * _UNITS[match.group(2)])


@dataclass
class ADCTrainingArguments(TrainingArguments):
    """`TrainingArguments` for split learning under a communication budget.

    The budget counts every byte that crosses the cut, both ways, summed over all processes. Give it in
    bytes (`communication_budget`) or in epochs of uncompressed traffic (`budget_epochs`, the paper's unit).
    With a budget and no `max_steps`, training runs until the budget is spent, however many epochs that
    takes; it stops at the last step that fits and saves there.

    Defaults changed for split models: `remove_unused_columns=False` (images are turned into
    `pixel_values` on the fly), `label_names=["labels"]`, `ddp_find_unused_parameters=False`.
    """

    communication_budget: str | None = field(
        default=None,
        metadata={"help": "Most bytes that may cross the cut (both ways, all ranks): e.g. 750MB, 2GiB, 1e9."},
    )
    budget_epochs: float | None = field(
        default=None,
        metadata={"help": "Budget as this many epochs of what the uncompressed split sends on the train set."},
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep the image column: the transform turns it into pixel_values."}
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "Every parameter of a split ViT is used in every step."}
    )
    pipeline_micro_batches: bool = field(
        default=False,
        metadata={
            "help": "With a server in another process (--server) and gradient accumulation: send a step's k forwards "
            "back to back and apply each gradient as it comes, so that a step costs about one round trip, not k. The "
            "client then holds k micro-batches' graphs at once (the memory accumulation saves): off by default."
        },
    )

    def __post_init__(self):
        if self.label_names is None:
            self.label_names = ["labels"]
        if self.communication_budget is not None and self.budget_epochs is not None:
            raise ValueError(
                f"Give communication_budget ({self.communication_budget}) or budget_epochs ({self.budget_epochs}), "
                "not both."
            )
        if self.communication_budget is not None and parse_size(self.communication_budget) <= 0:
            raise ValueError(f"communication_budget={self.communication_budget!r} is out of range: it must be > 0.")
        if self.budget_epochs is not None and not (self.budget_epochs > 0 and math.isfinite(self.budget_epochs)):
            raise ValueError(f"budget_epochs={self.budget_epochs} is out of range: it must be > 0.")
        super().__post_init__()

    @property
    def has_budget(self) -> bool:
        return self.communication_budget is not None or self.budget_epochs is not None

    def budget_bytes(self, uncompressed_epoch_bytes: int) -> int | None:
        """The budget in bytes, given what one uncompressed epoch sends; `None` without a budget."""
        if self.communication_budget is not None:
            return parse_size(self.communication_budget)
        if self.budget_epochs is not None:
            return int(self.budget_epochs * uncompressed_epoch_bytes)
        return None
