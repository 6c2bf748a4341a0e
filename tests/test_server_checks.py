"""What the server half takes from the network is checked against the agreed split and the server's own settings
before it is used: labels, shapes, finiteness, the backward seed, the clipping norm, and the order of messages."""

import math

import pytest
import torch
from transformers import TrainingArguments

import hf_adc
from hf_adc.distributed.server import Session
from hf_adc.distributed.server_half import ServerHalf, global_norm
from hf_adc.distributed.wire import Frame, Kind, WireError

BATCH, TOKENS, WIDTH = 4, 17, 32


@pytest.fixture
def half(tiny_vit, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_grad_norm=1.0)
    server_half = ServerHalf(hf_adc.split_vit(tiny_vit, 2), args)
    server_half.make_optimizer(10)
    return server_half


def forward_tensors(**overrides):
    tensors = {"activations": torch.randn(BATCH, TOKENS, WIDTH), "labels": torch.tensor([0, 1, 2, 3])}
    tensors.update(overrides)
    return {name: tensor for name, tensor in tensors.items() if tensor is not None}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"labels": None}, "must carry the labels"),
        ({"labels": torch.tensor([0, 1, 2, 9])}, "labels out of range \\[0, 5\\)"),
        ({"labels": torch.tensor([0, 1, 2, 3], dtype=torch.int32)}, "int64 vector of class ids"),
        ({"labels": torch.full((BATCH, 7), 0.2)}, "soft labels must be \\(T, 5\\)"),
        ({"labels": -torch.ones(BATCH, 5)}, "non-negative with a positive sum"),
        ({"activations": torch.full((BATCH, TOKENS, WIDTH), float("nan"))}, "activations that came hold NaN"),
        ({"activations": torch.randn(BATCH, TOKENS, WIDTH + 1)}, "width 33 do not fit the split's 32"),
        ({"activations": torch.randn(BATCH + 1, TOKENS, WIDTH)}, "do not fit 4 labels and 17 tokens"),
        ({"activations": torch.randn(BATCH, TOKENS + 1, WIDTH)}, "do not fit 4 labels and 17 tokens"),
    ],
)
def test_a_forward_that_breaks_the_agreed_split_is_refused(half, overrides, message):
    with pytest.raises(WireError, match=message):
        half.forward(forward_tensors(**overrides), 0.0)


def test_smoothing_other_than_the_agreed_is_refused(half):
    with pytest.raises(WireError, match="label smoothing 0.5 is not the agreed 0.0"):
        half.forward(forward_tensors(), 0.5)


@pytest.mark.parametrize(("seed", "micro_batches"), [(0.0, 1), (-1.0, 1), (0.5, 1), (float("nan"), 1), (1e9, 1),
                                                    (1.0, 2), (0.25, 2)])  # fmt: skip
def test_a_backward_seed_other_than_one_over_the_steps_micro_batches_is_refused(half, seed, micro_batches):
    pending = half.forward(forward_tensors(), 0.0)
    with pytest.raises(WireError, match="backward seed"):
        half.backward(pending, seed, micro_batches)


def test_an_honest_step_goes_through_with_the_norm_the_client_forms_from_the_servers(half):
    half.backward(half.forward(forward_tensors(), 0.0), 0.5, 2)
    half.backward(half.forward(forward_tensors(), 0.0), 0.5, 2)
    norms, server_norms = torch.ones(half.num_client_norms), half.gradient_norms()
    assert server_norms.dtype == torch.float32 and server_norms.shape == (half.num_server_norms,)
    expected = global_norm(norms, server_norms, 0)  # what the client computes from what came down
    total = half.optimizer_step(norms, 1.0)
    assert float(total) == float(expected) and half.steps == 1
    assert math.isfinite(float(total)) and float(total) >= math.sqrt(half.num_client_norms)


