"""What the recipes and benchmarks share: their arguments, the default checkpoint, and one training run.

`run_pretraining` trains an ordinary `ViTForImageClassification` centrally (no split, no compression);
`run_split_training` fine-tunes a split ViT through a bridge under a communication budget and writes the
halves, `results.json` and a plot. `default_checkpoint` makes (once) and caches the offline stand-in for a
Hub checkpoint: a small ViT pretrained on Fashion-MNIST classes 0-4.
"""

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import timedelta
from pathlib import Path

import torch
from transformers import (
    AutoImageProcessor,
    BaseImageProcessor,
    Trainer,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
    set_seed,
)

from .bridges import CONFIGS, BridgeConfig, ComposedConfig
from .data import (
    DEFAULT_DATASET,
    PARTITIONS,
    ImageTransform,
    image_processor_for,
    load_image_dataset,
    partition_indices,
)
from .federation import FEDERATION_ARGS, SCHEDULES, FederatedLink, FederatedServer
from .hub import load_pretrained
from .link import WIRE_DTYPES, ChannelConfig, resolve_wire_dtype
from .remote import RemoteLink, RemoteSplitViT, SplitServer, plain, session_settings
from .split import SplitViTForImageClassification, split_vit
from .training import ADCTrainer, ADCTrainingArguments, classification_metrics
from .transport import Listener, connect, parse_address

logger = logging.getLogger(__name__)

COMPRESSION_METHODS = ("none", *CONFIGS)
REDUCER_METHODS = ("adc", "topk", "randomtopk")
CODEC_METHODS = ("quantize", "bottlenet")
METHOD_KNOBS = {
    "none": (),
    "adc": ("xi", "batch_ratio", "token_ratio", "split_exponent", "kmeans_iters"),
    "topk": ("rate",),
    "randomtopk": ("rate", "random_portion"),
    "bottlenet": ("ratio",),
    "c3sl": ("R",),
    "quantize": ("bits",),
}
ALL_KNOBS = sorted({knob for knobs in METHOD_KNOBS.values() for knob in knobs})


@dataclass
class DataArguments:
    dataset_name: str = field(
        default=DEFAULT_DATASET,
        metadata={"help": "Hub id, local imagefolder / parquet / save_to_disk folder, or 'fashion_mnist' (default)."},
    )
    classes: str | None = field(
        default=None,
        metadata={"help": "Keep only these classes, relabelled 0..k-1: ids or names, e.g. '5-9' or '0,3,Bag'."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep this many training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep this many test rows."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (found by type if absent)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column (found by type if absent)."})
    augment: bool = field(
        default=False,
        metadata={
            "help": "Random resized crop and flip on training images. Off by default: on the short fine-tuning "
            "budgets of the main job it cost accuracy (0.835 with it, 0.88 without)."
        },
    )

    def class_list(self) -> list[int | str] | None:
        if self.classes is None:
            return None
        entries = []
        for part in self.classes.split(","):
            low, _, high = part.strip().partition("-")
            if high and low.isdigit() and high.isdigit():
                if int(low) > int(high):
                    raise ValueError(f"classes range {part!r} is empty: write low-high with low <= high.")
                entries.extend(range(int(low), int(high) + 1))
            else:
                entries.append(int(part) if part.strip().isdigit() else part.strip())
        return entries


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or path of a ViTForImageClassification. Absent: with the default data, a cached ViT "
            "pretrained on Fashion-MNIST classes 0-4 (made on first use); otherwise a small ViT from a config."
        },
    )
    image_size: int = field(default=32, metadata={"help": "From-config model: image size in pixels."})
    patch_size: int = field(default=4, metadata={"help": "From-config model: patch size in pixels."})
    hidden_size: int = field(default=96, metadata={"help": "From-config model: width."})
    num_hidden_layers: int = field(default=6, metadata={"help": "From-config model: encoder layers."})
    num_attention_heads: int = field(default=3, metadata={"help": "From-config model: attention heads."})

    def vit_config(self, num_labels: int) -> ViTConfig:
        return ViTConfig(
            image_size=self.image_size,
            patch_size=self.patch_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=4 * self.hidden_size,
            num_labels=num_labels,
        )


