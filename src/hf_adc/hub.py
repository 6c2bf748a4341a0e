"""Loading from the Hub without long retries, and pushing the parts of a split ViT to it (the two halves, or a
U-shaped split's bottom, middle and head), each a normal model repo with a model card."""

import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, constants
from transformers import BaseImageProcessor

HUB_PROBE_SECONDS = 5.0

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

The **{{ role }} {{ "part" if head_layers is not none else "half" }}** of a Vision Transformer trained with split
learning by hf_adc (a Hugging Face Transformers extension): the model is cut after encoder layer {{ split_layer }}
{%- if head_layers is not none %} and again before its head (the last {{ head_layers }} layers, the final layernorm
and the classifier), which runs on the client: a U-shaped split, whose labels never leave the client
{%- endif %};
{{ role_text }}

- base model: {{ base_model or "a ViT built from a config" }}
- compression at the cut: `{{ compression }}`
{%- if communication.ratio is defined %}
- training traffic across the cut: {{ "%.1f" | format(sent_mb) }} MB sent (both ways), against
  {{ "%.1f" | format(uncompressed_mb) }} MB for the uncompressed split over the same steps: ratio
  {{ "%.4f" | format(communication.ratio) }}, {{ "%.1f" | format(saved_mb) }} MB saved
{%- endif %}
{%- if federation %}
- trained by {{ federation.num_clients }} clients on their own shards, schedule `{{ federation.schedule }}` (halves
  synchronised every {{ federation.sync_every }} steps: {{ "%.1f" | format(federation.total.sync_bytes / 1e6) }} MB
  of the {{ "%.1f" | format(federation.total.total_bytes / 1e6) }} MB sent, as the server counted it){% if
  federation.dropped %}; clients dropped: {{ federation.dropped | join(", ") }}, so the run is
  {{ federation.status or "degraded" }}{% endif %}
{%- endif %}
{%- if reported_accuracy is not none %}
- test accuracy reported by a member of the federation (not measured by the server): {{ "%.4f" |
  format(reported_accuracy) }}
{%- endif %}
{%- if accuracy is not none %}
- test accuracy (uncompressed evaluation): {{ "%.4f" | format(accuracy) }}
{%- endif %}

```python
import hf_adc  # registers the halves with the Auto classes (or pass trust_remote_code=True without it)
from transformers import AutoModel

{{ role }} = AutoModel.from_pretrained("{{ model_name }}")
```