@pytest.mark.parametrize(
    ("norms", "max_norm", "message"),
    [
        (lambda n: -torch.ones(n), 1.0, "negative"),
        (lambda n: torch.ones(n + 1), 1.0, "must carry"),
        (lambda n: torch.ones(n, dtype=torch.float64), 1.0, "must carry"),
        (lambda n: torch.ones(n), -1.0, "not the agreed max_grad_norm 1.0"),
        (lambda n: torch.ones(n), 1e9, "not the agreed max_grad_norm 1.0"),
    ],
)
def test_a_step_with_norms_or_a_clipping_norm_the_server_did_not_agree_is_refused(half, norms, max_norm, message):
    half.backward(half.forward(forward_tensors(), 0.0), 1.0, 1)
    with pytest.raises(WireError, match=message):
        half.optimizer_step(norms(half.num_client_norms), max_norm)


def test_a_step_before_any_micro_batch_is_refused(half):
    with pytest.raises(WireError, match="before any micro-batch"):
        half.optimizer_step(torch.ones(half.num_client_norms), 1.0)


def frames(*kinds, micro_batches: int = 2) -> list[Frame]:
    """Frames of `kinds`, each FORWARD announcing a step of `micro_batches`."""
    return [Frame(kind, step=micro_batches if kind == Kind.FORWARD else 0) for kind in kinds]


@pytest.mark.parametrize(
    ("kinds", "message"),
    [
        ([Kind.STEP], "STEP message is out of place here: expected BEGIN"),
        ([Kind.BEGIN, Kind.STEP], "STEP message is out of place"),
        ([Kind.BEGIN, Kind.FORWARD, Kind.EVAL], "EVAL message is out of place here: expected FORWARD"),
        ([Kind.BEGIN, Kind.FORWARD, Kind.STEP], "STEP message is out of place here: expected FORWARD"),
        ([Kind.BEGIN, Kind.FORWARD, Kind.FORWARD, Kind.SYNC], "SYNC message is out of place here: expected STEP"),
        ([Kind.BEGIN, Kind.FORWARD, Kind.FORWARD, Kind.FORWARD], "expected STEP"),
        ([Kind.BEGIN, Kind.HEAD_BACKWARD], "HEAD_BACKWARD message is out of place"),
        ([Kind.BEGIN, Kind.BEGIN], "BEGIN message is out of place"),
    ],
)
def test_messages_out_of_order_end_the_session(kinds, message):
    session = Session(1, connection=None, micro_batches=2)
    with pytest.raises(WireError, match=message):
        for frame in frames(*kinds):
            session.advance(frame)


def test_a_step_of_more_micro_batches_than_the_agreed_accumulation_or_changing_count_ends_the_session():
    session = Session(1, connection=None, micro_batches=2)
    session.advance(Frame(Kind.BEGIN))
    with pytest.raises(WireError, match="a step of 3 micro-batches is out of range: 1 .. 2"):
        session.advance(Frame(Kind.FORWARD, step=3))
    session.advance(Frame(Kind.FORWARD, step=2))
    with pytest.raises(WireError, match="announces a step of 1 micro-batches; this step's first announced 2"):
        session.advance(Frame(Kind.FORWARD, step=1))


def test_the_order_of_an_honest_session_is_accepted():
    session = Session(1, connection=None, micro_batches=2)
    for frame in frames(Kind.BEGIN, Kind.TURN, Kind.FORWARD, Kind.FORWARD, Kind.STEP, Kind.HANDOFF, Kind.SAVE,
                        Kind.EVAL, Kind.EVAL, Kind.SYNC):  # fmt: skip
        session.advance(frame)
    for frame in frames(Kind.FORWARD, Kind.STEP, Kind.END, micro_batches=1):  # a ragged last step
        session.advance(frame)
    assert session.phase == "idle"
    ushaped = Session(1, connection=None, micro_batches=2)
    ushaped.ushaped = True
    for frame in frames(Kind.BEGIN, Kind.FORWARD, Kind.HEAD_BACKWARD, Kind.FORWARD, Kind.HEAD_BACKWARD, Kind.STEP):
        ushaped.advance(frame)
    assert ushaped.phase == "idle"


@pytest.fixture
def ushaped_half(tiny_vit, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_grad_norm=1.0)
    server_half = ServerHalf(hf_adc.split_vit(tiny_vit, 2, label_privacy=True), args)
    server_half.make_optimizer(10)
    return server_half