@dataclass
class SplitArguments:
    split_layer: int = field(default=2, metadata={"help": "Encoder layers on the client (1 .. layers - 1)."})
    compression: str = field(
        default="adc",
        metadata={
            "help": f"Bridge at the cut, one of: {', '.join(COMPRESSION_METHODS)}; or a reducer "
            f"({', '.join(REDUCER_METHODS)}) then a codec ({', '.join(CODEC_METHODS)}), e.g. adc+quantize."
        },
    )
    xi: float | None = field(default=None, metadata={"help": "adc: total ratio in (0, 1] (default 0.1)."})
    batch_ratio: float | None = field(default=None, metadata={"help": "adc: clusters per sample, instead of xi."})
    token_ratio: float | None = field(default=None, metadata={"help": "adc: kept tokens per token, instead of xi."})
    split_exponent: float | None = field(
        default=None,
        metadata={"help": "adc: T/B = xi**a, k/n = xi**(1 - a) (default 0.5; 0 is token selection alone)."},
    )
    kmeans_iters: int | None = field(default=None, metadata={"help": "adc: most k-means iterations (default 20)."})
    rate: float | None = field(default=None, metadata={"help": "topk, randomtopk: fraction of values sent."})
    random_portion: float | None = field(default=None, metadata={"help": "randomtopk: mass on non-top entries."})
    ratio: float | None = field(default=None, metadata={"help": "bottlenet: bottleneck width d'/d."})
    R: int | None = field(default=None, metadata={"help": "c3sl: samples per group (batch size divisible by R)."})
    bits: int | None = field(default=None, metadata={"help": "quantize: bits per value, 1 .. 16."})
    channel: str = field(default="clean", metadata={"help": "Channel at the cut: 'clean' or 'awgn'."})
    snr_db: str | None = field(default=None, metadata={"help": "AWGN SNR in dB: '20', or a range '10,30'."})
    wire_dtype: str = field(
        default="float32",
        metadata={
            "help": "Dtype every floating-point tensor crosses the cut in, whatever --bf16 / --fp16 compute in: "
            f"one of {', '.join(WIRE_DTYPES)}."
        },
    )

    def __post_init__(self):
        resolve_wire_dtype(self.wire_dtype)

    def compression_config(self, seed: int = 0) -> BridgeConfig | None:
        """The bridge config these arguments ask for; knobs of another method are an error, not ignored."""
        reducer, composed, codec = self.compression.partition("+")
        methods = (reducer, codec) if composed else (self.compression,)
        if composed and (reducer not in REDUCER_METHODS or codec not in CODEC_METHODS):
            raise ValueError(
                f"compression={self.compression!r} is not a reducer ({', '.join(REDUCER_METHODS)}) then a codec "
                f"({', '.join(CODEC_METHODS)})."
            )
        if not composed and self.compression not in COMPRESSION_METHODS:
            raise ValueError(
                f"compression={self.compression!r} is unknown: choose one of {', '.join(COMPRESSION_METHODS)}, "
                "or a composition such as adc+quantize."
            )
        knobs = {name: getattr(self, name) for name in ALL_KNOBS if getattr(self, name) is not None}
        foreign = sorted(set(knobs) - {knob for method in methods for knob in METHOD_KNOBS[method]})
        if foreign:
            raise ValueError(f"{', '.join(foreign)} do not apply to --compression {self.compression}.")
        if self.compression == "none":
            return None
        configs = []
        for method in methods:
            config_class = CONFIGS[method]
            own = {name: value for name, value in knobs.items() if name in METHOD_KNOBS[method]}
            if "seed" in {f.name for f in fields(config_class)}:
                own["seed"] = seed
            configs.append(config_class(**own))
        return ComposedConfig(*configs) if composed else configs[0]

    def channel_config(self) -> ChannelConfig | None:
        if self.channel not in ("clean", "awgn"):
            raise ValueError(f"channel={self.channel!r} is unknown: choose 'clean' or 'awgn'.")
        if self.channel == "clean":
            if self.snr_db is not None:
                raise ValueError(f"snr_db={self.snr_db!r} needs --channel awgn.")
            return None
        if self.snr_db is None:
            raise ValueError("--channel awgn needs --snr_db (e.g. 20, or a range 10,30).")
        values = [float(value) for value in self.snr_db.split(",")]
        if len(values) not in (1, 2):
            raise ValueError(f"snr_db={self.snr_db!r} must be one value or a range 'low,high'.")
        return ChannelConfig(snr_db=values[0] if len(values) == 1 else tuple(values))


