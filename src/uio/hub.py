"""Find, download and cache the released Unified-IO checkpoints and the T5 vocabulary.

Files live in one cache folder (:func:`cache_dir`): ``$UIO_HOME``, else
``$XDG_CACHE_HOME/unified-io``, else ``~/.cache/unified-io``.

* :func:`checkpoint_path` returns ``{size}.safetensors`` when a converted copy is cached, else
  the released ``{size}_1000k.bin``, downloading it from ``$UIO_BASE_URL`` (default: AI2's S3
  bucket) when it is missing.
* :func:`tokenizer_path` returns the t5-base ``spiece.model``, downloaded from
  ``$HF_ENDPOINT/t5-base/resolve/main/spiece.model`` (default endpoint https://huggingface.co).
* ``UIO_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``) forbids downloads; a missing file then raises
  :class:`OfflineError`, whose message says which URL to fetch and where to put the file.

:func:`download` is a plain ``urllib`` downloader: it streams into ``dest.partial``, resumes an
interrupted transfer with an HTTP ``Range`` request (restarting when the server ignores it),
retries dropped connections a bounded number of times, and moves the file to ``dest`` with
``os.replace`` only once it is complete and has the expected size (and SHA-256, if given).
``huggingface_hub`` is deliberately not used, even for the vocabulary: its ``hf_hub_download``
needs the Hub's metadata protocol (``X-Repo-Commit``/``ETag`` headers, blob/snapshot cache
layout) and the checkpoints are not on the Hub anyway, so one small downloader serves both and
is tested end to end against a local HTTP server.

The released checkpoint sizes are exact: a ``.bin`` is ``flax.serialization.to_bytes(params)``,
whose length follows from the parameter shapes and dtypes alone (:func:`msgpack_tree_size`).
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .tree import nest_paths

__all__ = [
    "DEFAULT_BASE_URL", "DEFAULT_HF_ENDPOINT", "CHECKPOINT_BYTES", "CHECKPOINTS", "TOKENIZER",
    "RemoteFile", "DownloadError", "OfflineError",
    "msgpack_tree_size", "cache_dir", "is_offline", "checkpoint_url", "tokenizer_url",
    "download", "checkpoint_path", "tokenizer_path", "damaged_file_advice",
]

DEFAULT_BASE_URL = "https://ai2-prior-uio.s3.us-west-2.amazonaws.com/public/model-weights-bin"
DEFAULT_HF_ENDPOINT = "https://huggingface.co"
TOKENIZER_REPO = "t5-base"

# Exact byte sizes of the released {size}_1000k.bin files, computed with msgpack_tree_size from
# the paths, shapes and dtypes of every parameter (all float32); tests/test_hub.py recomputes
# them from the conformance manifests. (The README's "10.9gb" for xl is 11_700_978_421 / 2**30.)
CHECKPOINT_BYTES: dict[str, int] = {
    "small": 591_089_313,
    "base": 1_270_108_465,
    "large": 3_410_526_957,
    "xl": 11_700_978_421,
}

log = logging.getLogger(__name__)
Validator = Callable[[Path], "str | None"]  # what is wrong with a downloaded file, or None

_FLAX_MAX_CHUNK = 2 ** 30  # flax.serialization splits arrays larger than this into chunks
_CHUNK = 1 << 20
_TRUTHY = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class RemoteFile:
    """A file we know how to fetch: its name (remote and in the cache) and exact size."""

    filename: str
    size: int | None
    sha256: str | None = None


CHECKPOINTS: dict[str, RemoteFile] = {s: RemoteFile(f"{s}_1000k.bin", n) for s, n in CHECKPOINT_BYTES.items()}
# t5-base spiece.model as served by the Hub (LFS object size and sha256).
TOKENIZER = RemoteFile("spiece.model", 791_656, "d60acb128cf7b7f2536e8f38a5b18a05535c9e14c7a355904270e15b0945ea86")


class DownloadError(OSError):
    """A download failed, or produced a file of the wrong size or content."""


class OfflineError(DownloadError):
    """A needed file is not cached and cannot be downloaded (offline, or no connection)."""


# --------------------------------------------------------------------------------------------
# Size of a flax msgpack checkpoint
# --------------------------------------------------------------------------------------------

def _header_size(n: int, small_max: int | None, widths: tuple[tuple[int, int], ...]) -> int:
    """Bytes of a msgpack header for length ``n``: 1 if it fits the fix-form, else 1 + width."""
    if small_max is not None and n <= small_max:
        return 1
    for limit, width in widths:
        if n < limit:
            return 1 + width
    raise ValueError(f"msgpack cannot encode a length of {n}")


_W8, _W16, _W32 = (1 << 8, 1), (1 << 16, 2), (1 << 32, 4)


def _str_size(s: str) -> int:
    n = len(s.encode("utf-8"))
    return n + _header_size(n, 31, (_W8, _W16, _W32))


def _uint_size(v: int) -> int:
    return 1 if v < 128 else _header_size(v, None, (_W8, _W16, _W32, (1 << 64, 8)))


def _ndarray_size(shape: tuple[int, ...], dtype: Any) -> int:
    """Bytes of one leaf: ExtType(1, packb((shape, dtype_name, raw_bytes)))."""
    dt = np.dtype(dtype)
    nbytes = dt.itemsize * int(np.prod(shape, dtype=np.int64))
    if nbytes > _FLAX_MAX_CHUNK:
        raise ValueError(f"an array of {nbytes} bytes would be chunked by flax; not supported")
    inner = (1 + _header_size(len(shape), 15, (_W16, _W32)) + sum(_uint_size(int(d)) for d in shape)
             + _str_size(dt.name) + nbytes + _header_size(nbytes, None, (_W8, _W16, _W32)))
    fixext = inner in (1, 2, 4, 8, 16)
    return inner + (2 if fixext else 1 + _header_size(inner, None, (_W8, _W16, _W32)))


def _tree_size(node: Any) -> int:
    if isinstance(node, dict):
        return _header_size(len(node), 15, (_W16, _W32)) + sum(
            _str_size(k) + _tree_size(v) for k, v in node.items())
    shape, dtype = (node.shape, node.dtype) if hasattr(node, "dtype") else node
    return _ndarray_size(tuple(shape), dtype)


def msgpack_tree_size(leaves: Mapping[str, Any]) -> int:
    """Exact byte size of ``flax.serialization.to_bytes`` (and :func:`uio.checkpoint.write_bin`).

    ``leaves`` maps ``/``-joined parameter paths to arrays or to ``(shape, dtype)`` pairs, e.g.
    the output of :func:`uio.checkpoint.expected_params`; only shapes and dtypes matter.
    """
    return _tree_size(nest_paths(leaves))


# --------------------------------------------------------------------------------------------
# Environment: cache folder, URLs, offline mode
# --------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    """``$UIO_HOME``, else ``$XDG_CACHE_HOME/unified-io``, else ``~/.cache/unified-io``."""
    if os.environ.get("UIO_HOME"):
        return Path(os.environ["UIO_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "unified-io"


def is_offline() -> bool:
    """True when ``UIO_OFFLINE`` or ``HF_HUB_OFFLINE`` is set to 1/true/yes/on."""
    return any(os.environ.get(v, "").strip().lower() in _TRUTHY for v in ("UIO_OFFLINE", "HF_HUB_OFFLINE"))


def _remote_checkpoint(size: str) -> RemoteFile:
    if size not in CHECKPOINTS:
        raise ValueError(f"unknown checkpoint size {size!r}: expected one of {', '.join(CHECKPOINTS)}")
    return CHECKPOINTS[size]


def checkpoint_url(size: str) -> str:
    """Download URL of the released ``.bin`` for ``size`` (base overridable by ``$UIO_BASE_URL``)."""
    base = os.environ.get("UIO_BASE_URL") or DEFAULT_BASE_URL
    return f"{base.rstrip('/')}/{_remote_checkpoint(size).filename}"


def tokenizer_url() -> str:
    """Download URL of t5-base's ``spiece.model`` (endpoint overridable by ``$HF_ENDPOINT``)."""
    endpoint = os.environ.get("HF_ENDPOINT") or DEFAULT_HF_ENDPOINT
    return f"{endpoint.rstrip('/')}/{TOKENIZER_REPO}/resolve/main/{TOKENIZER.filename}"


