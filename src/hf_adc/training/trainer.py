"""`ADCTrainer`: a `Trainer` for split ViTs that logs what crosses the cut and stops on a byte budget."""

import json
import logging
import math
import os
import time
from functools import cache

import evaluate
import torch
from transformers import EvalPrediction, Trainer, TrainerCallback, TrainerState
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..link import Ledger
from ..metrics import load_accuracy
from ..split import SplitViTForImageClassification
from .arguments import ADCTrainingArguments

logger = logging.getLogger(__name__)

LEDGER_FILE = "ledger.json"


@cache
def _accuracy_metric() -> evaluate.EvaluationModule:
    return load_accuracy()


def classification_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """Top-1 accuracy, and top-5 accuracy when there are more than 5 classes, through the `evaluate` metric
    shipped with hf_adc (`hf_adc.metrics`, offline)."""
    return _accuracy_metric().compute(predictions=prediction.predictions, references=prediction.label_ids)


class _CommunicationCallback(TrainerCallback):
    """After each optimizer step: sums the ledgers of all ranks, and stops before the budget would be exceeded."""

    def __init__(self, trainer: "ADCTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.train_started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        trainer.sync_communication()
        budget = trainer.budget_bytes
        if budget is not None and trainer.communication["total_bytes"] + trainer.step_bytes > budget:
            logger.info(
                "Communication budget: %d of %d bytes spent; the next step (%d bytes) would exceed it. Stopping.",
                trainer.communication["total_bytes"],
                budget,
                trainer.step_bytes,
            )
            trainer.budget_exhausted = True
            control.should_training_stop = True
            control.should_save = args.save_strategy != "no"
        return control


class ADCTrainer(Trainer):
    """Trains a `SplitViTForImageClassification` and accounts for every byte that crosses its cut.

    - the loss is the split model's own (soft-target cross-entropy over what the server received);
    - training logs carry cumulative uplink / downlink bytes (summed over ranks), the uncompressed
      equivalent, the achieved ratio and the share of the budget spent;
    - with a budget (`ADCTrainingArguments.communication_budget` or `budget_epochs`), training stops at the
      last step that fits and saves there; a budget smaller than one step is an error before training;
    - evaluation runs uncompressed on the whole model and reports accuracy (top-5 too beyond 5 classes);
    - checkpoints carry the ledger, so `resume_from_checkpoint` continues the budget where it was.
    """

    loss_is_scaled_for_ga = False

    def __init__(self, model: SplitViTForImageClassification, args: ADCTrainingArguments, **kwargs):
        if not isinstance(model, SplitViTForImageClassification):
            raise TypeError(
                "ADCTrainer trains a SplitViTForImageClassification (see hf_adc.split_vit); "
                f"got {type(model).__name__}."
            )
        if not isinstance(args, ADCTrainingArguments):
            raise TypeError(f"ADCTrainer needs ADCTrainingArguments; got {type(args).__name__}.")
        if args.n_gpu > 1:
            raise ValueError(
                f"This process sees {args.n_gpu} GPUs and no distributed launch: the Trainer would wrap the split "
                "model in nn.DataParallel, which cannot gather its communication records, and the budget would "
                f"count one GPU. Run one process per GPU: `accelerate launch --multi_gpu --num_processes {args.n_gpu} "
                "recipes/train.py ...` (or pick one GPU with CUDA_VISIBLE_DEVICES=0)."
            )
        if args.pipeline_micro_batches and not model.link.pipelines:
            raise ValueError(
                "pipeline_micro_batches=True sends a step's forwards ahead of their backwards to a server in another "
                f"process over one stream; this split's link ({type(model.link).__name__}) cannot: train with a "
                "--server (the standard split, one process a side)."
            )
        if args.pipeline_micro_batches and args.world_size > 1:
            raise ValueError(
                f"pipeline_micro_batches=True with {args.world_size} processes: a process's forwards run ahead of the "
                "backwards DDP synchronises; pipeline with one process on the client."
            )
        kwargs.setdefault("compute_metrics", classification_metrics)
        # The split model smooths its own (soft) targets (see compute_loss); the Trainer's label smoother would
        # take the labels away from it, and looks for a `config` the plain-module wrapper does not have.
        smoothing, args.label_smoothing_factor = args.label_smoothing_factor, 0.0
        super().__init__(model=model, args=args, **kwargs)
        args.label_smoothing_factor = smoothing
        self.model_accepts_loss_kwargs = False
        self._window, self._window_losses = [], []  # a step's micro-batches and, pipelined, their losses
        self.budget_exhausted = False
        self.train_started = None  # perf_counter() at the start of train(); logs carry the wall time since
        self.communication = self._summary(Ledger())
        self._plan_budget()
        self.add_callback(_CommunicationCallback(self))
        for callback in self.model.link.trainer_callbacks(args):
            self.add_callback(callback)

    @property
    def ledger(self) -> Ledger:
        return self.model.ledger

    def _clip_grad_norm(self, model):
        if not self.model.link.peer_steps:
            return super()._clip_grad_norm(model)
        return self._step_with_peer(model, self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None and self.model.link.peer_steps:
            grad_norm = self._step_with_peer(model, float("inf"))
        return super()._get_grad_norm(model, grad_norm)

    def _step_with_peer(self, model, max_norm: float) -> torch.Tensor:
        """Clips by the norm of the gradients on both sides, as one process would (the peer steps with us)."""
        self.accelerator.unscale_gradients()
        trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
        norms = torch.stack([
            torch.nn.utils.get_total_norm([p.grad]) if p.grad is not None else p.new_zeros((), dtype=torch.float32)
            for p in trainable
        ])  # fmt: skip
        total_norm = self.model.link.optimizer_step(norms, max_norm).to(norms.device)
        parameters = [parameter for parameter in trainable if parameter.grad is not None]
        if math.isfinite(max_norm):
            torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total_norm)
        return total_norm

    def _micro_batch_sizes(self) -> set[int]:
        """The batch sizes one process's training loader yields: full batches and, unless dropped, the ragged
        last batch of its shard."""
        args = self.args
        sizes = {args.per_device_train_batch_size}
        if self.train_dataset is not None and not args.dataloader_drop_last:
            ragged = math.ceil(len(self.train_dataset) / args.world_size) % args.per_device_train_batch_size
            sizes.add(ragged or args.per_device_train_batch_size)
        return sizes

    def _plan_budget(self) -> None:
        """The most bytes one optimizer step can send over all ranks, the budget in bytes, and enough steps to
        spend it.

        A step's cost is taken at its costliest micro-batch size: rounding of T and k (ADC) can make a ragged last
        batch send more than a full one, and the stop rule must never let a step exceed the budget.
        """
        args = self.args
        micro_batches = args.gradient_accumulation_steps * args.world_size
        micro_batch_bytes = max(sum(self.model.wire_bytes(size)) for size in self._micro_batch_sizes())
        step_control = sum(self.model.link.step_control_bytes) * args.world_size
        self.step_bytes = micro_batch_bytes * micro_batches + step_control
        full_step_bytes = sum(self.model.wire_bytes(args.per_device_train_batch_size)) * micro_batches + step_control
        self.budget_bytes = None
        planned_by_peer = self.model.link.plans_steps
        if not args.has_budget and not planned_by_peer:
            return
        if self.train_dataset is None:
            raise ValueError("A communication budget needs a train_dataset to plan against.")
        per_sample = sum(self.model.wire_bytes(1, compressed=False)) - sum(self.model.link.control_bytes)
        self.epoch_bytes = per_sample * len(self.train_dataset)
        if planned_by_peer:
            return  # one client of several: the server plans the steps (see `train`)
        self.budget_bytes = args.budget_bytes(self.epoch_bytes)
        if self.budget_bytes < self.step_bytes:
            raise ValueError(
                f"The communication budget of {self.budget_bytes} bytes is smaller than one training step "
                f"({self.step_bytes} bytes at batch {args.per_device_train_batch_size} x "
                f"{args.gradient_accumulation_steps} accumulation x {args.world_size} processes): raise it above that."
            )
        if args.max_steps <= 0:
            full_steps = self.budget_bytes // full_step_bytes
            steps_per_epoch = max(len(self.train_dataset) // (args.per_device_train_batch_size * micro_batches), 1)
            args.max_steps = full_steps + math.ceil(full_steps / steps_per_epoch) + 1
            logger.info("Budget of %d bytes: training for up to %d steps.", self.budget_bytes, args.max_steps)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None):
        """`Trainer.train`; when the link's other end plans the steps (one client of a federation, whose server
        fixes them so that all clients and their sync fit the budget), it first asks for them, telling it the step
        it resumes from."""
        if self.model.link.plans_steps:
            start = checkpoint_step(resume_from_checkpoint, self.args.output_dir)
            self.args.max_steps = self.model.link.plan_steps(
                len(self.train_dataset), self.step_bytes, self.epoch_bytes, start
            )
            logger.info("Steps planned by the server: %d.", self.args.max_steps)
        return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval)

    @staticmethod
    def _summary(ledger: Ledger) -> dict[str, int]:
        return {
            **ledger.state_dict(),
            "total_bytes": ledger.total_bytes,
            "uncompressed_bytes": ledger.uncompressed_bytes,
        }

    def sync_communication(self) -> dict[str, int]:
        """Sums the ledgers of all processes into `self.communication` (a collective: call on every rank)."""
        totals = torch.tensor(list(self.ledger.state_dict().values()), dtype=torch.int64, device=self.args.device)
        if self.args.world_size > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        summed = Ledger()
        summed.load_state_dict(dict(zip(Ledger.FIELDS, totals.tolist(), strict=True)))
        self.communication = self._summary(summed)
        return self.communication

    def get_batch_samples(self, epoch_iterator, num_batches: int, device):
        """The Trainer's prefetched micro-batches of one optimizer step, kept: with `pipeline_micro_batches` the first
        `training_step` of the step sends every forward of the window."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._window, self._window_losses = batch_samples, []
        return batch_samples, num_items_in_batch

    def training_step(self, model, inputs, num_items_in_batch=None):
        """As the Trainer's, or with `pipeline_micro_batches` pipelined across the step's micro-batches: the first
        call sends every forward of the step back to back (the link keeps their replies coming), and each call then
        takes its micro-batch's reply and back-propagates it, in order, as one process would."""
        if not self.args.pipeline_micro_batches:
            return super().training_step(model, inputs, num_items_in_batch)
        index = next(i for i, batch in enumerate(self._window) if batch is inputs)
        link = self.model.link
        if index == 0:
            model.train()
            link.defer_replies = True
            try:
                for batch in self._window:
                    batch = self._prepare_inputs(batch)
                    with self.compute_loss_context_manager():
                        loss = self.compute_loss(model, batch, num_items_in_batch=num_items_in_batch)
                    self._window_losses.append(loss)
            finally:
                link.defer_replies = False
        link.receive_reply()
        loss = self._window_losses[index] / self.current_gradient_accumulation_steps
        self._window_losses[index] = None  # its graph goes with its backward
        self.accelerator.backward(loss)
        return loss.detach()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The split model's own loss; `label_smoothing_factor` reaches it as `label_smoothing` (the Trainer's
        label smoother cannot smooth the soft labels of merged samples)."""
        if self.args.label_smoothing_factor:
            inputs = {**inputs, "label_smoothing": self.args.label_smoothing_factor}
        if model.training:
            self.model.link.backward_seed(self._backward_seed(), self.current_gradient_accumulation_steps)
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def _backward_seed(self) -> float:
        """The seed `training_step`'s backward will give this micro-batch's loss: 1 / the step's micro-batches (unless
        the loss is already scaled for them), times the loss scale under fp16. A link whose other end back-propagates
        as soon as the forward comes needs it in advance (`Link.backward_seed`)."""
        scaled = self.loss_is_scaled_for_ga if self.loss_is_scaled_for_ga is not None else (
            self.compute_loss_func is not None
        )  # fmt: skip
        seed = 1.0 if scaled else 1.0 / self.current_gradient_accumulation_steps
        scaler = getattr(self.accelerator, "scaler", None)
        return seed * float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else seed

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs or "train_loss" in logs or any(key.startswith("eval_") for key in logs):
            spent = self.communication
            logs.update({key: float(value) for key, value in spent.items()})
            logs["compression_ratio"] = (
                spent["total_bytes"] / spent["uncompressed_bytes"] if spent["uncompressed_bytes"] else 1.0
            )
            if self.budget_bytes is not None:
                logs["budget_spent"] = spent["total_bytes"] / self.budget_bytes
            if self.train_started is not None:
                logs["wall_seconds"] = time.perf_counter() - self.train_started
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        self.sync_communication()  # callbacks after ours may have sent more this step (a federation's sync)
        if self.args.should_save:
            folder = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            with open(os.path.join(folder, LEDGER_FILE), "w") as file:
                json.dump({"ledger": self.communication, "budget_bytes": self.budget_bytes}, file, indent=2)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, LEDGER_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{resume_from_checkpoint} has no {LEDGER_FILE}: it was not written by ADCTrainer.")
        with open(path) as file:
            saved = json.load(file)["ledger"]
        # The checkpoint's bytes, plus what this process sent before training began (a federation's plan).
        before = self.ledger.state_dict()
        restored = Ledger()
        restored.load_state_dict({name: int(saved.get(name, 0)) + before[name] for name in Ledger.FIELDS})
        if self.args.process_index == 0:
            self.ledger.load_state_dict(restored.state_dict())
        self.communication = self._summary(restored)


def checkpoint_step(resume_from_checkpoint: str | bool | None, output_dir: str) -> int:
    """The optimizer step a `resume_from_checkpoint` argument resumes from (0 for none; True: the last checkpoint
    in `output_dir`)."""
    if not resume_from_checkpoint:
        return 0
    if resume_from_checkpoint is True:
        resume_from_checkpoint = get_last_checkpoint(output_dir)
        if resume_from_checkpoint is None:
            raise ValueError(f"resume_from_checkpoint=True, but {output_dir} holds no checkpoint-N folder.")
    state = os.path.join(resume_from_checkpoint, TRAINER_STATE_NAME)
    if not os.path.isfile(state):
        raise FileNotFoundError(f"{resume_from_checkpoint} is not a Trainer checkpoint (no {TRAINER_STATE_NAME}).")
    return TrainerState.load_from_json(state).global_step
