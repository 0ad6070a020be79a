"""Models by name: find the tinyllamas checkpoints and their tokenizers locally, in the Hugging Face cache or online.

A name resolves in this order: an existing path as given, the flat directory $SECTORLLM_MODELS, the Hugging Face
cache, then a download: from karpathy/tinyllamas, or for the Llama 2 tokenizer (which tinyllamas does not hold) from
llama2.c's repository at a pinned commit, kept in huggingface_hub's assets cache. huggingface_hub is imported only on
the last two steps, so a run from a local file does not pay for it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from .atomic import write_atomically
from .checkpoint import load_checkpoint
from .errors import CheckpointError, ModelNotFoundError

REPO_ID = "karpathy/tinyllamas"
MODELS_ENV = "SECTORLLM_MODELS"
DEFAULT_ENDPOINT = "https://huggingface.co"
# karpathy/tinyllamas holds no tokenizer.bin: the Llama 2 tokenizer in llama2.c's format ships with llama2.c, here at
# the commit whose run.c made the reference outputs (its sha256 below is checked after every download).
LLAMA2_C_COMMIT = "350e04fe35433e6d2941dce5a1f53308f87058eb"
LLAMA2_C_ENV = "SECTORLLM_LLAMA2_C_URL"  # a mirror of llama2.c's files at that commit, as HF_ENDPOINT is of the Hub
DEFAULT_LLAMA2_C_URL = f"https://raw.githubusercontent.com/karpathy/llama2.c/{LLAMA2_C_COMMIT}"


@dataclass(frozen=True)
class KnownFile:
    """A file sectorllm finds by name: its flat local name, its place in karpathy/tinyllamas, its content hash."""

    name: str
    repo_path: str | None  # None: karpathy/tinyllamas does not hold it; it comes from llama2.c's repository
    sha256: str | None  # None: not known; a checkpoint's header length check stands in
    checkpoint: bool
    model: str  # the model whose `sectorllm download` fetches it (the first one, for a shared tokenizer)


_KNOWN = (
    KnownFile("stories260K.bin", "stories260K/stories260K.bin",
              "b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696", True, "stories260K"),
    KnownFile("tok512.bin", "stories260K/tok512.bin",
              "037cb335abb25d1fa9e8ecae30ed2a3a8ace9302862ebcdc05d51a6bbb10c312", False, "stories260K"),
    KnownFile("stories15M.bin", "stories15M.bin", None, True, "stories15M"),
    KnownFile("stories42M.bin", "stories42M.bin", None, True, "stories42M"),
    KnownFile("stories110M.bin", "stories110M.bin", None, True, "stories110M"),
    KnownFile("tokenizer.bin", None,
              "50a52ef822ee9e83de5ce9d0be0a025a773d019437f58b5ff9dcafb063ece361", False, "stories15M"),
)
_FILES = {f.name: f for f in _KNOWN}
_TOKENIZER_OF = {"stories260K": "tok512.bin", "stories15M": "tokenizer.bin",
                 "stories42M": "tokenizer.bin", "stories110M": "tokenizer.bin"}
_TOKENIZER_FOR_VOCAB = {512: "tok512.bin", 32000: "tokenizer.bin"}
MODEL_NAMES: tuple[str, ...] = tuple(_TOKENIZER_OF)


def resolve_model(name_or_path: str, download: bool = True) -> Path:
    """The model file for a path or a name (stories260K...); download=False never touches the network."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    name = _model_name(name_or_path)
    if name is None:
        raise ModelNotFoundError(_not_a_model(name_or_path, path))
    return _find(_FILES[f"{name}.bin"], download=download)


def resolve_tokenizer(tokenizer: str | None, model: str | Path, vocab_size: int, download: bool = True) -> Path:
    """The tokenizer file: the one given, else the one the model's vocabulary (or name) calls for, found like a model.

    Without a tokenizer, the directory of the model file is searched first, then as for models; download=False
    never touches the network.
    """
    if tokenizer is not None:
        path = Path(tokenizer).expanduser()
        if path.is_file():
            return path
        if tokenizer in _TOKENIZER_FOR_VOCAB.values():
            return _find(_FILES[tokenizer], download=download)
        raise ModelNotFoundError(f"no tokenizer file at {path}: check the path, or leave it out to use the model's own")
    known = _FILES[_tokenizer_name(model, vocab_size)]
    model_path = Path(model).expanduser()
    beside = model_path.parent / known.name if model_path.is_file() else None
    return _find(known, beside=beside, download=download)