# --------------------------------------------------------------------------------------------
# Downloading
# --------------------------------------------------------------------------------------------

class _Retry(Exception):
    """An attempt that got a response but did not finish; the next one resumes."""


_RETRYABLE = (_Retry, ConnectionError, TimeoutError, socket.timeout, http.client.HTTPException)
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


def _partial_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".partial")


def _open(url: str, start: int, timeout: float):
    """Send the request (``Range`` from ``start`` when > 0); HTTP errors come back as responses."""
    headers = {"User-Agent": "unified-io", "Accept-Encoding": "identity"}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        return err


def _status(response) -> int:
    """HTTP status; non-HTTP URLs (``file://``) count as 200."""
    return response.status or 200


def _resume_offset(response, start: int, partial: Path) -> int:
    """Where the body starts in the file: ``start`` for a matching 206, 0 for a full 200."""
    if _status(response) == 200:
        return 0
    match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
    if not match or int(match.group(1)) != start:
        partial.unlink(missing_ok=True)
        raise _Retry(f"server answered Range {start}- with Content-Range "
                     f"{response.headers.get('Content-Range')!r}; restarting from scratch")
    return start


def _total_size(response, offset: int) -> int | None:
    """Full file size announced by the server, if any."""
    match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
    if match and match.group(3) != "*":
        return int(match.group(3))
    length = response.headers.get("Content-Length")
    return offset + int(length) if length is not None else None