{% if head_layers is not none -%}
Merge the parts back into a plain `ViTForImageClassification` with `hf_adc.merge_ushaped(client, server, head)`.
{%- else -%}
Merge both halves back into a plain `ViTForImageClassification` with `hf_adc.merge_halves(client, server)`.
{%- endif %}
"""

ROLE_TEXT = {
    "client": "this half holds the patch embeddings and the layers before the cut, and runs where the data is.",
    "server": "this half holds the layers after the cut, the final layernorm and the classifier.",
}
USHAPED_ROLE_TEXT = {
    "client": "this part holds the patch embeddings and the layers before the first cut, and runs where the data is "
    "(with the head, pushed to a repo of its own).",
    "server": "this part holds the middle layers and no classifier: it returns what its last layer computes to the "
    "client's head and never sees a label.",
    "head": "this part holds the last layers, the final layernorm and the classifier, and runs on the client: the "
    "labels and the loss never leave it.",
}


def model_card(half, role: str, repo_id: str, dataset: str | None = None) -> ModelCard:
    """A model card for one part (`role`: client, server, or a U-shaped split's head): base model, dataset, accuracy
    as an eval result, compression and bytes."""
    config = half.config
    head_layers = getattr(config, "head_layers", None)  # only a U-shaped split's parts have it
    communication = config.communication or {}
    accuracy = communication.get("test_accuracy")
    compression = {k: v for k, v in (config.compression or {}).items() if v is not None}
    eval_results = None
    if accuracy is not None and dataset:
        eval_results = [
            EvalResult(
                task_type="image-classification",
                dataset_type=dataset,
                dataset_name=dataset,
                metric_type="accuracy",
                metric_value=accuracy,
            )
        ]
    card_data = ModelCardData(
        base_model=config.base_model_name_or_path if config.base_model_name_or_path else None,
        datasets=[dataset] if dataset else None,
        eval_results=eval_results,
        library_name="transformers",
        pipeline_tag="image-classification" if hasattr(half, "classifier") else "image-feature-extraction",
        model_name=repo_id,
        tags=[
            "split-learning", "hf-adc", "vision-transformer", f"split-{role}", compression.get("method", "none"),
            *(["u-shaped-split"] if head_layers is not None else []),
        ],  # fmt: skip
    )
    sent = sum(communication.get(key, 0) for key in ("uplink_bytes", "downlink_bytes", "sync_bytes"))
    uncompressed = communication.get("uncompressed_bytes", 0)
    return ModelCard.from_template(
        card_data,
        template_str=CARD_TEMPLATE,
        model_name=repo_id,
        role=role,
        role_text=(USHAPED_ROLE_TEXT if head_layers is not None else ROLE_TEXT)[role],
        split_layer=config.split_layer,
        head_layers=head_layers,
        base_model=config.base_model_name_or_path,
        compression=compression,
        communication=communication,
        federation=getattr(config, "federation", None),
        accuracy=accuracy,
        reported_accuracy=(getattr(config, "client_reported", None) or {}).get("test_accuracy"),
        sent_mb=sent / 1e6,
        uncompressed_mb=uncompressed / 1e6,
        saved_mb=(uncompressed - sent) / 1e6,
    )


def push_halves(
    split,
    client_repo_id: str,
    server_repo_id: str,
    *,
    image_processor: BaseImageProcessor | None = None,
    dataset: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload split ViT half with hf_adc",
) -> dict[str, str]:
    """Pushes `split.client` (with the image processor) and `split.server` to their repos, each with a model
    card and the split's `split_config.json` (plus the bridge's weights, if it has any). Returns the URLs."""
    repos = {"client": client_repo_id, "server": server_repo_id}
    return push_parts(
        split, repos, image_processor=image_processor, dataset=dataset, private=private, token=token,
        commit_message=commit_message,
    )  # fmt: skip


def push_parts(
    split,
    repos: dict[str, str],
    *,
    image_processor: BaseImageProcessor | None = None,
    dataset: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload split ViT half with hf_adc",
) -> dict[str, str]:
    """Pushes each part of `split` (`repos` maps a folder `save_pretrained` writes, `client`, `server` or `head`, to
    its repo id) to its own repo with a model card and the split's `split_config.json` (plus the bridge's weights,
    if it has any); the image processor goes with the client. Returns the URLs by part."""
    for role, repo_id in repos.items():
        if not isinstance(repo_id, str) or not repo_id.strip():
            example = f"'me/vit-adc-{role}'"
            raise ValueError(f"push_to_hub needs {role}_repo_id (a repo id such as {example}); got {repo_id!r}.")
    if len(set(repos.values())) < len(repos):
        raise ValueError(f"Each part needs a repo of its own; the repo ids given are {repos}.")
    api = HfApi(token=token)
    urls = {}
    with tempfile.TemporaryDirectory() as staging:
        split.save_pretrained(staging)
        for role, repo_id in repos.items():
            folder = Path(staging) / role
            for shared in Path(staging).glob("*.*"):
                (folder / shared.name).write_bytes(shared.read_bytes())
            if role == "client" and image_processor is not None:
                image_processor.save_pretrained(folder)
            model_card(getattr(split, role), role, repo_id, dataset).save(folder / "README.md")
            api.create_repo(repo_id, private=private, exist_ok=True)
            commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
            urls[role] = commit.repo_url.url if hasattr(commit.repo_url, "url") else str(commit.repo_url)
    return urls


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether the Hub endpoint (`HF_ENDPOINT`) answers an HTTP request within `timeout` seconds."""
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return True  # it answered, if only with an error status
    except (OSError, ValueError):
        return False
    return True


def load_pretrained(cls, name_or_path: str, **kwargs):
    """`cls.from_pretrained(name_or_path, **kwargs)` with one clear error instead of long retries.

    A Hub id is first checked with a probe of a few seconds: when the Hub cannot be reached, the files come from
    the local cache, or the load fails at once saying so (huggingface_hub alone retries for half a minute).
    """
    if Path(name_or_path).is_dir() or constants.HF_HUB_OFFLINE or hub_reachable():
        try:
            return cls.from_pretrained(name_or_path, **kwargs)
        except OSError as error:
            raise ValueError(
                f"Could not load model '{name_or_path}' ({error}). Pass a Hub id reachable from here or a local folder "
                "written by save_pretrained."
            ) from error
    try:
        return cls.from_pretrained(name_or_path, local_files_only=True, **kwargs)
    except OSError as error:
        raise ValueError(
            f"Could not load model '{name_or_path}': the Hub at {constants.ENDPOINT} did not answer within "
            f"{HUB_PROBE_SECONDS:.0f} s and the local cache does not hold it. Pass a local folder written by "
            "save_pretrained, or load it once while online (HF_HUB_OFFLINE=1 then reads the cache)."
        ) from error
