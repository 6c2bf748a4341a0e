"""Per-step wall time and peak memory of every method, client / bridge / server split out.

At DeiT-Tiny shape (12 layers, hidden 192, 3 heads, 197 tokens), split after layer 3, each method at its
setting nearest xi (default 0.1). A step is staged at the cut so each part's forward and backward are timed
on their own: client (embeddings + 3 layers), bridge (encode, link with its wire codec, decode, and their
backward), server (9 layers, head, loss). Methods are timed interleaved in one run, medians reported, with
ratios to the uncompressed split from the same run. Peak memory: CUDA's peak allocation on a GPU; on a CPU,
the peak resident-set growth of a fresh process per method (so each method is measured alone).

    python benchmarks/speed.py                       # CPU, batch 32
    python benchmarks/speed.py --device cuda --batch-size 128
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import ViTConfig, ViTForImageClassification

import hf_adc
from hf_adc.bridges import LEVEL_METHODS, config_for_ratio

DEIT_TINY = dict(
    hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768, image_size=224, patch_size=16
)
METHODS = ("none", *(method for method in LEVEL_METHODS if method not in ("adc_tokens", "adc_batch")))
PARTS = ("client", "bridge", "server")


def build(method: str, xi: float, batch_size: int, split_layer: int, device: torch.device):
    torch.manual_seed(0)
    vit = ViTForImageClassification(ViTConfig(**DEIT_TINY, num_labels=100)).to(device)
    compression = None if method == "none" else config_for_ratio(method, xi, 197, 192, batch_size)
    split = hf_adc.split_vit(vit, split_layer=split_layer, compression=compression).train()
    return split, torch.optim.AdamW(split.parameters(), lr=1e-4)


class Clock:
    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = dict.fromkeys(PARTS, 0.0)

    @contextmanager
    def part(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds[name] += time.perf_counter() - start


def staged_step(split, optimizer, pixel_values, labels, clock: Clock) -> None:
    """One training step cut at the client/bridge and bridge/server boundaries; same maths as `split(...)`."""
    optimizer.zero_grad(set_to_none=True)
    with clock.part("client"):
        client_output = split.client(pixel_values, output_cls_attention=split.bridge.needs_cls_attention)
    hidden = client_output.last_hidden_state
    hidden_in = hidden.detach().requires_grad_()
    with clock.part("bridge"):
        message = split.bridge.encode(hidden_in, labels, client_output.cls_attention)
        received, sent_labels, _ = split.link.transmit(message, split.bridge, hidden_in.numel(), labels)
        server_input = split.bridge.decode(received)
    server_in = server_input.detach().requires_grad_()
    targets = sent_labels.float() if sent_labels.is_floating_point() else F.one_hot(sent_labels, 100).float()
    with clock.part("server"):
        split.server(server_in, labels=targets).loss.backward()
    with clock.part("bridge"):
        server_input.backward(server_in.grad)
    with clock.part("client"):
        hidden.backward(hidden_in.grad)
        optimizer.step()


def _peak_rss_bytes() -> int:
    """This process's peak resident set: VmHWM on Linux (ru_maxrss survives exec, so a child would start at
    its parent's peak), ru_maxrss elsewhere."""
    try:
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory_mb(method: str, args) -> float:
    """Peak memory of a few training steps of one method, in MB above the model's own footprint."""
    device = torch.device(args.device)
    split, optimizer = build(method, args.xi, args.batch_size, args.split_layer, device)
    pixel_values = torch.randn(args.batch_size, 3, 224, 224, device=device)
    labels = torch.randint(0, 100, (args.batch_size,), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = _peak_rss_bytes()
    for _ in range(3):
        staged_step(split, optimizer, pixel_values, labels, Clock(device))
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated() - before) / 1e6
    return (_peak_rss_bytes() - before) / 1e6


def memory_in_fresh_process(method: str, args) -> float:
    command = [sys.executable, __file__, "--memory-of", method, "--xi", str(args.xi), "--batch-size",
               str(args.batch_size), "--split-layer", str(args.split_layer), "--device", args.device]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--split-layer", type=int, default=3)
    parser.add_argument("--xi", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory-of", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.memory_of:
        print(json.dumps({"peak_mb": peak_memory_mb(args.memory_of, args)}))
        return
    device = torch.device(args.device)
    models = {method: build(method, args.xi, args.batch_size, args.split_layer, device) for method in METHODS}
    settings = {
        method: ", ".join(
            f"{key}={value}" for key, value in split.client.config.compression.items()
            if key not in ("method", "seed") and value is not None
        ) or "-"
        for method, (split, _) in models.items()
    }  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(args.batch_size, 3, 224, 224, generator=generator).to(device)
    labels = torch.randint(0, 100, (args.batch_size,), generator=generator).to(device)
    seconds = {method: {part: [] for part in PARTS} for method in METHODS}
    for repeat in tqdm(range(args.warmup + args.repeats), desc="interleaved steps"):
        for method in METHODS:
            clock = Clock(device)
            staged_step(*models[method], pixel_values, labels, clock)
            if repeat >= args.warmup:
                for part in PARTS:
                    seconds[method][part].append(clock.seconds[part])
    memory = {}
    for method in tqdm(METHODS, desc="peak memory"):
        if device.type == "cuda":
            del models[method]
            torch.cuda.empty_cache()
            memory[method] = peak_memory_mb(method, args)
        else:
            memory[method] = memory_in_fresh_process(method, args)

    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"\nDeiT-Tiny shape, split after layer {args.split_layer}, batch {args.batch_size}, each method nearest "
        f"xi={args.xi}, {name}; median ms of {args.repeats} interleaved steps (forward + backward + AdamW)\n"
    )
    print("| method | setting | client ms | bridge ms | server ms | step ms | step / none | peak MB | MB / none |")
    print("|---|---|---|---|---|---|---|---|---|")
    medians = {m: {p: statistics.median(seconds[m][p]) * 1e3 for p in PARTS} for m in METHODS}
    base_step = sum(medians["none"].values())
    for method in METHODS:
        step = sum(medians[method].values())
        parts = " | ".join(f"{medians[method][p]:.1f}" for p in PARTS)
        print(
            f"| {method} | {settings[method]} | {parts} | {step:.1f} | {step / base_step:.3f}x | "
            f"{memory[method]:.0f} | {memory[method] / memory['none']:.2f}x |"
        )


if __name__ == "__main__":
    main()
