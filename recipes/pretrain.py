"""Central pretraining of a ViTForImageClassification (no split, no compression): a starting checkpoint.

ADC's batch merging needs a pretrained backbone; use this to make one from your data, then fine-tune it
split with recipes/train.py --model_name_or_path <output_dir>.

    accelerate launch recipes/pretrain.py --dataset_name fashion_mnist --classes 0-4 \
        --max_train_samples 15000 --num_train_epochs 3 --output_dir outputs/pretrained

With no --model_name_or_path the model is a small ViT built from the --image_size / --hidden_size / ...
flags; with one, training continues from that checkpoint.
"""

import logging
import sys

from transformers import HfArgumentParser, TrainingArguments

from hf_adc.experiment import (
    PRETRAIN_RECIPE,
    DataArguments,
    ModelArguments,
    run_pretraining,
    run_recipe,
    with_defaults,
)


def main(argv: list[str]) -> dict:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(with_defaults(argv, PRETRAIN_RECIPE))
    metrics = run_pretraining(model_args, data_args, training_args)
    if training_args.process_index == 0:
        print(f"test accuracy {metrics['eval_accuracy']:.4f}; checkpoint in {training_args.output_dir}")
    return metrics


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_recipe(main, sys.argv[1:])