def test_the_ushaped_server_holds_no_head_and_returns_cls_rows_computed_without_labels(ushaped_half):
    assert ushaped_half.split.head is None and ushaped_half.split.client is None
    pending, returned = ushaped_half.forward_head({"activations": torch.randn(BATCH, TOKENS, WIDTH)}, float(BATCH))
    assert set(returned) == {"head_activations"} and returned["head_activations"].shape == (BATCH, 1, WIDTH)
    gradient = ushaped_half.backward_head(pending, torch.ones(BATCH, 1, WIDTH))
    assert gradient["gradients"].shape == (BATCH, TOKENS, WIDTH) and bool(gradient["gradients"].abs().sum() > 0)


@pytest.mark.parametrize(
    ("tensors", "rows", "message"),
    [
        ({"labels": torch.tensor([0, 1, 2, 3])}, BATCH, "carries no labels: they stay on the client"),
        ({}, 9, "9 samples are out of range: 1 .. the agreed batch of 8"),
        ({}, 0, "0 samples are out of range"),
        ({}, 2.5, "row count 2.5 is not a whole number"),
        ({}, 3, "do not fit 3 rows and 17 tokens"),
        ({"activations": torch.full((BATCH, TOKENS, WIDTH), float("inf"))}, BATCH, "activations that came hold NaN"),
    ],
)
def test_a_ushaped_forward_that_breaks_the_agreed_split_is_refused(ushaped_half, tensors, rows, message):
    tensors = {"activations": torch.randn(BATCH, TOKENS, WIDTH), **tensors}
    with pytest.raises(WireError, match=message):
        ushaped_half.forward_head(tensors, float(rows))


@pytest.mark.parametrize(
    ("gradient", "message"),
    [
        (torch.ones(BATCH, 2, WIDTH), "head_gradients must be floats of \\(4, 1, 32\\)"),
        (torch.ones(BATCH, 1, WIDTH, dtype=torch.int64), "head_gradients must be floats"),
        (torch.full((BATCH, 1, WIDTH), float("nan")), "head_gradients that came hold NaN"),
    ],
)
def test_a_head_gradient_that_does_not_fit_what_went_down_is_refused(ushaped_half, gradient, message):
    pending, _ = ushaped_half.forward_head({"activations": torch.randn(BATCH, TOKENS, WIDTH)}, float(BATCH))
    with pytest.raises(WireError, match=message):
        ushaped_half.backward_head(pending, gradient)


def test_each_topology_refuses_the_other_topologys_messages(half, ushaped_half):
    with pytest.raises(WireError, match="is U-shaped: its FORWARD is answered by forward_head"):
        ushaped_half.forward(forward_tensors(), 0.0)
    pending, _ = ushaped_half.forward_head({"activations": torch.randn(BATCH, TOKENS, WIDTH)}, float(BATCH))
    with pytest.raises(WireError, match="is U-shaped: its backward is HEAD_BACKWARD"):
        ushaped_half.backward(pending, 1.0, 1)
    with pytest.raises(WireError, match="not U-shaped: a FORWARD must carry the labels"):
        half.forward_head({"activations": torch.randn(BATCH, TOKENS, WIDTH)}, float(BATCH))
    with pytest.raises(WireError, match="not U-shaped: its backward comes with FORWARD"):
        half.backward_head(half.forward(forward_tensors(), 0.0), torch.ones(1))


def test_what_the_server_sends_down_is_cast_to_the_wire_dtype_without_the_channel(tiny_vit, tmp_path):
    """The client applies the channel to what arrives; noise added on the server too would be added twice."""
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    split = hf_adc.split_vit(tiny_vit, 2, compression=None, channel=hf_adc.ChannelConfig(snr_db=0.0))
    half = ServerHalf(split, args)
    half.make_optimizer(10)
    pending = half.forward(forward_tensors(), 0.0)
    sent = half.backward(pending, 1.0, 1)["gradients"]
    torch.testing.assert_close(sent, pending.received.grad, atol=0, rtol=0)
