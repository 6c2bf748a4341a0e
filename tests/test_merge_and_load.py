"""The halves as ordinary checkpoints: Auto classes, trust_remote_code without hf_adc, merging back, pipeline."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import tiny_vit_config
from PIL import Image
from transformers import AutoModel, ViTForImageClassification, pipeline

import hf_adc
from hf_adc.data import image_processor_for


def test_auto_model_loads_each_half_after_import(tiny_vit, tmp_path):
    split = hf_adc.split_vit(tiny_vit, 2, compression=hf_adc.ADCConfig(xi=0.2))
    split.save_pretrained(tmp_path)
    assert isinstance(AutoModel.from_pretrained(tmp_path / "client"), hf_adc.ViTClientModel)
    assert isinstance(AutoModel.from_pretrained(tmp_path / "server"), hf_adc.ViTServerModel)


def test_halves_load_with_trust_remote_code_where_hf_adc_cannot_be_imported(tiny_vit, batch, tmp_path):
    split = hf_adc.split_vit(tiny_vit, 2).eval()
    split.save_pretrained(tmp_path)
    torch.save(batch[0], tmp_path / "pixels.pt")
    with torch.no_grad():
        expected = split(batch[0]).logits
    script = textwrap.dedent(f"""
        import sys
        sys.modules["hf_adc"] = None  # any `import hf_adc` now fails
        import torch
        from transformers import AutoModel
        try:
            import hf_adc
        except ImportError:
            pass
        else:
            raise SystemExit("hf_adc is importable")
        client = AutoModel.from_pretrained("{tmp_path / "client"}", trust_remote_code=True)
        server = AutoModel.from_pretrained("{tmp_path / "server"}", trust_remote_code=True)
        assert type(client).__module__.startswith("transformers_modules"), type(client).__module__
        with torch.no_grad():
            logits = server(client(torch.load("{tmp_path / "pixels.pt"}")).last_hidden_state).logits
        torch.save(logits, "{tmp_path / "logits.pt"}")
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""},
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected)


def test_merged_model_equals_the_split_model_and_runs_in_a_pipeline(tiny_vit, batch, tmp_path):
    split = hf_adc.split_vit(tiny_vit, 3, compression=hf_adc.ADCConfig(xi=0.25))
    split.train()
    optimizer = torch.optim.AdamW(split.parameters(), lr=1e-2)
    split(*batch).loss.backward()
    optimizer.step()
    split.eval()
    merged = hf_adc.merge_halves(split.client, split.server)
    assert type(merged) is ViTForImageClassification
    with torch.no_grad():
        torch.testing.assert_close(merged(pixel_values=batch[0]).logits, split(batch[0]).logits)

    merged.save_pretrained(tmp_path / "merged")
    image_processor_for(merged.config).save_pretrained(tmp_path / "merged")
    reloaded = ViTForImageClassification.from_pretrained(tmp_path / "merged")
    assert reloaded.config.model_type == "vit"
    classify = pipeline("image-classification", model=str(tmp_path / "merged"))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    predictions = classify(image)
    assert len(predictions) == 5 and {"label", "score"} <= set(predictions[0])


def test_merging_halves_of_different_models_or_cuts_raises(tiny_vit):
    other = ViTForImageClassification(tiny_vit_config(hidden_size=48))
    at_two, at_three = hf_adc.split_vit(tiny_vit, 2), hf_adc.split_vit(tiny_vit, 3)
    with pytest.raises(ValueError, match=r"client split_layer=2, server split_layer=3"):
        hf_adc.merge_halves(at_two.client, at_three.server)
    with pytest.raises(ValueError, match=r"client hidden_size=32, server hidden_size=48"):
        hf_adc.merge_halves(at_two.client, hf_adc.split_vit(other, 2).server)
    with pytest.raises(TypeError, match="client must be a ViTClientModel; got ViTServerModel"):
        hf_adc.merge_halves(at_two.server, at_two.client)


def test_loading_a_client_folder_as_a_server_raises(tiny_vit, tmp_path):
    hf_adc.split_vit(tiny_vit, 2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds a 'vit_adc_client' checkpoint, not a 'vit_adc_server' one"):
        hf_adc.ViTServerModel.from_pretrained(tmp_path / "client")


def test_split_inference_sends_payloads_and_charges_them_apart_from_training(tiny_vit, batch):
    pixel_values, labels = batch
    split = hf_adc.split_vit(tiny_vit, 2, compression=hf_adc.ADCConfig(xi=0.1)).train()
    split(pixel_values, labels=labels).loss.backward()
    trained = split.ledger.state_dict()
    split.eval()
    with torch.no_grad():
        expected = split(pixel_values).logits
    payload = split.client_payload(pixel_values)
    assert payload.shape == (12, 17, 32)
    torch.testing.assert_close(split.server_logits(payload), expected)
    inference = split.link.inference_ledger
    assert inference.uplink_bytes == payload.numel() * 4 == inference.uncompressed_uplink_bytes
    assert inference.downlink_bytes == 12 * 5 * 4
    assert split.ledger.state_dict() == trained

    inference.reset()
    selected = split.client_payload(pixel_values, keep_tokens=0.3)
    assert selected.shape == (12, 5, 32)
    cls_row = split.client(pixel_values, output_cls_attention=True).cls_attention
    full = split.client(pixel_values).last_hidden_state
    top = cls_row[:, 1:].topk(4, dim=1).indices.sort(dim=1).values + 1
    torch.testing.assert_close(selected[:, 1:], full.gather(1, top.unsqueeze(-1).expand(-1, -1, 32)))
    torch.testing.assert_close(selected[:, 0], full[:, 0])
    assert inference.uplink_bytes * 17 == inference.uncompressed_uplink_bytes * 5
    assert split.server_logits(selected).shape == (12, 5)
    assert split.ledger.state_dict() == trained


def test_keep_tokens_out_of_range_raises(tiny_vit, batch):
    split = hf_adc.split_vit(tiny_vit, 2).eval()
    with pytest.raises(ValueError, match=r"keep_tokens=0 is out of range: it must lie in \(0, 1\]"):
        split.client_payload(batch[0], keep_tokens=0)