def _handle_416(response, partial: Path, url: str) -> bool:
    """Range not satisfiable: True if the partial file is already complete, else start over."""
    match = re.match(r"bytes\s+\*/(\d+)", response.headers.get("Content-Range", ""))
    if match and int(match.group(1)) == partial.stat().st_size:
        return True
    partial.unlink()
    raise _Retry(f"{url}: server rejected the resume range (416); restarting from scratch")


def _check_status(response, url: str) -> None:
    status = _status(response)
    if status in (200, 206):
        return
    if status >= 500 or status == 429:
        raise _Retry(f"{url}: HTTP {status} {response.reason}")
    raise DownloadError(f"{url}: HTTP {status} {response.reason}")


def _check_announced(total: int | None, expected: int | None, partial: Path, url: str) -> None:
    if total is not None and expected is not None and total != expected:
        partial.unlink(missing_ok=True)
        raise DownloadError(f"{url} is {total} bytes but {expected} were expected; "
                            "the server has a different (or truncated) file, nothing was saved")


def _stream(response, partial: Path, offset: int, total: int | None, progress: bool, desc: str) -> None:
    """Copy the body into ``partial`` from ``offset``; raise :class:`_Retry` if it ends early."""
    from tqdm import tqdm

    with open(partial, "r+b" if offset else "wb") as f, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
            disable=not progress, leave=False) as bar:
        f.seek(offset)
        f.truncate()
        read = getattr(response, "read1", response.read)  # read1: keep what arrived before a stall
        while chunk := read(_CHUNK):
            f.write(chunk)
            bar.update(len(chunk))
        got = f.tell()
    if total is not None and got < total:
        raise _Retry(f"connection closed after {got} of {total} bytes")