JOIN_TOKEN_VARIABLE = "HF_ADC_JOIN_TOKEN"


@dataclass
class RemoteArguments:
    """Client and server in separate processes (see `hf_adc.remote`)."""

    server: str | None = field(
        default=None, metadata={"help": "HOST:PORT of a server started with recipes/serve.py: train as its client."}
    )
    listen: str | None = field(default=None, metadata={"help": "serve.py: HOST:PORT to listen on for clients."})
    distributed: bool = field(
        default=False,
        metadata={"help": "Start a server process on this machine (127.0.0.1) and train as its client: one command."},
    )
    join_token: str | None = field(
        default=None,
        metadata={"help": f"Secret both sides must give to join (default: ${JOIN_TOKEN_VARIABLE}). Not encryption."},
    )
    timeout: float = field(
        default=300.0, metadata={"help": "Seconds to wait on the peer (a send, a reply, joining) before giving up."}
    )
    accept_timeout: float | None = field(
        default=None,
        metadata={"help": "serve.py: seconds to wait for the next client before stopping (default: no limit)."},
    )

    def __post_init__(self):
        if not self.timeout > 0:
            raise ValueError(f"timeout={self.timeout} is out of range: it must be > 0 seconds.")
        if self.accept_timeout is not None and not self.accept_timeout > 0:
            raise ValueError(f"accept_timeout={self.accept_timeout} is out of range: it must be > 0 seconds.")
        if self.server and self.distributed:
            raise ValueError(f"--server {self.server} joins a running server; --distributed starts one: pick one.")
        for name in ("server", "listen"):
            if getattr(self, name):
                parse_address(getattr(self, name))

    def token(self) -> str | None:
        return self.join_token if self.join_token is not None else os.environ.get(JOIN_TOKEN_VARIABLE)

    def timeout_delta(self) -> timedelta:
        return timedelta(seconds=self.timeout)


@dataclass
class FederationArguments:
    """Several clients against one server (see `hf_adc.federation`)."""

    num_clients: int | None = field(
        default=None,
        metadata={"help": "Clients in the federation (serve.py, and every client). Absent: one client, no sync."},
    )
    client_id: int | None = field(default=None, metadata={"help": "Client: this client's id, 0 .. num_clients - 1."})
    schedule: str = field(
        default="splitfed",
        metadata={"help": f"serve.py: {' or '.join(SCHEDULES)} (clients in turn, or in parallel with FedAvg)."},
    )
    sync_every: int = field(
        default=10, metadata={"help": "serve.py: optimizer steps per turn (sequential) or between averagings."}
    )
    partition: str = field(
        default="iid", metadata={"help": f"Client: how the training rows are dealt ({', '.join(PARTITIONS)})."}
    )
    alpha: float = field(default=0.5, metadata={"help": "Client: Dirichlet concentration (--partition dirichlet)."})
    round_timeout: float = field(
        default=120.0, metadata={"help": "serve.py: seconds a round or a turn waits for a client before dropping it."}
    )
    min_clients: int = field(default=1, metadata={"help": "serve.py: fewest live clients the federation goes on with."})

    def __post_init__(self):
        if self.num_clients is not None and self.num_clients < 1:
            raise ValueError(f"num_clients={self.num_clients} is out of range: it must be >= 1.")
        if self.client_id is not None:
            if self.num_clients is None:
                raise ValueError(f"client_id={self.client_id} needs --num_clients (the same on every client).")
            if not 0 <= self.client_id < self.num_clients:
                raise ValueError(f"client_id={self.client_id} is out of range: 0 .. {self.num_clients - 1}.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} is unknown: choose one of {', '.join(SCHEDULES)}.")
        if self.partition not in PARTITIONS:
            raise ValueError(f"partition={self.partition!r} is unknown: choose one of {', '.join(PARTITIONS)}.")
        if not self.alpha > 0:
            raise ValueError(f"alpha={self.alpha} is out of range: it must be > 0.")
        if self.sync_every < 1:
            raise ValueError(f"sync_every={self.sync_every} is out of range: it must be >= 1.")
        if not self.round_timeout > 0:
            raise ValueError(f"round_timeout={self.round_timeout} is out of range: it must be > 0 seconds.")
        if self.num_clients is not None and not 1 <= self.min_clients <= self.num_clients:
            raise ValueError(f"min_clients={self.min_clients} is out of range: 1 .. {self.num_clients}.")

    def shared_settings(self, training_args: ADCTrainingArguments) -> dict:
        """What every client of one federation must give alike (the server checks)."""
        run = {name: plain(getattr(training_args, name)) for name in FEDERATION_ARGS}  # budget and checkpoints
        return {"num_clients": self.num_clients, "partition": self.partition, "alpha": self.alpha, **run}


