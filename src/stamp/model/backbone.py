"""Loading a backbone (checkpoint directory or hub id) of a supported family (``families``:
Qwen2-VL, Qwen2.5-VL, Qwen3-VL) through transformers' own classes."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoProcessor, PreTrainedModel
from transformers.utils import is_flash_attn_2_available
from transformers.utils import logging as hf_logging

from stamp.model import attention  # noqa: F401  (registers the sdpa_fp32 implementation)
from stamp.model.families import config_class, family_of, model_class
from stamp.model.tokens import add_stamp_tokens, resize_embeddings

log = logging.getLogger(__name__)
FLASH_IF_INSTALLED = "flash_if_installed"  # flash_attention_2 where flash-attn can run, else sdpa
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def check_source(name_or_path: str) -> None:
    """Fail early, with a clear message, on a local path that is not a checkpoint directory."""
    p = Path(name_or_path).expanduser()
    looks_local = (
        p.is_absolute() or name_or_path.startswith((".", "~")) or p.exists() or name_or_path.count("/") > 1
    )
    if not looks_local:
        return  # a hub id such as Qwen/Qwen2-VL-2B-Instruct
    if not p.exists():
        hint = " (run `stamp-make-tiny` to create the embedded tiny model)" if "tiny" in name_or_path else ""
        raise FileNotFoundError(
            f"model path {name_or_path!r} does not exist; expected a Qwen2-VL, Qwen2.5-VL or Qwen3-VL "
            f"checkpoint directory with config.json, or a hub id such as 'Qwen/Qwen2-VL-2B-Instruct'{hint}"
        )
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"model path {name_or_path!r} has no config.json; it is not a checkpoint directory"
        )


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers within ``timeout`` seconds (a TCP connection; the
    lookup runs in a thread, because a name lookup without network can hang far longer)."""
    import socket
    import threading
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    result: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def hub_kwargs(repo_id: str, key: str) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for a hub id: none when the hub answers,
    ``local_files_only`` when it does not but the model is in the local cache. Otherwise a
    one-line error at once, instead of minutes of download retries (``key``: the setting that
    names the model, for the message)."""
    from huggingface_hub import try_to_load_from_cache

    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    if not offline and hub_reachable():
        return {}
    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return {"local_files_only": True}
    why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub cannot be reached (no network)"
    raise OSError(
        f"{key}={repo_id!r} is a hub id, but {why} and the model is not in the local Hugging Face cache; "
        f"download it where there is network (`hf download {repo_id}`) and set {key}=/path/to/local/copy"
    )


def vision_attention(name: str | None) -> str | None:
    """``name``, or for ``flash_if_installed`` the implementation that runs here (logged):
    ``flash_attention_2`` when flash-attn is installed and usable, else ``sdpa``."""
    if name != FLASH_IF_INSTALLED:
        return name
    chosen = "flash_attention_2" if is_flash_attn_2_available() else "sdpa"
    why = "" if chosen == "flash_attention_2" else " (flash-attn is not installed or has no CUDA device)"
    log.info("model.vision_attn_implementation=%s: the vision encoder uses %s%s", name, chosen, why)
    return chosen


def attn_kwargs(attn_implementation: str, vision_attn_implementation: str | None) -> dict[str, Any]:
    """Attention implementations per sub-model. The language model must honour a 4-D mask."""
    vision_attn_implementation = vision_attention(vision_attn_implementation)
    if "flash" in attn_implementation:
        raise ValueError(
            f"model.attn_implementation={attn_implementation!r}: flash-attention ignores the 4-D hybrid "
            "mask that STAMP's mask block needs (it would silently train a causal block). Use 'sdpa' or "
            "'eager' (or 'sdpa_fp32') for the language model; flash-attention may be used for the vision encoder with "
            "model.vision_attn_implementation=flash_attention_2 (or flash_if_installed)."
        )
    if vision_attn_implementation in (None, attn_implementation):
        return {"attn_implementation": attn_implementation}
    return {
        "attn_implementation": {
            "text_config": attn_implementation,
            "vision_config": vision_attn_implementation,
        }
    }


RELEASED_HEAD_KEYS = re.compile(r"^classifier\.(weight|bias)$")  # loaded by stamp.model.checkpoints


def load_backbone(
    name_or_path: str,
    dtype: str | torch.dtype = "float32",
    attn_implementation: str = "sdpa",
    vision_attn_implementation: str | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    key: str = "model.backbone",
) -> tuple[PreTrainedModel, Any]:
    """Load model and processor, add ``<|seg|>``/``<|mask|>`` and grow the embeddings if needed
    (``key``: the setting that names the model, for error messages). The model class is the
    family's own (``families``); a backbone STAMP cannot run on is refused before any weight loads."""
    check_source(name_or_path)
    hub = {} if Path(name_or_path).expanduser().exists() else hub_kwargs(name_or_path, key)
    proc_kwargs = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    try:
        family = family_of(AutoConfig.from_pretrained(name_or_path, **hub), key)
        processor = AutoProcessor.from_pretrained(name_or_path, **proc_kwargs, **hub)
        with own_load_report():
            model, info = model_class(family).from_pretrained(
                name_or_path,
                dtype=parse_dtype(dtype),
                output_loading_info=True,
                **attn_kwargs(attn_implementation, vision_attn_implementation),
                **hub,
            )
    except OSError as e:
        if os.environ.get("HF_HUB_OFFLINE") or not Path(name_or_path).exists():
            raise OSError(
                f"could not load {key}={name_or_path!r}: {e}. Hub ids need network access (or a local copy "
                f"in the Hugging Face cache); set {key}=/path/to/local/copy instead."
            ) from e
        raise
    report_load(name_or_path, info)
    add_stamp_tokens(processor.tokenizer)
    resize_embeddings(model, len(processor.tokenizer))
    return model, processor


@contextmanager
def own_load_report() -> Iterator[None]:
    """Silence transformers' load report for one ``from_pretrained`` (``report_load`` replaces it)."""
    lg = hf_logging.get_logger("transformers.modeling_utils")
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(level)


def report_load(name_or_path: str, info: dict) -> None:
    """Warn about weights of the checkpoint the backbone did not use and weights it lacked.

    A released STAMP checkpoint's mask head (``classifier.weight``/``.bias``) is not the
    backbone's: stamp loads it itself, so it is left out of the report.
    """
    unexpected = sorted(k for k in info.get("unexpected_keys", ()) if not RELEASED_HEAD_KEYS.search(k))
    missing = sorted(info.get("missing_keys", ()))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
    for what, keys in (("not used (unexpected)", unexpected), ("missing (newly initialised)", missing),
                       ("of another shape", mismatched)):  # fmt: skip
        if keys:
            log.warning("%s: %d weight(s) %s: %s", name_or_path, len(keys), what, ", ".join(keys[:20]))


def build_on_meta(arch: dict[str, Any], extra_tokens: int = 2) -> PreTrainedModel:
    """Build the architecture from a config dict on the meta device (no memory, no weights).

    ``arch["model_type"]`` names the family (default ``qwen2_vl``); ``tokenizer_len``, when
    given, is the tokenizer's length before STAMP's ``extra_tokens``.
    """
    arch = dict(arch)
    tokenizer_len = arch.pop("tokenizer_len", None)
    family = family_of(arch, "model.arch")
    arch.pop("model_type", None)
    config = config_class(family)(**arch)
    with torch.device("meta"):
        model = model_class(family)(config)
    if tokenizer_len is not None:
        resize_embeddings(model, tokenizer_len + extra_tokens)
    return model
