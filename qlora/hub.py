"""push_to_hub: upload a quantized model (4-bit or 8-bit) or an export directory to the Hugging Face Hub.

    qlora.push_to_hub(model, "me/model-8bit")          # saved with save_model first
    qlora.push_to_hub("merged-nf4/", "me/model-nf4")  # a save_model / qlora export directory

Through huggingface_hub's own API (HfApi.create_repo, HfApi.upload_folder), so HF_ENDPOINT, HF_TOKEN and the
proxy settings apply as everywhere else. A directory without a README.md gets a model card that says
how the model was quantized (from config.json's quantization_config) and, for an export, which base
the adapter was merged into (its qlora_merge record). The user's directory is never modified: the
card goes into a staging copy made of hard links (no bytes copied on the same file system).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from torch import nn

from qlora.errors import NetworkError, OptionError


class HubError(NetworkError, RuntimeError):
    """The Hub refused a push or could not be reached; the message says what to do."""


__all__ = ["model_card", "push_to_hub"]
_HTTP_CLIENTS = ("httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3")


def push_to_hub(model_or_dir: nn.Module | str | os.PathLike, repo_id: str, token: Optional[str] = None,
                private: bool = False, commit_message: Optional[str] = None, revision: Optional[str] = None) -> str:
    """Create `repo_id` (if needed) and upload the model to it; returns the commit URL."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise HubError(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set, so huggingface_hub makes no network "
                           "calls; unset HF_HUB_OFFLINE (and check the network) to upload")
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise OptionError(f"repo_id must be '<user or organisation>/<name>', got {repo_id!r}")
    if isinstance(model_or_dir, nn.Module):
        from qlora.models import save_model

        with tempfile.TemporaryDirectory(prefix=".qlora-push.") as scratch:
            directory = save_model(model_or_dir, Path(scratch) / "model")
            (directory / "README.md").write_text(model_card(directory))
            return _upload(directory, repo_id, token, private, commit_message, revision)
    directory = Path(model_or_dir).expanduser()
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} has no config.json: push a qlora.save_model or `qlora export` "
                                "directory, or a loaded model")
    if (directory / "README.md").is_file():
        return _upload(directory, repo_id, token, private, commit_message, revision)
    # A sibling staging directory of hard links (same file system: no bytes copied) plus the card.
    with tempfile.TemporaryDirectory(prefix=f".{directory.name}.push.", dir=directory.parent) as scratch:
        staged = Path(scratch) / directory.name
        try:
            shutil.copytree(directory, staged, copy_function=os.link)
        except OSError:  # a file system without hard links: copy the bytes
            shutil.rmtree(staged, ignore_errors=True)
            shutil.copytree(directory, staged)
        (staged / "README.md").write_text(model_card(directory))
        return _upload(staged, repo_id, token, private, commit_message, revision)


def _upload(directory: Path, repo_id: str, token, private: bool, commit_message, revision) -> str:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)  # built per call: it reads HF_ENDPOINT (huggingface_hub.constants.ENDPOINT) now
    try:
        api.create_repo(repo_id, token=token, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(directory), token=token, revision=revision,
                             commit_message=commit_message or f"Upload {_kind(directory)} with qlora")
    except HfHubHTTPError as err:
        raise HubError(f"pushing to {repo_id} failed: {err}") from err
    except Exception as err:  # connection refused, DNS, timeouts: OSError, or the HTTP client's own errors
        if not isinstance(err, OSError) and type(err).__module__.split(".")[0] not in _HTTP_CLIENTS:
            raise
        raise HubError(f"pushing to {repo_id} failed, the Hub could not be reached ({type(err).__name__}: {err}); "
                           "check the network, HF_ENDPOINT and the proxy settings") from err
    return str(getattr(info, "commit_url", info))


def _kind(directory: Path) -> str:
    config = json.loads((directory / "config.json").read_text())
    q = config.get("quantization_config") or {}
    if q.get("load_in_8bit"):
        return "an 8-bit (LLM.int8) model"
    if q.get("load_in_4bit"):
        return f"a 4-bit ({q.get('bnb_4bit_quant_type', 'nf4')}) model"
    return "a merged model" if "qlora_merge" in config else "a model"


def model_card(directory: str | os.PathLike) -> str:
    """A README.md for a save_model / export directory: how it was quantized, which base was merged."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    q = config.get("quantization_config") or {}
    merge = config.get("qlora_merge") or {}
    base = merge.get("base_model") or config.get("_name_or_path") or config.get("name_or_path")
    tags = ["qlora"] + (["bitsandbytes", "8-bit" if q.get("load_in_8bit") else "4-bit"] if q else [])
    lines = ["---", "library_name: transformers", "tags:"] + [f"- {tag}" for tag in tags]
    if base and not os.path.isabs(str(base)):
        lines.append(f"base_model: {base}")
    lines += ["---", "", f"# {directory.name}", "", f"Uploaded with qlora: {_kind(directory)}.", ""]
    if q.get("load_in_8bit"):
        lines += ["## Quantization", "",
                  "LLM.int8 (bitsandbytes' 8-bit layout: int8 weights with one fp32 absmax per output row, "
                  f"`weight_format` 0 = row); outlier threshold {q.get('llm_int8_threshold', 6.0)}; modules kept "
                  f"dense: {q.get('llm_int8_skip_modules')}.", ""]
    elif q.get("load_in_4bit"):
        lines += ["## Quantization", "",
                  f"{q.get('bnb_4bit_quant_type', 'fp4').upper()} (bitsandbytes' 4-bit layout), double quant "
                  f"{q.get('bnb_4bit_use_double_quant')}, compute dtype {q.get('bnb_4bit_compute_dtype')}, "
                  f"storage {q.get('bnb_4bit_quant_storage')}; modules kept dense: {q.get('llm_int8_skip_modules')}.", ""]
    else:
        lines += ["## Weights", "", f"Dense {config.get('torch_dtype') or config.get('dtype') or ''} weights, "
                  "no quantization.", ""]
    if merge:
        merged_into = ("dequant(quantized W), the base weights exactly as training saw them"
                       if merge.get("base") == "dequantized" else "the original 16-bit weights")
        lines += ["## Merged adapter", "",
                  f"A LoRA adapter (`{merge.get('adapter')}`) was merged into {merged_into}, base model "
                  f"`{merge.get('base_model')}` quantized as `{merge.get('quantization', {}).get('format')}` during "
                  "training; the full record is `qlora_merge` in config.json.", ""]
        for key, value in merge.items():
            if key.endswith("_added_logit_error"):
                lines += [f"Re-quantizing the merge added a logit error of max {value['max_abs']:.4g}, mean "
                          f"{value['mean_abs']:.4g} (logit std {value['reference_logit_std']:.4g}).", ""]
    lines += ["## Use", "", "```python",
              "import qlora" if q else "from transformers import AutoModelForCausalLM",
              "model = qlora.load_model(REPO_ID)" if q else "model = AutoModelForCausalLM.from_pretrained(REPO_ID)",
              "```", ""]
    if q:
        lines += ["transformers + bitsandbytes load it too: `AutoModelForCausalLM.from_pretrained(REPO_ID)`.", ""]
    return "\n".join(lines)
