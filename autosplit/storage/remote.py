"""Cache locations: local folders, `file://` URLs, and any other fsspec URL (`memory://`, `s3://`,
`gs://`, ...) that zarr can open.

A cache at a non-local URL is written in a local staging folder ($AUTOSPLIT_HOME/staging/<hash>)
and uploaded whole once it is complete, so stage 1 keeps its resumable, kill-safe local writes and
the remote store never holds a partial cache; `--task sft:train` downloads it to the same staging
folder (skipped when the staged copy's manifest already matches) and reads it locally. The
uploaded cache is a plain Zarr v3 group: `zarr.open_group(url)` reads it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from urllib.parse import urlparse

from autosplit.errors import CacheError

log = logging.getLogger(__name__)


def is_remote(location: str | Path) -> bool:
    scheme = urlparse(str(location)).scheme
    return bool(scheme) and scheme != "file" and len(scheme) > 1  # "C:" is a Windows drive


def local_path(location: str | Path) -> Path:
    """The local folder of `location`: itself, a `file://` URL's path, or the staging folder."""
    text = str(location)
    if text.startswith("file://"):
        return Path(urlparse(text).path)
    if not is_remote(text):
        return Path(text)
    from autosplit.config import autosplit_home

    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return autosplit_home() / "staging" / digest


def _filesystem(url: str):
    try:
        import fsspec

        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise CacheError(
            f"cache URL {url}: no fsspec filesystem for it ({exc}); install the fsspec backend "
            f"for that scheme or use a local folder"
        ) from exc


def upload(local: Path, url: str) -> None:
    """Copy a complete local cache to `url` (replacing what is there)."""
    fs, path = _filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    fs.put(str(local), path, recursive=True)
    log.info("uploaded cache %s to %s", local, url)


def fetch(url: str) -> Path:
    """The local staged copy of the cache at `url`, downloaded unless it is already current."""
    local = local_path(url)
    fs, path = _filesystem(url)
    if not fs.exists(f"{path}/zarr.json"):
        raise CacheError(
            f"{url} is not an autosplit cache (no zarr.json there); run stage 1 "
            f"(--task sft:data_process) with --output_path {url}"
        )
    remote_manifest = json.loads(fs.cat_file(f"{path}/zarr.json"))
    staged = local / "zarr.json"
    if staged.is_file() and json.loads(staged.read_text()) == remote_manifest:
        return local
    shutil.rmtree(local, ignore_errors=True)
    local.parent.mkdir(parents=True, exist_ok=True)
    fs.get(path, str(local), recursive=True)
    log.info("downloaded cache %s to %s", url, local)
    return local
