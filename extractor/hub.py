"""`--model org/name[@revision]`: a Hugging Face Hub checkpoint, downloaded to the local Hub cache.

Only what an expert store needs is fetched: config.json, generation_config.json, the
tokenizer files and the safetensors weights (with their index); never *.bin, *.pth, GGUF or
README/assets. huggingface_hub does the rest: a progress bar per file, files it already
has are not fetched again, an interrupted download resumes from its partial file, and
`@revision` (a branch, tag or commit) pins what is fetched. With HF_HUB_OFFLINE=1 it
resolves from the cache alone.

A `--model` value that exists on disk is always a directory, never a Hub id.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .checkpoint import COPIED_FILES, INDEX
from .errors import ExtractError

ALLOW_PATTERNS = [*COPIED_FILES, INDEX, "*.safetensors"]
_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")


def is_hub_id(model: str) -> bool:
    return not Path(model).exists() and _REPO_ID.match(model) is not None


def resolve_model(model: str | Path, quiet: bool = False) -> Path:
    """A checkpoint directory for `model`: itself, or the Hub snapshot of `org/name[@revision]`."""
    if not isinstance(model, str) or not is_hub_id(model):
        return Path(model)
    match = _REPO_ID.match(model)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    if quiet:
        disable_progress_bars()
    # read at call time, not when huggingface_hub was imported (a long-lived process may set them later)
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        path = snapshot_download(match["repo"], revision=match["revision"], allow_patterns=ALLOW_PATTERNS,
                                 cache_dir=os.environ.get("HF_HUB_CACHE") or None, local_files_only=offline)
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise ExtractError(f"{model}: not found on the Hugging Face Hub ({type(exc).__name__})") from None
    except LocalEntryNotFoundError:
        raise ExtractError(f"{model}: not in the local Hub cache and the Hub cannot be reached "
                           "(offline, or HF_HUB_OFFLINE=1)") from None
    except (HfHubHTTPError, OSError) as exc:
        raise ExtractError(f"{model}: download failed: {' '.join(str(exc).split())[:200]}") from None
    finally:
        if quiet:
            enable_progress_bars()
    return Path(path)