def _attempt(url: str, partial: Path, expected: int | None, timeout: float, progress: bool, desc: str) -> None:
    """One request: resume ``partial`` from its current size (or start it) up to the end."""
    start = partial.stat().st_size if partial.exists() else 0
    if expected is not None and start > expected:
        partial.unlink()
        start = 0
    if expected is not None and start == expected:
        return
    response = _open(url, start, timeout)
    with response:
        if _status(response) == 416 and start and _handle_416(response, partial, url):
            return
        _check_status(response, url)
        offset = _resume_offset(response, start, partial)
        total = _total_size(response, offset)
        _check_announced(total, expected, partial, url)
        _stream(response, partial, offset, total, progress, desc)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _finish(partial: Path, dest: Path, url: str, expected: int | None, sha256: str | None,
            validate: Validator | None) -> None:
    """Move a complete ``partial`` to ``dest``; delete it and raise if it is the wrong file."""
    size = partial.stat().st_size
    problem = None
    if expected is not None and size != expected:
        problem = f"is {size} bytes, expected {expected}"
    elif sha256 is not None and _sha256(partial) != sha256.lower():
        problem = f"does not have the expected SHA-256 {sha256}"
    elif validate is not None and (reason := validate(partial)):
        problem = f"is not a valid file ({reason})"
    if problem:
        partial.unlink()
        raise DownloadError(f"the file downloaded from {url} {problem}; it was deleted, "
                            f"nothing was saved at {dest}")
    os.replace(partial, dest)


