"""Speed of ADC's encode (cluster, merge, select) alone, and the quality of its k-means on real CLS rows.

Encode: DeiT-Tiny shape at the cut (197 tokens x 192), xi = 0.1, the median of many calls at each batch size,
against the targets of the hardening issue (CPU: B = 128 <= 2.5 ms, B = 32 <= 0.8 ms; GPU: B = 128 <= 1.5 ms
with no host synchronisation, checked with `torch.cuda.set_sync_debug_mode("error")`).

Quality: the within-cluster sum of squares (WCSS) of hf_adc's seeded k-means on the CLS attention rows of a
real pretrained checkpoint (the main job's default checkpoint on Fashion-MNIST classes 5-9, made if missing),
against scikit-learn's KMeans with 10 restarts (a strong reference), at the batch sizes and T of xi = 0.1.

    python benchmarks/adc_encode.py
    python benchmarks/adc_encode.py --device cuda
"""

import argparse
import statistics
import time

import numpy as np
import torch
from tqdm.auto import tqdm

import hf_adc
from hf_adc.bridges import ADCBridge

TARGETS_MS = {"cpu": {128: 2.5, 32: 0.8}, "cuda": {128: 1.5}}


def encode_ms(batch_size: int, xi: float, device: torch.device, repeats: int) -> float:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch_size, 197, 192, generator=generator).to(device)
    cls_rows = (3 * torch.randn(batch_size, 197, generator=generator)).softmax(dim=1).to(device)
    labels = torch.randint(0, 100, (batch_size,), generator=generator).to(device)
    bridge = ADCBridge(hf_adc.ADCConfig(xi=xi), num_labels=100).to(device).train()
    seconds = []
    for repeat in range(repeats + 10):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        bridge.encode(hidden, labels, cls_rows)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if repeat >= 10:
            seconds.append(time.perf_counter() - start)
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        try:
            bridge.encode(hidden, labels, cls_rows)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return statistics.median(seconds) * 1e3


def real_cls_rows(batches: int, batch_size: int) -> list[torch.Tensor]:
    from hf_adc.data import ImageTransform, load_image_dataset
    from hf_adc.experiment import ModelArguments, default_checkpoint, load_vit

    dataset = load_image_dataset("fashion_mnist", classes=list(range(5, 10)), max_train_samples=batches * batch_size)
    vit, processor = load_vit(ModelArguments(model_name_or_path=default_checkpoint(use_cpu=True)), dataset)
    split = hf_adc.split_vit(vit, split_layer=2)
    transform = ImageTransform(processor)
    with torch.no_grad():
        return [
            split.client(transform(dataset["train"][start : start + batch_size])["pixel_values"], True).cls_attention
            for start in range(0, batches * batch_size, batch_size)
        ]


def wcss(points: np.ndarray, assignment: np.ndarray) -> float:
    return float(sum(((points[assignment == c] - points[assignment == c].mean(0)) ** 2).sum() for c in set(assignment)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--xi", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--quality-batches", type=int, default=20, help="Batches of real CLS rows; 0 skips.")
    args = parser.parse_args()
    device = torch.device(args.device)

    print(f"\nADC encode, 197 tokens x 192, xi={args.xi}, {device.type}, median of {args.repeats} calls\n")
    print("| batch | T x k | encode ms | target ms |")
    print("|---|---|---|---|")
    for batch_size in (128, 32):
        clusters, kept = hf_adc.ADCConfig(xi=args.xi).sizes(batch_size, 197)
        target = TARGETS_MS.get(device.type, {}).get(batch_size)
        milliseconds = encode_ms(batch_size, args.xi, device, args.repeats)
        print(f"| {batch_size} | {clusters} x {kept} | {milliseconds:.2f} | {target or '-'} |")

    if args.quality_batches:
        from sklearn.cluster import KMeans

        rows = real_cls_rows(args.quality_batches, 128)
        print(f"\nWCSS on the CLS rows of {args.quality_batches} real batches (lower is better)\n")
        print("| batch | T | hf_adc k-means | scikit-learn KMeans, 10 restarts | hf_adc / sklearn |")
        print("|---|---|---|---|---|")
        for batch_size in (128, 32):
            ours, reference = [], []
            clusters = hf_adc.ADCConfig(xi=args.xi).sizes(batch_size, 197)[0]
            for index, batch in enumerate(tqdm(rows, desc=f"k-means at B={batch_size}", leave=False)):
                for start in range(0, 128, batch_size):
                    points = batch[start : start + batch_size].float()
                    generator = torch.Generator().manual_seed(index)
                    assignment = hf_adc.kmeans(points, clusters, generator=generator).numpy()
                    ours.append(wcss(points.numpy(), assignment))
                    sklearn = KMeans(clusters, n_init=10, random_state=index).fit(points.numpy())
                    reference.append(float(sklearn.inertia_))
            mean, ref = statistics.mean(ours), statistics.mean(reference)
            print(f"| {batch_size} | {clusters} | {mean:.6f} | {ref:.6f} | {mean / ref:.3f} |")


if __name__ == "__main__":
    main()
