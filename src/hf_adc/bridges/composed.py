"""Composed bridges: a reducer (ADC, token selection, Top-K) followed by an element or channel codec
(quantization, BottleNet++).

The two kinds of compression are orthogonal: a reducer sends fewer samples, tokens or values; a codec sends each
value (quantization) or each token (BottleNet++) in fewer bytes. Composed, the reducer runs first and the codec
codes what the reducer would have sent (ADC's merged tokens, Top-K's kept values); the gradient coming down goes
through the codec as in the codec's own bridge, then back through the reducer. Every byte is charged as sent:
packed codes, scales, indices, labels, and for ADC the shape of the merged tensor (three int32), which the codes
alone do not tell a receiver.

    hf_adc.ComposedConfig(hf_adc.ADCConfig(xi=0.4), hf_adc.QuantizationConfig(bits=8))   # xi ~ 0.1 in all
"""

import math
from dataclasses import dataclass

import torch

from .adc import ADCBridge
from .base import Bridge, BridgeConfig, Message
from .bottlenet import BottleNetConfig
from .registry import METHODS, method_of, methods_with_role
from .topk import TopKBridge


def _role(config: BridgeConfig) -> str | None:
    entry = method_of(config)
    return entry.role if entry is not None else None


def _classes(role: str) -> str:
    return ", ".join(METHODS[method].config.__name__ for method in methods_with_role(role))


@dataclass
class ComposedConfig(BridgeConfig):
    """A reducer config (`ADCConfig`, `TopKConfig`, `RandomTopKConfig`) followed by a codec config
    (`QuantizationConfig`, `BottleNetConfig`): the roles the methods registered with. Its `method` is
    `"<reducer>+<codec>"`, e.g. `"adc+quantize"`."""

    reducer: BridgeConfig
    codec: BridgeConfig

    def __post_init__(self):
        names = f"{type(self.reducer).__name__} then {type(self.codec).__name__}"
        reducer_role, codec_role = _role(self.reducer), _role(self.codec)
        if reducer_role == "codec" and codec_role == "reducer":
            raise ValueError(f"a codec before a reducer ({names}): put the reducer first, e.g. ADC then quantization.")
        if reducer_role != "reducer":
            raise ValueError(f"{names}: the first step must be a reducer ({_classes('reducer')}).")
        if codec_role != "codec":
            kind = "two reducers" if codec_role == "reducer" else "an unknown second step"
            raise ValueError(f"{names} is {kind}: the second step must be a codec ({_classes('codec')}).")
        reason = method_of(self.reducer).refuses.get(self.codec.method)
        if reason is not None:
            raise ValueError(f"{names}: {reason}")

    @property
    def method(self) -> str:
        return f"{self.reducer.method}+{self.codec.method}"

    def to_dict(self) -> dict:
        return {"method": self.method, "reducer": self.reducer.to_dict(), "codec": self.codec.to_dict()}


class ComposedBridge(Bridge):
    """`reducer` then `codec`; both are ordinary bridges, held as submodules (`reducer.`, `codec.`)."""

    def __init__(self, config: ComposedConfig, reducer: Bridge, codec: Bridge):
        super().__init__(config)
        self.reducer = reducer
        self.codec = codec
        self.needs_cls_attention = reducer.needs_cls_attention
        self.client_modules = tuple(f"codec.{name}" for name in codec.client_modules)
        self.server_modules = tuple(f"codec.{name}" for name in codec.server_modules)
        self.main = "values" if isinstance(reducer, TopKBridge) else "activations"

    def encode(self, hidden_states, labels, cls_attention=None) -> Message:
        message = self.reducer.encode(hidden_states, labels, cls_attention)
        message.hidden_states = self.codec.encode(message.hidden_states, None).hidden_states
        return message

    def decode(self, hidden_states):
        return self.reducer.decode(self.codec.decode(hidden_states))

    def pack(self, activations):
        wire, reducer_context = self.reducer.pack(activations)
        values = wire.pop(self.main)
        coded, codec_context = self.codec.pack(values)
        if isinstance(self.reducer, ADCBridge):
            wire["shape"] = torch.tensor(values.shape, dtype=torch.int32, device=values.device)
        return {**coded, **wire}, (reducer_context, codec_context)

    def _split(self, wire):
        codec_wire = {name: tensor for name, tensor in wire.items() if name not in ("indices", "shape")}
        return codec_wire, {name: tensor for name, tensor in wire.items() if name == "indices"}

    def receiver_context(self, wire, shape, dtype):
        """Both contexts from the wire alone: the values the reducer sent have ADC's merged shape (it travels with
        the codes; it must fit `shape`: as many clusters as soft labels, at most every token, the hidden width or
        BottleNet++'s) or Top-K's kept count (it follows from `shape`)."""
        codec_wire, rest = self._split(wire)
        if isinstance(self.reducer, ADCBridge):
            values_shape = torch.Size(wire["shape"].tolist()) if "shape" in wire else None
            width = self.codec.config.width(shape[2]) if isinstance(self.codec.config, BottleNetConfig) else shape[2]
            fits = values_shape is not None and len(values_shape) == 3 and values_shape[0] == shape[0]
            if not (fits and 1 <= values_shape[1] <= shape[1] and values_shape[2] == width):
                raise ValueError(f"the merged shape {values_shape} does not fit activations of shape {tuple(shape)}.")
        else:
            values_shape = torch.Size((shape[0], self.reducer.kept(math.prod(shape[1:]))))
        reducer_context = self.reducer.receiver_context(rest, shape, dtype)
        return reducer_context, self.codec.receiver_context(codec_wire, values_shape, dtype)

    def unpack(self, wire, context):
        reducer_context, codec_context = context
        codec_wire, rest = self._split(wire)
        return self.reducer.unpack({**rest, self.main: self.codec.unpack(codec_wire, codec_context)}, reducer_context)

    def pack_gradient(self, gradient, context):
        reducer_context, codec_context = context
        values = self.reducer.pack_gradient(gradient, reducer_context)["gradients"]
        return self.codec.pack_gradient(values, codec_context)

    def unpack_gradient(self, wire, context):
        reducer_context, codec_context = context
        values = self.codec.unpack_gradient(wire, codec_context)
        return self.reducer.unpack_gradient({"gradients": values}, reducer_context)

    def label_bytes(self, batch_size, num_labels, element_size):
        return self.reducer.label_bytes(batch_size, num_labels, element_size)

    def server_tokens(self, batch_size, num_tokens):
        return self.reducer.server_tokens(batch_size, num_tokens)

    def wire_bytes(self, batch_size, num_tokens, hidden_size, num_labels, element_size):
        shape, labels, side = self.reducer.sent_values(batch_size, num_tokens, hidden_size, num_labels, element_size)
        up, down = self.codec.coded_bytes(shape, element_size)
        shape_bytes = 4 * len(shape) if isinstance(self.reducer, ADCBridge) else 0
        return up + labels + side + shape_bytes, down
