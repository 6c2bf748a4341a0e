"""Client and server as real separate processes (`recipes/serve.py`, `accelerate launch recipes/train.py
--server`): the same training as one process, and every fault ends within its timeout."""

import json
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from helpers import (
    TIMEOUT,
    client_kit,
    data_args,
    finish,
    free_address,
    launch,
    model_args,
    pair_case,
    run_drivers,
    signal_group,
    start_client,
    start_server,
    tiny_run_args,
    train_here,
    wait_for,
    wait_output,
    with_credentials,
)
from safetensors.torch import load_file

import hf_adc
from hf_adc.distributed import Kind, PeerLost, Refused, connect
from hf_adc.distributed.wire import FIXED, PROTOCOL_VERSION, encode_header, json_tensor


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    weights = {}
    files = ("client/model.safetensors", "server/model.safetensors", "head/model.safetensors", "bridge.safetensors",
             "server_bridge.safetensors")  # fmt: skip
    for name in files:
        if (folder / name).exists():
            weights.update({f"{name.split('/')[0]}:{key}": value for key, value in load_file(folder / name).items()})
    return {key.replace("server_bridge", "bridge"): value for key, value in weights.items() if "calls" not in key}


REMOTE_METHODS = {
    "none": ("--compression", "none"),
    "adc": ("--compression", "adc", "--xi", "0.25"),
    "bottlenet": ("--compression", "bottlenet", "--ratio", "0.25"),
    "topk": ("--compression", "topk", "--rate", "0.1"),
    "randomtopk": ("--compression", "randomtopk", "--rate", "0.1"),
    "c3sl": ("--compression", "c3sl", "--R", "4"),
    "quantize": ("--compression", "quantize", "--bits", "4"),
    "adc+quantize8": ("--compression", "adc+quantize", "--xi", "0.4", "--bits", "8"),
    "topk+quantize8": ("--compression", "topk+quantize", "--rate", "0.2", "--bits", "8"),
    "adc+bottlenet": ("--compression", "adc+bottlenet", "--xi", "0.4", "--ratio", "0.5"),
}
SINGLE_METHODS = ("none", "adc", "bottlenet", "topk", "randomtopk", "c3sl", "quantize")
CASES = [(method, 1) for method in REMOTE_METHODS] + [(method, 2) for method in SINGLE_METHODS]
# The client's trainable tensors, one gradient norm each at every optimizer step: the embeddings' 4 (CLS token,
# position embeddings, patch projection weight and bias) and 16 per client layer (weight and bias of q, k, v, the
# attention output, the intermediate and the output dense layers; two layer norms), for the split after layer 2;
# BottleNet++'s encoder adds two linear layers (weight and bias).
CLIENT_TENSORS = 4 + 2 * 16
ENCODER_TENSORS = 4
# The server's: 16 per server layer, the final layer norm and the classifier (weight and bias each); BottleNet++'s
# decoder adds two linear layers. Their norms come down with each step's last gradient.
SERVER_TENSORS, DECODER_TENSORS = 2 * 16 + 4, 4
STEPS, EVAL_ROWS, TOKENS, WIDTH, LABELS = 20, 48, 17, 32, 5
EVAL_WIDTH = {"bottlenet": 8, "adc+bottlenet": 16}  # d' = round(ratio * 32): the bottleneck runs in eval too


def _case_id(method: str, accumulation: int) -> str:
    return f"{method}-accumulation" if accumulation > 1 else method