def download(url: str, dest: str | os.PathLike, expected_size: int | None = None, progress: bool = True, *,
             sha256: str | None = None, retries: int = 5, timeout: float = 60.0,
             retry_wait: float = 1.0, validate: Validator | None = None) -> Path:
    """Download ``url`` to ``dest`` atomically and return ``dest``.

    Data goes to ``dest.partial`` (an existing one is resumed with an HTTP ``Range`` request)
    and is moved to ``dest`` only when complete and, if given, of ``expected_size`` bytes with
    digest ``sha256`` and no problem found by ``validate(path)`` (which returns what is wrong, or
    None); a wrong file is deleted and raises :class:`DownloadError`, except that a wrong file
    made by resuming an earlier ``.partial`` (which may hold anything: zeros after a crash,
    another file's bytes) is downloaded once more from the start. A connection
    that drops mid-transfer (or an HTTP 5xx) is retried up to ``retries`` times, resuming each
    time, after ``retry_wait * attempt`` seconds. ``timeout`` bounds every socket operation.

    Raises:
        OfflineError: the server cannot be reached at all (refused, DNS, timeout on connect).
        DownloadError: HTTP error, retries exhausted, or a size/digest mismatch.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial_path(dest)
    resumed = partial.exists()
    for attempt in range(retries + 1):
        try:
            _attempt(url, partial, expected_size, timeout, progress, dest.name)
            break
        except urllib.error.URLError as err:  # no response at all
            if attempt == 0:
                raise OfflineError(f"cannot reach {url}: {err.reason}") from err
            error: Exception = err
        except _RETRYABLE as err:
            error = err
        if attempt == retries:
            raise DownloadError(f"downloading {url} failed after {retries + 1} attempts: {error}; "
                                f"the partial file {partial} will be resumed next time") from error
        time.sleep(retry_wait * (attempt + 1))
    try:
        _finish(partial, dest, url, expected_size, sha256, validate)
    except DownloadError as err:
        if not resumed:
            raise
        log.warning("the resumed download %s was wrong (%s); downloading it again from the start", partial, err)
        return download(url, dest, expected_size, progress, sha256=sha256, retries=retries, timeout=timeout,
                        retry_wait=retry_wait, validate=validate)
    return dest


# --------------------------------------------------------------------------------------------
# Cached files
# --------------------------------------------------------------------------------------------

_OWN_CHECKPOINT = "--weights PATH (uio) or weights=PATH (ModelRunner.from_pretrained)"
_OWN_TOKENIZER = "--tokenizer PATH (uio) or tokenizer=PATH (ModelRunner)"


def _missing_message(what: str, url: str, dest: Path, remote: RemoteFile, reason: str, own_file: str) -> str:
    size = f" ({remote.size:,} bytes)" if remote.size else ""
    return (f"{what} is not in the cache and {reason}.\n"
            f"Download\n    {url}{size}\nand place it at\n    {dest}\n"
            f"(the cache folder is $UIO_HOME when set: the file goes to $UIO_HOME/{dest.relative_to(cache_dir())}),\n"
            f"or pass a copy you have with {own_file}.")


def _checkpoint_problem(path: Path) -> str | None:
    """What makes ``path`` unreadable as a released ``.bin`` (its msgpack structure), or None."""
    from .checkpoint import CheckpointError, read_bin

    try:
        read_bin(path)
    except CheckpointError as err:
        return str(err)
    return None


def _fetch_cached(what: str, url: str, dest: Path, remote: RemoteFile, allow_download: bool, own_file: str,
                  validate: Validator | None = None) -> Path:
    """Return ``dest``, downloading ``url`` there first if it is missing and allowed."""
    if dest.is_file():
        _check_cached_size(dest, remote)
        return dest
    reason = ("downloads are off (UIO_OFFLINE / HF_HUB_OFFLINE)" if is_offline()
              else None if allow_download else "download=False was given")
    if reason:
        raise OfflineError(_missing_message(what, url, dest, remote, reason, own_file))
    try:
        return download(url, dest, remote.size, sha256=remote.sha256, validate=validate)
    except DownloadError as err:  # keeps the class: OfflineError for no connection
        raise type(err)(_missing_message(what, url, dest, remote, f"the download failed ({err})", own_file)) from err


def _check_cached_size(path: Path, remote: RemoteFile) -> None:
    if remote.size is not None and path.stat().st_size != remote.size:
        raise DownloadError(f"{path} is {path.stat().st_size:,} bytes, expected {remote.size:,}: it is "
                            "truncated or not the released file; delete it to download it again")


def damaged_file_advice(path: Path) -> str:
    """What to do about a cached file that cannot be read: delete it (the path), then what happens."""
    if path.suffix == ".safetensors":
        return (f"the converted checkpoint {path} in the cache is damaged: delete it (uio then uses the released "
                ".bin, downloading it if needed), or convert it again with 'uio convert'")
    return f"the cached file {path} is damaged or incomplete: delete it and run again to download it again"


def checkpoint_path(size: str, download: bool = True) -> Path:
    """Path of the cached checkpoint for ``size`` (small, base, large, xl).

    Prefers a converted ``{size}.safetensors`` in the cache folder; otherwise returns the
    released ``{size}_1000k.bin``, downloading it (with progress and resume) if it is missing.

    Raises:
        ValueError: unknown size.
        OfflineError: the file is missing and downloads are off or impossible; the message
            gives the URL to fetch and the path to put the file at.
    """
    remote = _remote_checkpoint(size)
    converted = cache_dir() / f"{size}.safetensors"
    if converted.is_file():
        return converted
    return _fetch_cached(f"Unified-IO checkpoint {size!r}", checkpoint_url(size),
                         cache_dir() / remote.filename, remote, download, _OWN_CHECKPOINT, _checkpoint_problem)


def tokenizer_path(download: bool = True) -> Path:
    """Path of the cached t5-base ``spiece.model`` (``{cache}/t5-base/spiece.model``).

    Downloads it from ``tokenizer_url()`` when missing (verifying size and SHA-256).

    Raises:
        OfflineError: missing and offline (``HF_HUB_OFFLINE`` / ``UIO_OFFLINE``) or unreachable.
    """
    dest = cache_dir() / TOKENIZER_REPO / TOKENIZER.filename
    return _fetch_cached(f"The {TOKENIZER_REPO} vocabulary {TOKENIZER.filename}", tokenizer_url(), dest,
                         TOKENIZER, download, _OWN_TOKENIZER)