def with_defaults(argv: list[str], defaults: dict[str, str]) -> list[str]:
    """`argv` with `--name value` prepended for each default the user did not set. Without a GPU the default
    is also `--use_cpu true`: without it, accelerate's multi-process launch on CPUs runs each process alone."""
    if not torch.cuda.is_available():
        defaults = {**defaults, "use_cpu": "true"}
    given = {arg.split("=")[0].removeprefix("--") for arg in argv if arg.startswith("--")}
    extra = [item for name, value in defaults.items() if name not in given for item in (f"--{name}", value)]
    return extra + argv


# The offline stand-in for a Hub checkpoint: a small ViT trained centrally on Fashion-MNIST classes 0-4.
DEFAULT_PRETRAINING = {
    "dataset_name": DEFAULT_DATASET,
    "classes": "0-4",
    "max_train_samples": 15000,
    "max_eval_samples": 2000,
    "augment": False,
    "num_train_epochs": 3,
    "per_device_train_batch_size": 64,
    "learning_rate": 1e-3,
    "weight_decay": 0.05,
    "warmup_steps": 0.05,
    "lr_scheduler_type": "cosine",
    "seed": 0,
}


def cache_dir() -> Path:
    """Where hf_adc caches made checkpoints: `$HF_ADC_CACHE`, else `$HF_HOME/hf_adc`."""
    if "HF_ADC_CACHE" in os.environ:
        return Path(os.environ["HF_ADC_CACHE"])
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "hf_adc"


def load_data(data_args: DataArguments, seed: int):
    return load_image_dataset(
        data_args.dataset_name,
        classes=data_args.class_list(),
        max_train_samples=data_args.max_train_samples,
        max_test_samples=data_args.max_eval_samples,
        image_column=data_args.image_column,
        label_column=data_args.label_column,
        seed=seed,
    )


def _with_transforms(dataset, image_processor: BaseImageProcessor, augment: bool):
    dataset["train"].set_transform(ImageTransform(image_processor, train=augment))
    dataset["test"].set_transform(ImageTransform(image_processor, train=False))
    return dataset


def load_vit(model_args: ModelArguments, dataset) -> tuple[ViTForImageClassification, BaseImageProcessor]:
    """The checkpoint (its head re-initialised when its classes differ from the dataset's) or a ViT from a config,
    and its image processor (the checkpoint's own, or one built to match)."""
    return load_vit_for_labels(model_args, dataset["train"].features["label"].names)