PIPELINED = [("adc", 4), ("bottlenet", 2)]
USHAPED_CASES = [("adc", 0, 1), ("bottlenet", 0, 1), ("c3sl", 0, 1), ("adc+quantize8", 0, 1), ("none", 1, 2)]
# Every pair run, by name: (the run's settings, the client's own flags).
PAIRS = {
    **{_case_id(method, accumulation): (
        (*REMOTE_METHODS[method], "--gradient_accumulation_steps", str(accumulation), "--max_steps", str(STEPS)), ()
    ) for method, accumulation in CASES},
    **{f"pipelined-{method}-{accumulation}": (
        (*REMOTE_METHODS[method], "--gradient_accumulation_steps", str(accumulation), "--max_steps", str(STEPS)),
        ("--pipeline_micro_batches", "true"),
    ) for method, accumulation in PIPELINED},
    **{f"ushaped-{method}-head{head}-acc{accumulation}": (
        (*REMOTE_METHODS[method], "--label_privacy", "--head_layers", str(head), "--gradient_accumulation_steps",
         str(accumulation), "--max_steps", str(STEPS)), ()
    ) for method, head, accumulation in USHAPED_CASES},
    # NoPeek's penalty is the client's own: given to the client (and the one-process run), never to the server.
    "nopeek-adc": ((*REMOTE_METHODS["adc"], "--max_steps", str(STEPS)), ("--nopeek_weight", "0.5")),
}  # fmt: skip
BOTH_RUNS = {"nopeek-adc"}  # pairs whose client flags the one-process run takes too


@pytest.fixture(scope="module")
def pairs(tiny_vit_path, digits_dir, tmp_path_factory) -> tuple[Path, dict]:
    """Every run of `PAIRS` by a server and a client process (`NAME/split`), and in one process (`NAME/alone`): one
    start of each process for all runs (`pairs_driver.py`), the recipes' own code in each."""
    root = tmp_path_factory.mktemp("pairs")
    plan = []
    for name, (run, client_only) in PAIRS.items():
        shared = model_args(tiny_vit_path, *run)
        plan.append(pair_case(name, shared, digits_dir, root, free_address(), client_only=client_only))
        local_only = client_only if name in BOTH_RUNS else ()
        plan[-1]["local"] = [*shared, *data_args(digits_dir, root / name / "alone"), *local_only]
    return root, run_drivers(plan, root / "plan.json", "cpu.yaml")


def _pair_and_one_process(pairs: tuple[Path, dict], name: str) -> tuple[dict, dict]:
    """Run `name` by a server and a client process and in one process: checks that both trained alike (every loss,
    the accuracy, every weight to 1e-6); returns both results."""
    root, runs = pairs
    folder = root / name
    assert (folder / "split" / "results.json").exists(), runs["client_log"][-3000:] + runs["server_log"][-3000:]
    one = json.loads((folder / "alone" / "results.json").read_text())
    two = json.loads((folder / "split" / "results.json").read_text())
    losses = [[entry["loss"] for entry in run["log_history"] if "loss" in entry] for run in (one, two)]
    assert len(losses[0]) == STEPS
    assert losses[1] == pytest.approx(losses[0], abs=1e-6)
    assert two["test_accuracy"] == one["test_accuracy"]
    expected, actual = _weights(folder / "alone"), _weights(folder / "split")
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-6, rtol=0, msg=key)
    return one, two


@pytest.mark.parametrize(("method", "accumulation"), CASES, ids=[_case_id(*case) for case in CASES])
def test_two_processes_train_exactly_like_one(pairs, method, accumulation):
    one, two = _pair_and_one_process(pairs, _case_id(method, accumulation))
    _check_ledger(one, two, method, accumulation)
    split = pairs[0] / _case_id(method, accumulation) / "split"
    assert hf_adc.SplitViTForImageClassification.from_pretrained(split).server is not None


@pytest.mark.parametrize(("method", "accumulation"), PIPELINED)
def test_a_pipelined_step_trains_exactly_like_one_process(pairs, method, accumulation):
    """--pipeline_micro_batches: the step's forwards go out back to back, the gradients are applied as they come."""
    one, two = _pair_and_one_process(pairs, f"pipelined-{method}-{accumulation}")
    _check_ledger(one, two, method, accumulation)


