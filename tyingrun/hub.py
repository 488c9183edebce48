"""Where a pretrained model named by ``train.init_from`` lies: a local folder, or ``hf:<repo id>`` fetched from the
Hugging Face hub into its cache (or read from that cache offline, with ``HF_HUB_OFFLINE=1``)."""

from __future__ import annotations

from pathlib import Path

from tyingrun.errors import BadInput

HUB_PREFIX = "hf:"
# What a causal-LM checkpoint folder needs here: its architecture, its weights and its tokenizer.
HUB_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]


def model_folder(spec: str) -> Path:
    """The local folder of ``spec``: ``hf:<repo id>`` (optionally ``hf:<repo id>@<revision>``) or a path."""
    if not spec.startswith(HUB_PREFIX):
        return Path(spec).expanduser()
    repo, _, revision = spec.removeprefix(HUB_PREFIX).partition("@")
    if not repo:
        raise BadInput(f"train.init_from={spec} names no repository; write hf:<owner>/<name>")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, revision=revision or None, allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError:
        raise BadInput(f"train.init_from={spec}: {repo} is not in the Hugging Face cache and the hub cannot be "
                       f"reached; run once with internet (or huggingface-cli download {repo}) to cache it") from None
    except (HfHubHTTPError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise BadInput(f"train.init_from={spec}: the hub could not give {repo} ({reason})") from None
