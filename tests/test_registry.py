"""The bridge registry: a method registered once is known to everything that lists or builds methods."""

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field

import pytest

import hf_adc
from hf_adc.bridges import CONFIGS, IdentityBridge, build_bridge, config_from_dict, register_bridge
from hf_adc.bridges.registry import METHODS
from hf_adc.experiment import SplitArguments


@dataclass
class ToyConfig(hf_adc.BridgeConfig):
    method = "toy"

    bits: int = field(default=8, metadata={"help": "Bits the toy pretends to send."})


class ToyBridge(IdentityBridge):
    def __init__(self, config: ToyConfig, hidden_size: int):
        super().__init__(config)
        self.hidden_size = hidden_size


@pytest.fixture
def toy_codec():
    yield register_bridge(config=ToyConfig, bridge=ToyBridge, knobs=("bits",), role="codec", cut_sizes=("hidden_size",))
    del METHODS["toy"], CONFIGS["toy"]


def test_a_registered_bridge_is_built_loaded_composed_and_set_by_the_recipe_knobs(toy_codec):
    assert CONFIGS["toy"] is ToyConfig
    bridge = build_bridge(ToyConfig(bits=3), num_tokens=17, hidden_size=32, num_labels=5)
    assert isinstance(bridge, ToyBridge) and bridge.hidden_size == 32
    assert config_from_dict(ToyConfig(bits=3).to_dict()) == ToyConfig(bits=3)
    assert SplitArguments(compression="toy", bits=3).compression_config() == ToyConfig(bits=3)
    with pytest.raises(ValueError, match="rate do not apply to --compression toy"):
        SplitArguments(compression="toy", rate=0.1).compression_config()
    composed = SplitArguments(compression="adc+toy", xi=0.4).compression_config(seed=2)
    assert composed == hf_adc.ComposedConfig(hf_adc.ADCConfig(xi=0.4, seed=2), ToyConfig())
    with pytest.raises(ValueError, match="the first step must be a reducer"):
        hf_adc.ComposedConfig(ToyConfig(), hf_adc.QuantizationConfig(bits=8))


def test_a_method_is_registered_once_with_knobs_of_its_config(toy_codec):
    with pytest.raises(ValueError, match="'toy' is registered already"):
        register_bridge(config=ToyConfig, bridge=ToyBridge)
    del METHODS["toy"], CONFIGS["toy"]
    with pytest.raises(ValueError, match=r"knobs \['gain'\] are not fields of ToyConfig"):
        register_bridge(config=ToyConfig, bridge=ToyBridge, knobs=("gain",))
    register_bridge(config=ToyConfig, bridge=ToyBridge, knobs=("bits",), role="codec", cut_sizes=("hidden_size",))


def test_the_built_in_methods_keep_their_names_and_order():
    assert list(CONFIGS) == ["adc", "topk", "randomtopk", "bottlenet", "c3sl", "quantize"]
    assert hf_adc.bridges.LEVEL_METHODS == (
        "adc", "adc_tokens", "adc_batch", "topk", "randomtopk", "bottlenet", "c3sl", "quantize",
    )  # fmt: skip


def test_a_bridge_registered_before_the_recipes_load_gets_its_own_flag_and_ratio_rule():
    script = textwrap.dedent(
        """
        from dataclasses import dataclass, field
        import torch, hf_adc
        from hf_adc.bridges import IdentityBridge, register_bridge

        @dataclass
        class GainConfig(hf_adc.BridgeConfig):
            method = "gain"
            gain: float = field(default=1.0, metadata={"help": "Factor on the activations."})

        class GainBridge(IdentityBridge):
            def encode(self, hidden_states, labels, cls_attention=None):
                return super().encode(hidden_states * self.config.gain, labels)

        register_bridge(config=GainConfig, bridge=GainBridge, knobs=("gain",),
                        for_ratio=lambda xi, *sizes: GainConfig(gain=xi))

        from transformers import HfArgumentParser
        from hf_adc.experiment import SplitArguments
        (split_args,) = HfArgumentParser(SplitArguments).parse_args_into_dataclasses(
            ["--compression", "gain", "--gain", "2"]
        )
        print(split_args.compression_config())
        print("gain" in hf_adc.bridges.LEVEL_METHODS, hf_adc.bridges.config_for_ratio("gain", 0.5, 17, 32, 12))
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), *sys.path]))}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[:2] == ["GainConfig(gain=2.0)", "True GainConfig(gain=0.5)"]


def test_loading_a_model_imports_nothing_of_the_transport():
    script = (
        "import sys, hf_adc.experiment.models, hf_adc.experiment.arguments, hf_adc.experiment.pretrained; "
        "print([m for m in sys.modules if m.startswith('hf_adc.distributed')])"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"  # hf_adc's own modules: torch always imports torch.distributed