def load_vit_for_labels(
    model_args: ModelArguments, label_names: list[str]
) -> tuple[ViTForImageClassification, BaseImageProcessor]:
    """`load_vit` for a list of class names (what a server learns from its client, without the data)."""
    labels = {"id2label": dict(enumerate(label_names)), "label2id": {name: i for i, name in enumerate(label_names)}}
    if model_args.model_name_or_path is None:
        config = model_args.vit_config(len(labels["id2label"]))
        config.id2label, config.label2id = labels["id2label"], labels["label2id"]
        model = ViTForImageClassification(config)
        return model, image_processor_for(config)
    path = model_args.model_name_or_path
    old_labels = load_pretrained(ViTConfig, path).id2label
    model = load_pretrained(ViTForImageClassification, path, ignore_mismatched_sizes=True, **labels)
    if {int(k): v for k, v in old_labels.items()} != labels["id2label"]:
        fresh_classifier(model)
        logger.info("The checkpoint's classes differ from the dataset's: the classifier starts afresh.")
    try:
        image_processor = AutoImageProcessor.from_pretrained(path)
    except OSError:
        logger.warning("No image processor next to '%s': building one that matches its config.", path)
        image_processor = image_processor_for(model.config)
    return model, image_processor


def fresh_classifier(model: ViTForImageClassification) -> None:
    """Draws the classifier head anew, as ViT initialises it (truncated normal weights, zero bias).

    `model._init_weights` cannot do it on transformers 5: it skips weights flagged as loaded from a checkpoint.
    """
    weight = model.classifier.weight
    drawn = torch.empty_like(weight, dtype=torch.float32)
    torch.nn.init.trunc_normal_(drawn, std=model.config.initializer_range)
    with torch.no_grad():
        weight.copy_(drawn)
        model.classifier.bias.zero_()


def run_pretraining(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> dict:
    """Central training of a ViT (no split); saves model and image processor in `output_dir`."""
    if training_args.remove_unused_columns:
        raise ValueError(
            "remove_unused_columns=True drops the image column that the transform turns into pixel_values: "
            "pass --remove_unused_columns false."
        )
    dataset = load_data(data_args, training_args.seed)
    set_seed(training_args.seed)
    model, image_processor = load_vit(model_args, dataset)
    dataset = _with_transforms(dataset, image_processor, data_args.augment)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset["train"],
        eval_dataset=dataset["test"],
        compute_metrics=classification_metrics,
    )
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        image_processor.save_pretrained(training_args.output_dir)
    return metrics


def default_checkpoint(use_cpu: bool = False) -> str:
    """The cached small ViT pretrained on Fashion-MNIST classes 0-4, made on first use (a few minutes).

    Under a multi-process launch every process takes part in the pretraining (`use_cpu=True` for DDP on CPUs).
    """
    recipe = {**DEFAULT_PRETRAINING, "model": asdict(ModelArguments())}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    path = cache_dir() / f"vit-small-fashion-mnist-0-4-{key}"
    if (path / "config.json").exists():
        return str(path)
    logger.warning("Pretraining the default checkpoint once (Fashion-MNIST classes 0-4); cached in %s.", path)
    protocol = dict(DEFAULT_PRETRAINING)
    data_args = DataArguments(
        dataset_name=protocol.pop("dataset_name"),
        classes=protocol.pop("classes"),
        max_train_samples=protocol.pop("max_train_samples"),
        max_eval_samples=protocol.pop("max_eval_samples"),
        augment=protocol.pop("augment"),
    )
    staging = path.parent / f".staging-{key}"
    training_args = TrainingArguments(
        output_dir=str(staging),
        save_strategy="no",
        report_to="none",
        logging_steps=50,
        remove_unused_columns=False,
        use_cpu=use_cpu,
        **protocol,
    )
    metrics = run_pretraining(ModelArguments(), data_args, training_args)
    if training_args.process_index == 0:
        logger.warning("Default checkpoint: accuracy %.3f on held-out classes 0-4.", metrics["eval_accuracy"])
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, path)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return str(path)


