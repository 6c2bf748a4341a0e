"""Time of the ADC bridge inside a training step, and ADC step time against the uncompressed split.

At DeiT-Tiny shape (12 layers, hidden 192, 3 heads, 224 px / patch 16 = 197 tokens), split after layer 3,
one full training step (forward, backward, AdamW step) per repeat. All settings are timed interleaved in
one run, so the ratios compare like with like on a shared, noisy machine. Medians are reported. The bridge's
share is given twice: of the whole ADC step, and of one DeiT-Tiny layer's training forward on the batch (timed
in the same repeats), the measure the bridge's 0.8% target was set in.

    python benchmarks/bridge_speed.py                    # CPU, batch 32
    python benchmarks/bridge_speed.py --device cuda --batch-size 128
"""

import argparse
import statistics
import time
from contextlib import contextmanager

import torch
from speed import DEIT_TINY  # benchmarks/ is on the path when run as a script
from tqdm.auto import tqdm
from transformers import ViTConfig, ViTForImageClassification

import hf_adc
from hf_adc.modeling import modeling_split_vit


class BridgeClock:
    """Accumulates the wall time of the bridge's forward work: the CLS-row probe and `encode`."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    @contextmanager
    def timing(self):
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        self.seconds += time.perf_counter() - start

    def wrap(self, function):
        def timed(*args, **kwargs):
            with self.timing():
                return function(*args, **kwargs)

        return timed


def build(xi: float | None, split_layer: int, device: torch.device, clock: BridgeClock):
    torch.manual_seed(0)
    vit = ViTForImageClassification(ViTConfig(**DEIT_TINY, num_labels=100)).to(device)
    compression = hf_adc.ADCConfig(xi=xi) if xi is not None else None
    model = hf_adc.split_vit(vit, split_layer=split_layer, compression=compression).train()
    model.bridge.encode = clock.wrap(model.bridge.encode)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def step(model, optimizer, pixel_values, labels) -> None:
    optimizer.zero_grad(set_to_none=True)
    model(pixel_values, labels=labels).loss.backward()
    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--split-layer", type=int, default=3)
    parser.add_argument("--xi", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    settings = [None, *args.xi]
    clocks = {xi: BridgeClock(device) for xi in settings}
    models = {xi: build(xi, args.split_layer, device, clocks[xi]) for xi in settings}
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(args.batch_size, 3, 224, 224, generator=generator).to(device)
    labels = torch.randint(0, 100, (args.batch_size,), generator=generator).to(device)

    original_cls_row = modeling_split_vit._CLSAttentionProbe.cls_row
    step_seconds = {xi: [] for xi in settings}
    bridge_seconds = {xi: [] for xi in settings}
    layer = models[None][0].client.layers[0]
    tokens = torch.randn(args.batch_size, 197, DEIT_TINY["hidden_size"], generator=generator).to(device)
    layer_seconds = []
    for repeat in tqdm(range(args.warmup + args.repeats), desc="interleaved steps"):
        timer = BridgeClock(device)
        with timer.timing():
            layer(tokens)
        if repeat >= args.warmup:
            layer_seconds.append(timer.seconds)
        for xi in settings:
            clock = clocks[xi]
            modeling_split_vit._CLSAttentionProbe.cls_row = clock.wrap(original_cls_row)
            clock.seconds = 0.0
            total = BridgeClock(device)
            with total.timing():
                step(*models[xi], pixel_values, labels)
            if repeat >= args.warmup:
                step_seconds[xi].append(total.seconds)
                bridge_seconds[xi].append(clock.seconds)
    modeling_split_vit._CLSAttentionProbe.cls_row = original_cls_row

    base = statistics.median(step_seconds[None])
    layer_ms = 1e3 * statistics.median(layer_seconds)
    print(
        f"\nDeiT-Tiny shape, split after layer {args.split_layer}, batch {args.batch_size}, {device.type}, "
        f"median of {args.repeats} interleaved steps (forward + backward + AdamW); one layer's training forward "
        f"{layer_ms:.1f} ms\n"
    )
    print(
        "| compression | T x k (of B x n) | achieved ratio | step ms | step / uncompressed | bridge ms | bridge share "
        "| bridge / one layer's forward |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for xi in settings:
        median_step = statistics.median(step_seconds[xi])
        median_bridge = statistics.median(bridge_seconds[xi])
        if xi is None:
            name, shape, ratio = "uncompressed", f"{args.batch_size} x 197", 1.0
        else:
            clusters, kept = hf_adc.ADCConfig(xi=xi).sizes(args.batch_size, 197)
            name, shape, ratio = (
                f"ADC xi={xi}",
                f"{clusters} x {kept}",
                clusters * kept / (args.batch_size * 197),
            )
        print(
            f"| {name} | {shape} | {ratio:.4f} | {1e3 * median_step:.1f} | {median_step / base:.3f}x "
            f"| {1e3 * median_bridge:.2f} | {100 * median_bridge / median_step:.2f}% "
            f"| {100 * median_bridge / (layer_ms / 1e3):.2f}% |"
        )


if __name__ == "__main__":
    main()
