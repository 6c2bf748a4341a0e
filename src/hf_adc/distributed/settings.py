"""What the two ends of a split must agree on before training, and how settings are compared as they travel."""

import json
import math
from dataclasses import asdict

from transformers import TrainingArguments

from ..bridges import Bridge
from ..link import wire_dtype_name
from ..split import SplitViTForImageClassification
from ..ushape import USplitViTForImageClassification

# The optimizer's, and those the server checks every message against (it never takes them as sent): the clipping
# norm of STEP, the smoothing of FORWARD, the backward seed's scale (1 / accumulation steps, times a loss scale),
# and a federation's plan costs (from the batch size).
TRAINING_SETTINGS = (
    "learning_rate", "weight_decay", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "optim",
    "optim_args", "adam_beta1", "adam_beta2", "adam_epsilon", "seed", "max_grad_norm", "label_smoothing_factor",
    "gradient_accumulation_steps", "fp16", "per_device_train_batch_size", "per_device_eval_batch_size",
)  # fmt: skip


def session_settings(split: SplitViTForImageClassification, args: TrainingArguments) -> dict:
    """What client and server must agree on: the split, the compression, the wire, and the optimizer settings."""
    config = (split.client or split.server).config
    return {
        "num_hidden_layers": config.num_hidden_layers,
        "split_layer": config.split_layer,
        "hidden_size": config.hidden_size,
        "num_tokens": (config.image_size // config.patch_size) ** 2 + 1,
        "num_labels": config.num_labels,
        "labels": [config.id2label[i] for i in range(config.num_labels)],
        "compression": config.compression,
        "topology": "u-shaped" if isinstance(split, USplitViTForImageClassification) else "standard",
        "head_layers": getattr(config, "head_layers", None),  # a U-shaped split's parts record it
        "wire_dtype": wire_dtype_name(split.link.wire_dtype),
        "channel": asdict(split.link.channel) if split.link.channel else None,
        **{name: plain(getattr(args, name)) for name in TRAINING_SETTINGS},
    }


def plain(value):
    """`value` as JSON gives it back (enums as their strings), so that settings compare as they travel."""
    return json.loads(json.dumps(value, default=str))


def checkpoint_every(args: TrainingArguments, max_steps: int) -> int | None:
    """The Trainer's save interval in steps for a run of `max_steps` (None: it saves no checkpoints)."""
    if args.save_strategy != "steps":
        return None
    return math.ceil(max_steps * args.save_steps) if args.save_steps < 1 else int(args.save_steps)


def differing_settings(client: dict, server: dict) -> list[str]:
    """One line per setting on which the two sides disagree."""
    return [
        f"{name}: client {client.get(name)!r}, server {server.get(name)!r}"
        for name in sorted(set(client) | set(server))
        if name not in ("token", "federation", "rank", "ranks") and client.get(name) != server.get(name)
    ]


def drop_modules(bridge: Bridge, names: tuple[str, ...]) -> Bridge:
    """`bridge` without the submodules (dotted names) that run on the other side."""
    for name in names:
        parent, _, child = name.rpartition(".")
        delattr(bridge.get_submodule(parent), child)
    return bridge


MAX_LABELS = 2**14  # class names a HELLO can announce within its size cap, bounding a soft-label row


def message_cap(config, batch_size: int) -> int:
    """The most bytes one message can take for a ViT of `config` at `batch_size` samples a micro-batch, whatever
    the bridge: an uncompressed activation twice over (Top-K's indices can add up to as much again as its values),
    soft labels of every class, or a whole model's float32 weights (a client half); plus a header and 1 MiB. gRPC
    refuses anything larger before allocating it."""
    from torch import device
    from transformers import ViTForImageClassification

    from .wire import HEADER_BYTES

    tokens = (config.image_size // config.patch_size) ** 2 + 1
    activations = 2 * batch_size * tokens * config.hidden_size * 4
    labels = batch_size * MAX_LABELS * 4
    with device("meta"):
        weights = 4 * sum(parameter.numel() for parameter in ViTForImageClassification(config).parameters())
    return HEADER_BYTES + max(activations + labels, weights) + 2**20
