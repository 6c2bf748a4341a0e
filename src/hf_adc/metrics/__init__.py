"""Evaluation metrics shipped with hf_adc as `evaluate` modules, so that they load without the Hub."""

from pathlib import Path

import evaluate

TOP_K_ACCURACY = str(Path(__file__).with_name("top_k_accuracy.py"))


def load_accuracy(**kwargs) -> evaluate.EvaluationModule:
    """The top-1 / top-k accuracy metric (`evaluate.load` of the module shipped here); `kwargs` go to
    `evaluate.load`."""
    return evaluate.load(TOP_K_ACCURACY, **kwargs)