def download(name: str) -> list[Path]:
    """Make a model and its tokenizer available offline, fetching what no local copy holds: [model, tokenizer]."""
    model = _model_name(name)
    if model is None:
        raise ModelNotFoundError(_not_a_model(name, Path(name)))
    return [resolve_model(model), _find(_FILES[_TOKENIZER_OF[model]])]


def _model_name(text: str) -> str | None:
    """The known model a bare name means ("stories15M", "stories15m.bin"), or None."""
    if "/" in text or os.sep in text:
        return None
    stem = text[:-4] if text.lower().endswith(".bin") else text
    return next((name for name in MODEL_NAMES if name.lower() == stem.lower()), None)


def _not_a_model(text: str, path: Path) -> str:
    names = ", ".join(MODEL_NAMES)
    if path.is_dir():
        return f"{path} is a directory: pass the model file inside it, or a model name ({names})"
    if "/" in text or os.sep in text or text.lower().endswith(".bin"):
        return f"no model file at {path}: check the path, or pass a model name ({names})"
    return f"unknown model {text!r}: use one of {names}, or pass the path of a llama2.c .bin file"


def _tokenizer_name(model: str | Path, vocab_size: int) -> str:
    # The vocabulary comes from the checkpoint's header, so it decides when it is one we know: a file name can lie.
    if vocab_size in _TOKENIZER_FOR_VOCAB:
        return _TOKENIZER_FOR_VOCAB[vocab_size]
    name = _model_name(Path(model).name)
    if name is not None:
        return _TOKENIZER_OF[name]
    raise ModelNotFoundError(
        f"no known tokenizer for a vocabulary of {vocab_size} (sectorllm knows 512 and 32000): "
        f"pass the tokenizer the model was trained with (-z)"
    )


def _find(known: KnownFile, beside: Path | None = None, download: bool = True) -> Path:
    """Look for a known file beside the model, in $SECTORLLM_MODELS, in the Hugging Face cache, then download it."""
    models_dir = os.environ.get(MODELS_ENV)
    local = [beside] if beside is not None else []
    if models_dir:
        local.append(Path(models_dir).expanduser() / known.name)
    for path in local:
        if path.is_file():
            return path
    put = f"put {known.name} in ${MODELS_ENV} or pass a path"
    cached = _cached(known)
    if cached is not None:
        return cached
    if not download or _offline():
        why = "HF_HUB_OFFLINE is set" if download else "downloads are off"
        source = _llama2_c_url(known) if known.repo_path is None else f"{_endpoint()}/{REPO_ID}"
        raise ModelNotFoundError(
            f"{known.name} is not in ${MODELS_ENV} or the Hugging Face cache and {why}: fetch it from {source} and "
            f"{put}, or run `sectorllm download {known.model}` while online"
        )
    if known.repo_path is None:
        return _download_url(known, _llama2_c_url(known), put)
    return _download(known, known.repo_path, put)


def _offline() -> bool:
    """HF_HUB_OFFLINE as set now, or as huggingface_hub read it at import: it refuses every request from then on."""
    from huggingface_hub import constants

    now = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return now or constants.HF_HUB_OFFLINE


