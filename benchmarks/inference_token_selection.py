"""Accuracy cost of token selection at split inference: keep CLS + the top tokens by CLS attention at the cut.

Takes a split model written by recipes/train.py (its `--output_dir`) and the test data it was trained for;
prints accuracy and bytes sent per image at each kept fraction, against sending every token.

    python benchmarks/inference_token_selection.py --model-dir outputs/train --dataset fashion_mnist --classes 5-9
"""

import argparse

import torch
from tqdm.auto import tqdm
from transformers import AutoImageProcessor

import hf_adc
from hf_adc.data import ImageTransform, load_image_dataset
from hf_adc.experiment import DataArguments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, help="An output_dir of recipes/train.py.")
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--classes", default=None, help="The classes the model was fine-tuned on, e.g. 5-9.")
    parser.add_argument("--max-test-samples", type=int, default=None)
    parser.add_argument("--keep", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.1, 0.05])
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()

    split = hf_adc.SplitViTForImageClassification.from_pretrained(args.model_dir).eval()
    transform = ImageTransform(AutoImageProcessor.from_pretrained(f"{args.model_dir}/client"))
    classes = DataArguments(classes=args.classes).class_list()
    test = load_image_dataset(args.dataset, classes=classes, max_test_samples=args.max_test_samples)["test"]
    test = test.with_transform(transform)
    rows = []
    for keep in tqdm(args.keep, desc="kept fractions"):
        split.link.inference_ledger.reset()
        correct = 0
        for start in range(0, len(test), args.batch_size):
            batch = test[start : start + args.batch_size]
            payload = split.client_payload(batch["pixel_values"], keep_tokens=None if keep == 1.0 else keep)
            predictions = split.server_logits(payload).argmax(dim=-1)
            correct += int((predictions == torch.as_tensor(batch["labels"])).sum())
        rows.append((keep, payload.shape[1], correct / len(test), split.link.inference_ledger.uplink_bytes / len(test)))
    print(f"\nsplit inference on {len(test)} test images of {args.dataset} ({args.model_dir})\n")
    print("| kept fraction | tokens sent | accuracy | uplink bytes / image | uplink vs all tokens |")
    print("|---|---|---|---|---|")
    for keep, tokens, accuracy, per_image in rows:
        print(f"| {keep} | {tokens} | {accuracy:.4f} | {per_image:.0f} | {per_image / rows[0][3]:.3f} |")


if __name__ == "__main__":
    main()
