"""Training split ViTs: arguments with a communication budget, and the Trainer that honours it."""

from .arguments import ADCTrainingArguments, parse_size
from .trainer import ADCTrainer, classification_metrics

__all__ = ["ADCTrainer", "ADCTrainingArguments", "classification_metrics", "parse_size"]