def _endpoint() -> str:
    # huggingface_hub.constants reads HF_ENDPOINT once, at import: pass it explicitly as the environment says now.
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def _hub_cache() -> str:
    """The Hugging Face cache directory; huggingface_hub.constants fixes it at import, so read the environment now."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _llama2_c_url(known: KnownFile) -> str:
    return f"{(os.environ.get(LLAMA2_C_ENV) or DEFAULT_LLAMA2_C_URL).rstrip('/')}/{known.name}"


def _cached(known: KnownFile) -> Path | None:
    if known.repo_path is None:
        path = _assets_folder() / known.name
        return path if path.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(REPO_ID, known.repo_path, cache_dir=_hub_cache())
    return Path(hit) if isinstance(hit, str) else None  # the other answer is a "known missing" sentinel


def _assets_folder() -> Path:
    """Where files from outside the Hub are kept: huggingface_hub's assets cache, in a folder per llama2.c commit.
    As for the hub cache, huggingface_hub fixes the location at import, so the environment is read now."""
    from huggingface_hub import cached_assets_path

    assets = os.environ.get("HF_ASSETS_CACHE") or (
        os.path.join(os.environ["HF_HOME"], "assets") if os.environ.get("HF_HOME") else None)
    return cached_assets_path("sectorllm", "llama2.c", LLAMA2_C_COMMIT,
                              assets_dir=None if assets is None else os.path.expanduser(assets))


def _download_url(known: KnownFile, url: str, put: str) -> Path:
    """Fetch a small file from a pinned URL with huggingface_hub's HTTP session; it is kept only when its sha256 is
    the one expected, and written whole or not at all."""
    from huggingface_hub import get_session
    from huggingface_hub.utils import hf_raise_for_status

    try:
        response = get_session().get(url)
        hf_raise_for_status(response)
        data = response.content
    except _download_errors() as e:
        raise ModelNotFoundError(
            f"cannot download {known.name} from {url} ({_first_line(e)}): check the network, or {put}"
        ) from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != known.sha256:
        raise ModelNotFoundError(f"the downloaded {known.name} is corrupt (sha256 {digest[:16]}... instead of "
                                 f"{known.sha256[:16]}...) and was not kept: run again, or {put}")
    path = _assets_folder() / known.name
    write_atomically(path, (data,))
    return path


def _download(known: KnownFile, repo_path: str, put: str) -> Path:
    """Download into the Hugging Face cache, then check the file and delete it if it is corrupt.

    huggingface_hub writes to a uniquely named .incomplete file beside the blob, renames it only once its length
    matches the server's, and deletes it on any failure: a partial download is never found by a later run.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    endpoint = _endpoint()
    try:
        # Unable to reach the Hub and with nothing cached, hf_hub_download retries with backoff for some 23 s; one
        # HEAD without retries first makes the common offline case fail at once.
        get_hf_file_metadata(hf_hub_url(REPO_ID, repo_path, endpoint=endpoint))
        path = Path(hf_hub_download(REPO_ID, repo_path, cache_dir=_hub_cache(), endpoint=endpoint))
    except _download_errors() as e:
        raise ModelNotFoundError(
            f"cannot download {repo_path} from {endpoint}/{REPO_ID} ({_first_line(e)}): "
            f"check the network, or {put}"
        ) from None
    problem = _corruption(path, known)
    if problem is not None:
        _evict(path)
        raise ModelNotFoundError(
            f"the downloaded {repo_path} is corrupt ({problem}) and was deleted: run again to download it anew"
        )
    return path


def _download_errors() -> tuple[type[BaseException], ...]:
    """What a failed download raises, whichever HTTP library this huggingface_hub is built on.

    huggingface_hub's own errors and requests' are OSErrors; httpx's transport errors derive only from the HTTPError
    that HfHubHTTPError extends. ValueError: a file too large for plain HTTP, or a malformed response.
    """
    from huggingface_hub.utils import EntryNotFoundError, HfHubHTTPError

    http_error = next((c for c in HfHubHTTPError.__mro__[1:] if c.__name__ == "HTTPError"), OSError)
    return (OSError, ValueError, EntryNotFoundError, http_error)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _corruption(path: Path, known: KnownFile) -> str | None:
    """Why a downloaded file cannot be the one named (wrong length for its header, wrong hash), or None."""
    if known.checkpoint:
        try:
            load_checkpoint(path)
        except CheckpointError as e:
            return str(e).replace(str(path), path.name)  # the cache path means nothing once the file is deleted
    if known.sha256 is not None:
        digest = _sha256(path)
        if digest != known.sha256:
            return f"sha256 {digest[:16]}... instead of {known.sha256[:16]}..."
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _evict(path: Path) -> None:
    """Delete a cached file: the snapshot entry and the blob it links to, so that no later lookup finds it."""
    blob = path.resolve()
    path.unlink(missing_ok=True)
    blob.unlink(missing_ok=True)