def _micro_batches(accumulation: int, per_epoch: int = 96 // 16) -> int:
    """The micro-batches of `STEPS` steps: an epoch (96 rows in batches of 16) is steps of `accumulation`
    micro-batches, and a ragged last one of what is left."""
    ragged = per_epoch % accumulation
    windows = [accumulation] * (per_epoch // accumulation) + ([ragged] if ragged else [])
    return sum(windows[step % len(windows)] for step in range(STEPS))


def _check_ledger(one: dict, two: dict, method: str, accumulation: int) -> None:
    """The client's ledger is the one-process ledger plus the link's control values, to the byte."""
    # The ledger: the bridge's tensors as in one process, plus the link's control values. Per micro-batch the
    # label smoothing and the backward seed go up and the loss comes down (float64 each); per optimizer step a
    # float32 norm per client tensor and the float64 max norm go up, a float32 norm per server tensor comes down.
    norms = CLIENT_TENSORS + ENCODER_TENSORS * ("bottlenet" in method)
    server_norms = SERVER_TENSORS + DECODER_TENSORS * ("bottlenet" in method)
    micro_batches = _micro_batches(accumulation)
    control_up = micro_batches * 16 + STEPS * (4 * norms + 8)
    control_down = micro_batches * 8 + STEPS * 4 * server_norms
    assert two["uplink_bytes"] == one["uplink_bytes"] + control_up
    assert two["downlink_bytes"] == one["downlink_bytes"] + control_down
    assert two["uncompressed_bytes"] == one["uncompressed_bytes"] + control_up + control_down
    assert two["total_bytes"] == two["uplink_bytes"] + two["downlink_bytes"] and two["sync_bytes"] == 0
    # Evaluation (uncompressed: the eval-mode activations up, the logits down) is charged apart, in the inference
    # ledger; in one process nothing crosses a wire to evaluate.
    assert one["inference_bytes"] == 0
    assert two["inference_bytes"] == EVAL_ROWS * (TOKENS * EVAL_WIDTH.get(method, WIDTH) * 4 + LABELS * 4)
    transport = two["transport"]
    assert transport["payload_sent"] + transport["payload_received"] >= two["total_bytes"]


def test_nopeek_trains_a_pair_exactly_like_one_process(pairs):
    one, two = _pair_and_one_process(pairs, "nopeek-adc")
    _check_ledger(one, two, "adc", 1)  # the penalty is computed on the client: not a byte more crosses
    plain = json.loads((pairs[0] / "adc" / "alone" / "results.json").read_text())
    assert 0 < two["nopeek_distance_correlation"] == pytest.approx(one["nopeek_distance_correlation"], abs=1e-6)
    losses = [[entry["loss"] for entry in run["log_history"] if "loss" in entry] for run in (plain, one)]
    assert losses[1][0] > losses[0][0]  # the same first batch: the task loss plus 0.5 x the distance correlation


HEAD_TENSORS = 4  # the head's layernorm (weight, bias) and classifier (weight, bias); 16 more per head layer


@pytest.mark.parametrize(("method", "head_layers", "accumulation"), USHAPED_CASES,
                         ids=[f"{m}-head{h}-acc{a}" for m, h, a in USHAPED_CASES])  # fmt: skip
def test_a_ushaped_pair_trains_exactly_like_one_process_and_no_label_crosses(pairs, method, head_layers, accumulation):
    name = f"ushaped-{method}-head{head_layers}-acc{accumulation}"
    one, two = _pair_and_one_process(pairs, name)
    split = pairs[0] / name / "split"
    assert any(key.startswith("head:") for key in _weights(split))

    # No label crosses either way: per micro-batch only the row count of the FORWARD goes up as a control value
    # (float64), nothing comes down (the client holds the loss); per optimizer step the norms as in the standard
    # split, one per client tensor, the head's included.
    norms = CLIENT_TENSORS + HEAD_TENSORS + 16 * head_layers + ENCODER_TENSORS * ("bottlenet" in method)
    server_norms = SERVER_TENSORS - 4 - 16 * head_layers + DECODER_TENSORS * ("bottlenet" in method)  # the middle's
    micro_batches = STEPS * accumulation
    control_up = micro_batches * 8 + STEPS * (4 * norms + 8)
    control_down = STEPS * 4 * server_norms
    assert two["uplink_bytes"] == one["uplink_bytes"] + control_up
    assert two["downlink_bytes"] == one["downlink_bytes"] + control_down
    assert two["uncompressed_bytes"] == one["uncompressed_bytes"] + control_up + control_down
    # Evaluation: the eval-mode activations up, the head's input down (the CLS row, or every token with head layers).
    head_tokens = TOKENS if head_layers else 1
    assert two["inference_bytes"] == EVAL_ROWS * (TOKENS * EVAL_WIDTH.get(method, WIDTH) + head_tokens * WIDTH) * 4
    assert two["topology"] == one["topology"] == "u-shaped"
    merged = hf_adc.SplitViTForImageClassification.from_pretrained(split)
    assert isinstance(merged, hf_adc.USplitViTForImageClassification) and merged.server is not None


def test_every_frame_of_a_ushaped_session_is_free_of_labels(tiny_vit_path, digits_dir, tmp_path, monkeypatch):
    """Every frame the client sends and receives, recorded: no tensor named labels, nothing of a label's shape
    (class ids, one per sample; soft labels, one weight per class), only the names the U-shaped wire carries."""
    from hf_adc.distributed.connect import Connection

    frames = []
    send, recv = Connection.send, Connection.recv

    def recording_send(self, kind, tensors=None, step=0, value=0.0):
        frames.append((kind, dict(tensors or {})))
        return send(self, kind, tensors, step, value)

    def recording_recv(self, *expected, timeout=None):
        frame = recv(self, *expected, timeout=timeout)
        frames.append((frame.kind, frame.tensors))
        return frame

    monkeypatch.setattr(Connection, "send", recording_send)
    monkeypatch.setattr(Connection, "recv", recording_recv)
    monkeypatch.setenv("HF_ADC_JOIN_TOKEN", "secret")
    run = ("--compression", "adc", "--xi", "0.25", "--label_privacy", "--max_steps", "3")
    address = free_address()
    server = start_server(address, tmp_path / "split", *model_args(tiny_vit_path, *run))
    client = [*model_args(tiny_vit_path, *run), *data_args(digits_dir, tmp_path / "split"), "--server", address,
              "--timeout", TIMEOUT]  # fmt: skip
    train_here(with_credentials(client))
    finish(server)
    assert server.returncode == 0
    kinds = [kind for kind, _ in frames]
    assert kinds.count(Kind.FORWARD) == 3 and kinds.count(Kind.HEAD_BACKWARD) == 3 and kinds.count(Kind.STEP) == 3
    names = {name for kind, tensors in frames if kind != Kind.HELLO for name in tensors}
    assert names == {"activations", "head_activations", "head_gradients", "gradients", "norm", "scalars"}
    for kind, tensors in frames:
        for name, tensor in tensors.items():
            assert not (tensor.dim() == 1 and tensor.numel() == 16 and not tensor.is_floating_point()), (kind, name)
            assert not (tensor.dim() == 2 and tensor.shape[1] == LABELS), (kind, name)


def _latest_checkpoint_both_saved(folder: Path) -> Path | None:
    saved = [
        path for path in folder.glob("checkpoint-*")
        if (path / "trainer_state.json").exists() and (path / "server_state.safetensors").exists()
    ]  # fmt: skip
    return max(saved, key=lambda path: int(path.name.split("-")[1]), default=None)


LONG_RUN = ("--max_steps", "400", "--save_strategy", "steps", "--save_steps", "10")


def _training_pair(address, checkpoint, digits_dir, output_dir, *extra) -> tuple[subprocess.Popen, subprocess.Popen]:
    """A server and a client on a long run, returned once both sides have saved a checkpoint."""
    server = start_server(address, output_dir, *model_args(checkpoint), *LONG_RUN, *extra)
    client = start_client(address, checkpoint, digits_dir, output_dir, *LONG_RUN, *extra)
    wait_for(lambda: _latest_checkpoint_both_saved(output_dir) is not None, 120, "a checkpoint both sides saved")
    return server, client


def test_a_killed_client_is_noticed_and_both_sides_resume_from_the_last_step_both_saved(
    tiny_vit_path, digits_dir, tmp_path
):
    address, output_dir = free_address(), tmp_path / "run"
    server, client = _training_pair(address, tiny_vit_path, digits_dir, output_dir)
    signal_group(client, signal.SIGKILL)
    server_log = finish(server, timeout=float(TIMEOUT) + 10)  # it notices within its timeout
    assert server.returncode == 0 and "lost" in server_log, server_log[-3000:]
    checkpoint = _latest_checkpoint_both_saved(output_dir)
    step = int(checkpoint.name.split("-")[1])
    saved_ledger = json.loads((checkpoint / "ledger.json").read_text())["ledger"]

    server = start_server(address, output_dir, *model_args(tiny_vit_path), *LONG_RUN)
    resume = ("--resume_from_checkpoint", str(checkpoint))
    client = start_client(address, tiny_vit_path, digits_dir, output_dir, *LONG_RUN, *resume)
    client_log = wait_output(client, 300)
    server_log = finish(server)
    assert client.returncode == 0, client_log[-3000:] + server_log[-3000:]
    resumed = json.loads((output_dir / "results.json").read_text())
    assert resumed["steps"] == 400
    per_step = (resumed["total_bytes"] - saved_ledger["total_bytes"]) / (400 - step)
    assert per_step == pytest.approx(saved_ledger["total_bytes"] / step)
    assert "optimizer steps" in server_log and "finished after 400" in server_log, server_log[-2000:]


def test_a_killed_server_stops_the_client_with_the_address_and_keeps_its_checkpoints(
    tiny_vit_path, digits_dir, tmp_path
):
    address, output_dir = free_address(), tmp_path / "run"
    server, client = _training_pair(address, tiny_vit_path, digits_dir, output_dir)
    signal_group(server, signal.SIGKILL)
    client_log = wait_output(client, float(TIMEOUT) + 30)  # it gives up within its timeout
    assert client.returncode != 0
    assert f"lost the peer at the server at {address}" in client_log, client_log[-3000:]
    assert _latest_checkpoint_both_saved(output_dir) is not None


@pytest.mark.parametrize("hung", ["client", "server"])
def test_a_hung_peer_ends_at_the_timeout(tiny_vit_path, digits_dir, tmp_path, hung):
    address, output_dir = free_address(), tmp_path / "run"
    server, client = _training_pair(address, tiny_vit_path, digits_dir, output_dir, "--timeout", "5")
    stopped, waiting = (server, client) if hung == "server" else (client, server)
    signal_group(stopped, signal.SIGSTOP)  # killed, stopped as it is, when the test ends
    output = wait_output(waiting, 5 + 30)  # it gives up within its 5 s timeout
    assert "Timed out" in output or "timed out" in output.lower(), output[-3000:]


def _header(**fields) -> torch.Tensor:
    header = encode_header(Kind.HELLO, 0, {"settings": torch.zeros(4, dtype=torch.uint8)})
    slots = {"magic": 0, "version": 1, "kind": 2, "step": 3, "count": 4}
    slots.update(name=FIXED, dtype=FIXED + 1, rank=FIXED + 2, dim0=FIXED + 3)
    for name, value in fields.items():
        header[slots[name]] = value
    return header


BAD_HEADERS = [
    ({"magic": 123}, "header field magic=0x7b"),
    ({"version": PROTOCOL_VERSION + 98}, f"header field version={PROTOCOL_VERSION + 98}"),
    ({"kind": 77}, "header field kind=77 is unknown"),
    ({"step": -1}, "header field step=-1"),
    ({"count": 9}, "header field count=9"),
    ({"name": 999}, "header field name=999"),
    ({"dtype": 99}, "header field dtype=99"),
    ({"rank": 7}, "header field rank=7"),
    ({"dim0": -4}, "negative size"),
    ({"rank": 2, "dim0": 2**20, "dtype": 0}, "over the cap"),
]


def _refusal(address: str, send) -> str:
    """What the server answers to `send(channel)`; every send and receive ends at the channel's timeout."""
    timeout = timedelta(seconds=float(TIMEOUT))
    channel = connect(address, timeout, client_kit())
    send(channel)
    with pytest.raises(Refused) as refused:
        channel.recv(Kind.WELCOME, timeout=timeout)
    return str(refused.value)


def test_bad_headers_tokens_and_splits_are_refused_and_the_server_then_serves_a_good_client(
    tiny_vit_path, digits_dir, tmp_path
):
    address, output_dir = free_address(), tmp_path / "run"
    server = start_server(address, output_dir, *model_args(tiny_vit_path), "--max_steps", "3")
    for fields, expected in BAD_HEADERS:
        header = _header(**fields)
        if fields.get("rank") == 2:
            header[FIXED + 4] = 2**20
        reason = _refusal(address, lambda channel, header=header: channel.send_bytes(header.numpy().tobytes()))
        assert expected in reason, (fields, reason)
    names = [str(i) for i in range(5)]
    wrong_token = {"labels": names, "token": "guess"}
    reason = _refusal(address, lambda channel: channel.send(Kind.HELLO, {"settings": json_tensor(wrong_token)}))
    assert "wrong join token" in reason
    other_split = {"labels": names, "token": "secret", "split_layer": 3}
    reason = _refusal(address, lambda channel: channel.send(Kind.HELLO, {"settings": json_tensor(other_split)}))
    assert "split_layer: client 3, server 2" in reason
    reason = _refusal(address, lambda channel: channel.send(Kind.FORWARD))
    assert "expected a HELLO message; got FORWARD" in reason
    client = launch(
        "train.py",
        [*model_args(tiny_vit_path), *data_args(digits_dir, output_dir), "--max_steps", "3", "--server", address,
         "--timeout", TIMEOUT],
    )  # fmt: skip
    server_log = finish(server)
    assert client.returncode == 0, client.stderr[-3000:] + server_log[-3000:]
    assert "finished after 3 optimizer steps" in server_log
    assert server_log.count("refused") == len(BAD_HEADERS) + 3


def test_an_unreachable_server_is_named_in_the_error():
    address = free_address()
    pool = ThreadPoolExecutor(1)
    try:
        attempt = pool.submit(connect, address, timedelta(seconds=2), client_kit())
        with pytest.raises(PeerLost, match=f"cannot reach the server at {address}"):
            attempt.result(timeout=15)  # a 2 s timeout gives up well within 15 s
    finally:
        pool.shutdown(wait=False)


def test_the_readme_one_machine_command_runs_end_to_end(tiny_vit_path, digits_dir, tmp_path):
    output_dir = tmp_path / "run"
    done = launch("train.py", [*tiny_run_args(tiny_vit_path, digits_dir, output_dir, "--xi", "0.25"), "--distributed"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "an uncompressed split would have sent" in done.stdout
    results = json.loads((output_dir / "results.json").read_text())
    assert results["transport"]["framing_sent"] > 0 and results["total_bytes"] <= results["budget_bytes"]
    split = hf_adc.SplitViTForImageClassification.from_pretrained(output_dir)
    assert split.client is not None and split.server is not None


def test_a_backward_seed_other_than_the_agreed_one_raises_before_any_gradient_is_applied(tiny_vit_path, tmp_path,
                                                                                         monkeypatch):  # fmt: skip
    """The server back-propagates the agreed seed as soon as the forward comes; a loss reweighted after the model
    (here doubled in compute_loss) would need another, so the client stops before any step, naming both."""
    from helpers import client_split, kits, start_server, tensor_dataset

    from hf_adc.distributed.arguments import RemoteArguments
    from hf_adc.distributed.client import SeedMismatch
    from hf_adc.distributed.launch import remote_split

    monkeypatch.setenv("HF_ADC_JOIN_TOKEN", "secret")
    run = model_args(tiny_vit_path, "--compression", "none", "--max_steps", "2")
    address = free_address()
    server = start_server(address, tmp_path / "server", *run)
    split, training, _ = client_split([*run, "--output_dir", str(tmp_path / "client"), "--eval_strategy", "no"],
                                      [str(i) for i in range(LABELS)])  # fmt: skip
    remote = remote_split(split, training, RemoteArguments(server=address, credentials=str(kits() / "client-0"),
                                                           timeout=float(TIMEOUT)))  # fmt: skip
    before = {name: tensor.clone() for name, tensor in remote.client.state_dict().items()}

    class Weighted(hf_adc.ADCTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return 2 * super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)

    trainer = Weighted(model=remote, args=training, train_dataset=tensor_dataset(32))
    with pytest.raises(SeedMismatch, match="asks for a seed of 2.0; the server back-propagated the agreed 1.0"):
        trainer.train()
    for name, tensor in remote.client.state_dict().items():
        torch.testing.assert_close(tensor, before[name], atol=0, rtol=0, msg=name)
    remote.link.peer.close()
    finish(server)