def _plot_accuracy_against_bytes(log_history: list[dict], results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(entry["total_bytes"] / 1e6, entry["eval_accuracy"]) for entry in log_history if "eval_accuracy" in entry]
    figure, axis = plt.subplots(figsize=(5.5, 3.8))
    axis.plot(*zip(*points, strict=True), marker="o", label=results["compression"]["method"])
    if results["budget_bytes"]:
        axis.axvline(results["budget_bytes"] / 1e6, color="grey", linestyle="--", label="budget")
    axis.set_xlabel("cumulative MB sent across the cut (both ways)")
    axis.set_ylabel("test accuracy")
    axis.set_title(f"{results['compression']['method']}, achieved ratio {results['ratio']:.3f}")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def train_split(
    split: SplitViTForImageClassification,
    training_args: ADCTrainingArguments,
    train_dataset,
    eval_dataset,
    resume_from_checkpoint: str | bool | None = None,
) -> tuple[ADCTrainer, dict]:
    """Trains `split` with `ADCTrainer` (budget and all), evaluates it, and returns the trainer and the results:
    accuracy, bytes both ways (summed over ranks), the uncompressed equivalent, ratio, budget, steps, time."""
    trainer = ADCTrainer(model=split, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    train_seconds = time.perf_counter() - start
    metrics = trainer.evaluate()
    spent = trainer.sync_communication()
    results = {
        "test_accuracy": metrics["eval_accuracy"],
        "test_top5_accuracy": metrics.get("eval_top5_accuracy"),
        "uplink_bytes": spent["uplink_bytes"],
        "downlink_bytes": spent["downlink_bytes"],
        "sync_bytes": spent["sync_bytes"],
        "total_bytes": spent["total_bytes"],
        "uncompressed_bytes": spent["uncompressed_bytes"],
        "ratio": spent["total_bytes"] / spent["uncompressed_bytes"] if spent["uncompressed_bytes"] else 1.0,
        "inference_bytes": split.link.inference_ledger.total_bytes,
        "budget_bytes": trainer.budget_bytes,
        "budget_exhausted": trainer.budget_exhausted,
        "steps": trainer.state.global_step,
        "world_size": training_args.world_size,
        "train_seconds": train_seconds,
        "compression": split.client.config.compression,
        "log_history": trainer.state.log_history,
    }
    return trainer, results


def build_split(
    model_args: ModelArguments, split_args: SplitArguments, label_names: list[str], seed: int
) -> tuple[SplitViTForImageClassification, BaseImageProcessor]:
    """The split ViT the arguments describe, for these classes; seeded, so that a client and a server building it
    apart get the same weights (a fresh head, a bridge's initial weights)."""
    compression = split_args.compression_config(seed=seed)
    channel = split_args.channel_config()
    set_seed(seed)
    model, image_processor = load_vit_for_labels(model_args, label_names)
    split = split_vit(
        model, split_args.split_layer, compression=compression, channel=channel, wire_dtype=split_args.wire_dtype
    )
    return split, image_processor


def run_split_training(
    model_args: ModelArguments,
    split_args: SplitArguments,
    data_args: DataArguments,
    training_args: ADCTrainingArguments,
    resume_from_checkpoint: str | bool | None = None,
    remote_args: RemoteArguments | None = None,
    federation_args: FederationArguments | None = None,
) -> dict:
    """Fine-tunes a split ViT through the chosen bridge; writes `client/`, `server/`, the image processor,
    `results.json` and `accuracy_vs_bytes.png` into `output_dir`, and returns the results.

    With `push_to_hub`, the halves (not the Trainer's wrapper) go to `<hub_model_id>-client` and
    `<hub_model_id>-server` at the end, from the main process only.

    With `remote_args.server`, the server half lives in a server process (`recipes/serve.py`): this process
    trains the client half through the wire, writes and pushes the client's side only, and `results` gain the
    transport's byte counts (tensor payload and header framing, both ways). With `federation_args.client_id`
    too, this process is one client of a federation: it trains on its shard of the training rows, keeps its half
    in step with the others' (sync bytes charged), and `results["federation"]` gives its plan, shard and the
    accuracy on test rows weighted like its shard's classes (`local_accuracy`).
    """
    federated = federation_args is not None and federation_args.client_id is not None
    if federated and training_args.push_to_hub:
        raise ValueError("--push_to_hub on a federation's client: the server holds the final halves and pushes both "
                         "(give --push_to_hub --hub_model_id to serve.py).")  # fmt: skip
    hub_model_id = None
    if training_args.push_to_hub:
        if not training_args.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id: the halves go to <id>-client and <id>-server.")
        hub_model_id = training_args.hub_model_id
        training_args.push_to_hub = False  # the Trainer would push the wrapper; the halves are pushed below
    if federated and not (remote_args and remote_args.server):
        raise ValueError(f"--client_id {federation_args.client_id} joins a federation: give --server HOST:PORT too.")
    dataset = load_data(data_args, training_args.seed)
    split, image_processor = build_split(
        model_args, split_args, dataset["train"].features["label"].names, training_args.seed
    )
    if federated:
        shards = partition_indices(
            list(dataset["train"]["label"]), federation_args.num_clients, federation_args.partition,
            federation_args.alpha, training_args.seed,
        )  # fmt: skip
        dataset["train"] = dataset["train"].select(shards[federation_args.client_id])
        shard_labels = list(dataset["train"]["label"])
    if remote_args is not None and remote_args.server:
        peer = connect(remote_args.server, remote_args.timeout_delta())
        if federated:
            link = FederatedLink(peer, federation_args.client_id, split.link.channel, split.link.wire_dtype)
        else:
            link = RemoteLink(peer, split.link.channel, split.link.wire_dtype)
        split = RemoteSplitViT(split, link)
        settings = session_settings(split, training_args)
        if federated:
            settings["federation"] = federation_args.shared_settings(training_args)
            link.attach(split)
        link.join(settings, remote_args.token())
    dataset = _with_transforms(dataset, image_processor, data_args.augment)
    trainer, results = train_split(split, training_args, dataset["train"], dataset["test"], resume_from_checkpoint)
    if federated:
        results["federation"] = _federation_results(trainer, split.link, federation_args, shard_labels, dataset)
        results["local_accuracy"] = results["federation"]["local_accuracy"]
        split.link.finish(results)
    elif isinstance(split, RemoteSplitViT):
        split.link.finish()
    if isinstance(split, RemoteSplitViT):
        results["transport"] = {**vars(split.link.peer.traffic), "server": remote_args.server}
    results["args"] = {
        "model": asdict(model_args),
        "split": asdict(split_args),
        "data": asdict(data_args),
        "training": training_args.to_dict(),
    }
    if trainer.is_world_process_zero():
        save_split(split, image_processor, training_args.output_dir, results)
        output_dir = Path(training_args.output_dir)
        (output_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
        _plot_accuracy_against_bytes(trainer.state.log_history, results, output_dir / "accuracy_vs_bytes.png")
        if hub_model_id and isinstance(split, RemoteSplitViT):
            results["hub_urls"] = {"client": str(split.client.push_to_hub(f"{hub_model_id}-client"))}
        elif hub_model_id:
            results["hub_urls"] = split.push_to_hub(
                f"{hub_model_id}-client",
                f"{hub_model_id}-server",
                image_processor=image_processor,
                dataset=data_args.dataset_name,
                private=training_args.hub_private_repo,
                token=training_args.hub_token,
            )
    return results


def _federation_results(trainer: ADCTrainer, link: FederatedLink, federation_args, shard_labels, dataset) -> dict:
    """The client's plan and shard, and its test accuracy per class weighted by its shard's class frequencies."""
    num_labels = len(dataset["train"].features["label"].names)
    prediction = trainer.predict(dataset["test"])
    predicted = torch.as_tensor(prediction.predictions).argmax(-1)
    truth = torch.as_tensor(prediction.label_ids)
    correct = torch.zeros(num_labels).index_add_(0, truth, (predicted == truth).float())
    per_class = correct / torch.bincount(truth, minlength=num_labels).clamp(min=1)
    shard = torch.bincount(torch.as_tensor(shard_labels), minlength=num_labels).float()
    return {
        "client_id": federation_args.client_id,
        "partition": federation_args.partition,
        "alpha": federation_args.alpha,
        "shard_size": len(shard_labels),
        "shard_classes": shard.long().tolist(),
        "plan": vars(link.plan),
        "sync_bytes": link.ledger.sync_bytes,
        "sync_transfers": link.sync_transfers,
        "half_bytes": link.half_bytes,
        "per_class_accuracy": per_class.tolist(),
        "local_accuracy": float(per_class @ (shard / shard.sum())),
    }


def save_split(
    split: SplitViTForImageClassification, image_processor: BaseImageProcessor, output_dir: str, results: dict
) -> None:
    """Saves the split model (halves as normal checkpoints in `client/`, `server/`, plus the bridge), with
    the training's communication summary recorded in both halves' configs."""
    summary = {key: results[key] for key in ("uplink_bytes", "downlink_bytes", "uncompressed_bytes", "ratio", "steps")}
    summary["test_accuracy"] = results["test_accuracy"]
    for half in (split.client, split.server):
        if half is not None:
            half.config.communication = summary
    split.save_pretrained(output_dir)
    image_processor.save_pretrained(Path(output_dir) / "client")
    image_processor.save_pretrained(output_dir)


def summary_text(results: dict) -> str:
    """A few lines for a human at the end of a run."""
    mb = {key: results[key] / 1e6 for key in ("total_bytes", "uplink_bytes", "downlink_bytes", "uncompressed_bytes")}
    lines = [
        f"test accuracy {results['test_accuracy']:.4f} after {results['steps']} steps in "
        f"{results['train_seconds']:.0f} s",
        f"sent {mb['total_bytes']:.1f} MB across the cut (up {mb['uplink_bytes']:.1f} MB, down "
        f"{mb['downlink_bytes']:.1f} MB); an uncompressed split would have sent {mb['uncompressed_bytes']:.1f} MB "
        f"for the same steps (ratio {results['ratio']:.4f})",
    ]
    if results["budget_bytes"]:
        spent = results["total_bytes"] / results["budget_bytes"]
        lines.append(f"budget {results['budget_bytes'] / 1e6:.1f} MB, {100 * spent:.1f}% spent")
    return "\n".join(lines)


def run_server(
    model_args: ModelArguments,
    split_args: SplitArguments,
    training_args: ADCTrainingArguments,
    remote_args: RemoteArguments,
    federation_args: FederationArguments | None = None,
) -> dict:
    """Serves the server half at `remote_args.listen` until a client has trained to the end (or is lost), then
    writes `server/` (and the bridge's server-side weights) and `server_results.json` into `output_dir`, and with
    `push_to_hub` pushes the server half to `<hub_model_id>-server`."""
    if not remote_args.listen:
        raise ValueError("serve.py needs --listen HOST:PORT (e.g. 0.0.0.0:29500 to accept other machines).")
    if training_args.push_to_hub and not training_args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id: the server half goes to <id>-server.")
    split_args.compression_config(seed=training_args.seed)
    split_args.channel_config()

    def build(labels):
        return build_split(model_args, split_args, labels, training_args.seed)[0].to(training_args.device)

    if federation_args is not None and federation_args.num_clients is not None:
        server = FederatedServer(
            build, training_args, training_args.output_dir, federation_args.num_clients, federation_args.schedule,
            federation_args.sync_every, federation_args.round_timeout, federation_args.min_clients,
            join_token=remote_args.token(), resume_from=training_args.resume_from_checkpoint,
        )  # fmt: skip
    else:
        server = SplitServer(
            build, training_args, training_args.output_dir, join_token=remote_args.token(),
            resume_from=training_args.resume_from_checkpoint,
        )  # fmt: skip
    if remote_args.token() is None:
        logger.warning("No join token (--join_token or $%s): any client that reaches this address can join.",
                       JOIN_TOKEN_VARIABLE)  # fmt: skip
    listener = Listener(remote_args.listen, remote_args.timeout_delta())
    logger.warning("Serving the server half on %s.", remote_args.listen)
    results = server.serve(listener, accept_seconds=remote_args.accept_timeout)
    output_dir = Path(training_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "server_results.json").write_text(json.dumps(results, indent=2))
    if results["status"] == "finished" and training_args.push_to_hub:
        if isinstance(server, FederatedServer):  # the server holds both halves (the client's averaged)
            results["hub_urls"] = server.split.push_to_hub(
                f"{training_args.hub_model_id}-client", f"{training_args.hub_model_id}-server",
                private=training_args.hub_private_repo, token=training_args.hub_token,
            )  # fmt: skip
        else:
            results["hub_url"] = str(server.split.server.push_to_hub(f"{training_args.hub_model_id}-server"))
    return results
