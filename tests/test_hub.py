"""Model and tokenizer resolution, with downloads served by a real HTTP server on loopback standing in for the Hub."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sectorllm.checkpoint import random_weights, write_checkpoint
from sectorllm.config import STORIES_SHAPES
from sectorllm.errors import ModelNotFoundError
from sectorllm.hub import LLAMA2_C_COMMIT, LLAMA2_C_ENV, MODEL_NAMES, REPO_ID, download, resolve_model, resolve_tokenizer

from .conftest import run_cli


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _import_huggingface_hub_offline_of_the_real_hub() -> None:
    """Import huggingface_hub now, before any test changes the environment, under settings that keep it off the Hub.

    huggingface_hub.constants reads HF_ENDPOINT, HF_HUB_OFFLINE and HF_HUB_DISABLE_TELEMETRY once, at import.
    Imported inside a test, it would keep that test's HF_HUB_OFFLINE for the whole run; with the ambient settings, it
    would send its once-a-process telemetry request (GET {endpoint}/api/agent-harnesses) to the real Hub. (When
    another module imported it first, this does nothing and the ambient settings stand.)
    """
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_free_port()}")
        env.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        env.delenv("HF_HUB_OFFLINE", raising=False)
        import huggingface_hub.constants  # noqa: F401  (the package itself loads its modules lazily)


_import_huggingface_hub_offline_of_the_real_hub()
REPO_ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() == "true"
COMMIT = "0bd21da7698eaf29a0d7de3992de8a46ef624add"  # any 40 hex digits: huggingface_hub names the snapshot by it
REAL_FILES = ("stories260K.bin", "tok512.bin", "tokenizer.bin")
MODEL_REPO_PATH = "stories260K/stories260K.bin"
TOKENIZER_REPO_PATH = "stories260K/tok512.bin"
LLAMA2_C_PREFIX = f"/karpathy/llama2.c/{LLAMA2_C_COMMIT}"  # as on raw.githubusercontent.com


@pytest.fixture(scope="session")
def real_files() -> dict[str, bytes]:
    """The real model files, read from $SECTORLLM_MODELS (in CI, ../shared/models beside the clone by default)."""
    source = os.environ.get("SECTORLLM_MODELS") or (str(REPO_ROOT.parent / "shared" / "models") if IN_CI else None)
    if source is None:
        pytest.skip("SECTORLLM_MODELS is unset: point it at the directory holding stories260K.bin, tok512.bin "
                    "and tokenizer.bin (../shared/models) to run the hub tests")
    files = {}
    for name in REAL_FILES:
        path = Path(source) / name
        if not path.is_file():
            message = f"{path} is missing: the hub tests serve the real model files"
            if IN_CI:
                pytest.fail(message)
            pytest.skip(message)
        files[name] = path.read_bytes()
    return files


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private Hugging Face cache, no models directory, and an endpoint nobody listens on: no test reaches the Hub.

    huggingface_hub.constants reads HF_ENDPOINT, HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE once, when it is imported;
    sectorllm.hub reads them at each call and passes endpoint= and cache_dir= explicitly, so setting them here works.
    """
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    dead = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("HF_ENDPOINT", dead)
    monkeypatch.setenv(LLAMA2_C_ENV, dead + LLAMA2_C_PREFIX)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    for name in ("SECTORLLM_MODELS", "HF_HUB_OFFLINE", "HF_TOKEN", "HF_ASSETS_CACHE"):
        monkeypatch.delenv(name, raising=False)
    return cache


class FakeHub:
    """Answers huggingface_hub's HEAD and GET /{repo}/resolve/{revision}/{path} as the Hub does, and logs them."""

    def __init__(self, files: dict[str, bytes], llama2_c: dict[str, bytes]) -> None:
        self.files = dict(files)  # repo path -> the bytes served
        self.llama2_c = dict(llama2_c)  # file name -> the bytes served under LLAMA2_C_PREFIX
        self.short_bodies: set[str] = set()  # repo paths whose GET sends half the bytes HEAD announced
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:
                hub.answer(self, body=False)

            def do_GET(self) -> None:
                hub.answer(self, body=True)

            def log_message(self, *args: object) -> None:
                pass  # the request log is hub.requests

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        self.requests.append((handler.command, handler.path))
        prefix = f"/{REPO_ID}/resolve/"
        path = handler.path.split("?")[0]
        revision_and_file = path[len(prefix):].split("/", 1) if path.startswith(prefix) else []
        data = self.files.get(revision_and_file[1]) if len(revision_and_file) == 2 else None
        if path.startswith(LLAMA2_C_PREFIX + "/"):
            data = self.llama2_c.get(path.removeprefix(LLAMA2_C_PREFIX + "/"))
            revision_and_file = ["", ""]
        if data is None:
            handler.send_response(404)
            handler.send_header("X-Error-Code", "EntryNotFound")
            handler.send_header("X-Repo-Commit", COMMIT)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        sent = data[:len(data) // 2] if body and revision_and_file[1] in self.short_bodies else data
        handler.send_response(200)
        handler.send_header("X-Repo-Commit", COMMIT)
        handler.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        handler.send_header("Content-Length", str(len(sent)))
        handler.end_headers()
        if body:
            handler.wfile.write(sent)

    def file_requests(self) -> list[tuple[str, str]]:
        """The requests for files, without telemetry (see _import_huggingface_hub_offline_of_the_real_hub)."""
        return [(method, path) for method, path in self.requests if path.startswith(f"/{REPO_ID}/resolve/")]

    def downloads(self) -> list[str]:
        return [path for method, path in self.file_requests() if method == "GET"]


@pytest.fixture
def hub(real_files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        pytest.skip("HF_HUB_OFFLINE was set when huggingface_hub was imported: it refuses every download after that")
    fake = FakeHub({MODEL_REPO_PATH: real_files["stories260K.bin"], TOKENIZER_REPO_PATH: real_files["tok512.bin"]},
                   {"tokenizer.bin": real_files["tokenizer.bin"]})
    thread = threading.Thread(target=fake.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", fake.endpoint)
    monkeypatch.setenv(LLAMA2_C_ENV, fake.endpoint + LLAMA2_C_PREFIX)
    yield fake
    fake.server.shutdown()
    fake.server.server_close()
    thread.join()


def _one_line_error(call: Callable[..., object], *args: object, **kwargs: object) -> str:
    with pytest.raises(ModelNotFoundError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    error = info.value
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)  # nothing chained
    return message


def _cached_files(cache: Path) -> list[Path]:
    """Every file (or link) huggingface_hub left in the cache, bookkeeping (refs, locks, tags) aside."""
    return [p for p in cache.rglob("*")
            if (p.is_file() or p.is_symlink()) and p.parent.name != "refs" and ".locks" not in p.parts
            and p.name != "CACHEDIR.TAG"]


def test_download_by_name_is_byte_identical(hub: FakeHub, real_files: dict[str, bytes], isolated: Path) -> None:
    path = resolve_model("stories260K")
    assert path.is_relative_to(isolated)
    assert path.read_bytes() == real_files["stories260K.bin"]
    assert hub.downloads() == [f"/{REPO_ID}/resolve/main/{MODEL_REPO_PATH}"]


def test_second_resolve_uses_the_cache_without_a_request(hub: FakeHub) -> None:
    first = resolve_model("stories260K")
    requests = len(hub.file_requests())
    assert resolve_model("stories260K") == first
    assert resolve_model("stories260K.bin", download=False) == first
    assert len(hub.file_requests()) == requests


def test_download_fetches_model_and_tokenizer(hub: FakeHub, real_files: dict[str, bytes]) -> None:
    model, tokenizer = download("stories260K")
    assert model.read_bytes() == real_files["stories260K.bin"]
    assert tokenizer.read_bytes() == real_files["tok512.bin"]
    assert tokenizer.name == "tok512.bin"
    assert resolve_tokenizer(None, model, 512) == tokenizer  # beside the model, in the same snapshot


def test_truncated_model_is_corrupt_and_deleted(hub: FakeHub, real_files: dict[str, bytes], isolated: Path) -> None:
    good = real_files["stories260K.bin"]
    hub.files[MODEL_REPO_PATH] = good[:-4096]  # served consistently: only the header's length check can tell
    message = _one_line_error(resolve_model, "stories260K")
    assert "corrupt" in message and "deleted" in message and "truncated" in message
    assert _cached_files(isolated) == []
    hub.files[MODEL_REPO_PATH] = good  # nothing left over stops the next run from downloading it whole
    assert resolve_model("stories260K").read_bytes() == good


@pytest.mark.parametrize("name, repo_path", [("stories260K.bin", MODEL_REPO_PATH),
                                             ("tok512.bin", TOKENIZER_REPO_PATH)])
def test_wrong_bytes_fail_the_sha256(hub: FakeHub, real_files: dict[str, bytes], isolated: Path,
                                     name: str, repo_path: str) -> None:
    damaged = bytearray(real_files[name])
    damaged[-1] ^= 0x40  # same length, so the checkpoint header still fits
    hub.files[repo_path] = bytes(damaged)
    if name == "tok512.bin":
        message = _one_line_error(resolve_tokenizer, None, "stories260K", 512)
    else:
        message = _one_line_error(resolve_model, "stories260K")
    assert "corrupt" in message and "sha256" in message
    assert _cached_files(isolated) == []


def test_short_download_leaves_no_partial_file(hub: FakeHub, isolated: Path) -> None:
    hub.short_bodies.add(MODEL_REPO_PATH)  # GET sends half of what HEAD announced
    message = _one_line_error(resolve_model, "stories260K")
    assert "cannot download" in message and "SECTORLLM_MODELS" in message
    assert hub.downloads()  # the body did arrive, and huggingface_hub threw it away
    assert _cached_files(isolated) == []  # no blob, no snapshot link, no *.incomplete


def test_hub_unreachable_fails_fast_with_one_line() -> None:
    start = time.monotonic()
    message = _one_line_error(resolve_model, "stories15M")
    assert time.monotonic() - start < 10  # huggingface_hub alone backs off for ~23 s before it gives up
    assert "cannot download stories15M.bin" in message
    assert "put stories15M.bin in $SECTORLLM_MODELS or pass a path" in message


def test_file_missing_on_the_hub(hub: FakeHub) -> None:
    message = _one_line_error(resolve_model, "stories15M")  # the fake hub serves only stories260K/
    assert "cannot download stories15M.bin" in message and "404" in message
    assert hub.downloads() == []


def test_offline_uses_the_cache_and_never_the_network(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = _one_line_error(resolve_model, "stories260K")
    assert "HF_HUB_OFFLINE" in message
    assert "put stories260K.bin in $SECTORLLM_MODELS or pass a path" in message
    assert "sectorllm download stories260K" in message
    assert hub.requests == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    cached = resolve_model("stories260K")
    requests = len(hub.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("stories260K") == cached
    assert len(hub.requests) == requests


def test_download_false_never_touches_the_network(hub: FakeHub) -> None:
    message = _one_line_error(resolve_model, "stories42M", download=False)
    assert "downloads are off" in message and "sectorllm download stories42M" in message
    assert hub.requests == []


def test_download_false_holds_for_the_tokenizer_too(hub: FakeHub, tmp_path: Path,
                                                    real_files: dict[str, bytes]) -> None:
    model = tmp_path / "stories260K.bin"  # a model file with no tokenizer beside it or in the models folder
    model.write_bytes(real_files["stories260K.bin"])
    message = _one_line_error(resolve_tokenizer, None, model, 512, download=False)
    assert "downloads are off" in message
    assert hub.requests == []


def test_unknown_names_and_missing_paths(tmp_path: Path) -> None:
    message = _one_line_error(resolve_model, "stories1B")
    assert all(name in message for name in MODEL_NAMES)
    assert "no model file at" in _one_line_error(resolve_model, str(tmp_path / "missing.bin"))
    assert "is a directory" in _one_line_error(resolve_model, str(tmp_path))
    assert "stories1B" in _one_line_error(download, "stories1B")


def test_explicit_path_beats_models_dir_beats_cache(hub: FakeHub, real_files: dict[str, bytes], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch, isolated: Path) -> None:
    cached = resolve_model("stories260K")
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    (models_dir / "stories260K.bin").write_bytes(real_files["stories260K.bin"])
    explicit = tmp_path / "elsewhere" / "my.bin"
    explicit.parent.mkdir()
    explicit.write_bytes(real_files["stories260K.bin"])
    monkeypatch.setenv("SECTORLLM_MODELS", str(models_dir))
    requests = len(hub.file_requests())

    assert resolve_model(str(explicit)) == explicit
    assert resolve_model("stories260K") == models_dir / "stories260K.bin"
    monkeypatch.delenv("SECTORLLM_MODELS")
    assert resolve_model("stories260K") == cached and cached.is_relative_to(isolated)
    assert len(hub.file_requests()) == requests


def test_tokenizer_beside_the_model_then_models_dir(real_files: dict[str, bytes], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    (models_dir / "tok512.bin").write_bytes(real_files["tok512.bin"])
    (models_dir / "tokenizer.bin").write_bytes(real_files["tokenizer.bin"])
    own = tmp_path / "own"
    own.mkdir()
    (own / "custom.bin").write_bytes(real_files["stories260K.bin"])
    monkeypatch.setenv("SECTORLLM_MODELS", str(models_dir))

    assert resolve_tokenizer(None, own / "custom.bin", 512) == models_dir / "tok512.bin"
    (own / "tok512.bin").write_bytes(real_files["tok512.bin"])
    assert resolve_tokenizer(None, own / "custom.bin", 512) == own / "tok512.bin"
    assert resolve_tokenizer(None, "stories15M", 32000) == models_dir / "tokenizer.bin"
    assert resolve_tokenizer(None, "stories110M", 0) == models_dir / "tokenizer.bin"  # by name: vocab unknown
    assert resolve_tokenizer("tok512.bin", "anything", 512) == models_dir / "tok512.bin"
    assert resolve_tokenizer(str(own / "tok512.bin"), "stories15M", 32000) == own / "tok512.bin"


def test_llama2_tokenizer_comes_from_llama2_c_checked_and_cached(hub: FakeHub, real_files: dict[str, bytes],
                                                                 isolated: Path) -> None:
    path = resolve_tokenizer(None, "stories15M", 32000)
    assert path.read_bytes() == real_files["tokenizer.bin"]
    assert path.is_relative_to(isolated.parent)  # huggingface_hub's assets cache under HF_HOME
    assert hub.requests == [("GET", f"{LLAMA2_C_PREFIX}/tokenizer.bin")]
    assert resolve_tokenizer(None, "stories110M", 32000, download=False) == path
    assert len(hub.requests) == 1


def test_llama2_tokenizer_with_wrong_bytes_is_not_kept(hub: FakeHub, real_files: dict[str, bytes],
                                                       tmp_path: Path) -> None:
    hub.llama2_c["tokenizer.bin"] = real_files["tokenizer.bin"][:-1] + b"\0"
    message = _one_line_error(resolve_tokenizer, None, "stories15M", 32000)
    assert "corrupt" in message and "sha256" in message
    assert not any(p.name.endswith("tokenizer.bin") for p in tmp_path.rglob("*"))


def test_llama2_tokenizer_offline_says_what_to_fetch(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = _one_line_error(resolve_tokenizer, None, "stories15M", 32000)
    assert f"{LLAMA2_C_PREFIX}/tokenizer.bin" in message and "sectorllm download stories15M" in message
    assert "put tokenizer.bin in $SECTORLLM_MODELS or pass a path" in message
    assert hub.requests == []


def test_tokenizer_errors(tmp_path: Path) -> None:
    message = _one_line_error(resolve_tokenizer, None, "stories15M", 32000)  # nobody listens at the endpoints
    assert "cannot download tokenizer.bin" in message
    assert "put tokenizer.bin in $SECTORLLM_MODELS or pass a path" in message
    assert "4096" in _one_line_error(resolve_tokenizer, None, tmp_path / "custom.bin", 4096)
    assert "no tokenizer file" in _one_line_error(resolve_tokenizer, str(tmp_path / "tok.bin"), "stories15M", 32000)


@pytest.fixture
def hub15m(hub: FakeHub) -> FakeHub:
    """The hub serving a stories15M.bin: random weights in the published shape (the real one is not offline here)."""
    config = STORIES_SHAPES["stories15M"]
    path = Path(os.environ["HF_HOME"]).parent / "stories15M.bin"
    write_checkpoint(path, config, random_weights(config, seed=4), version=0)
    hub.files["stories15M.bin"] = path.read_bytes()
    path.unlink()
    return hub


def _cli_env() -> dict[str, str]:
    """The child sees the test's environment: huggingface_hub reads HF_ENDPOINT, HF_HOME... when it starts."""
    return {name: os.environ[name] for name in ("HF_HOME", "HF_HUB_CACHE", "HF_ENDPOINT", LLAMA2_C_ENV)}


def test_download_and_run_stories15m_end_to_end(hub15m: FakeHub, real_files: dict[str, bytes]) -> None:
    proc = run_cli("download", "stories15M", env=_cli_env())
    assert proc.returncode == 0, proc.stderr.decode()
    model, tokenizer = (Path(line) for line in proc.stdout.decode().splitlines())
    assert model.read_bytes() == hub15m.files["stories15M.bin"] and tokenizer.read_bytes() == real_files["tokenizer.bin"]
    proc = run_cli("run", "stories15M", "-t", "0", "-n", "8", "-i", "Once upon a time", env=_cli_env())
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.startswith(b"Once upon a time")
    assert len([r for r in hub15m.requests if r[0] == "GET"]) == 2  # the run found both in the caches


def test_run_stories15m_fetches_what_is_missing(hub15m: FakeHub) -> None:
    proc = run_cli("run", "stories15M", "-t", "0", "-n", "4", env=_cli_env())
    assert proc.returncode == 0, proc.stderr.decode()
    assert {path for method, path in hub15m.requests if method == "GET"} == {
        f"/{REPO_ID}/resolve/main/stories15M.bin", f"{LLAMA2_C_PREFIX}/tokenizer.bin"}


def test_run_stories15m_offline_is_one_line(hub: FakeHub) -> None:
    proc = run_cli("run", "stories15M", env={**_cli_env(), "HF_HUB_OFFLINE": "1"})
    err = proc.stderr.decode()
    assert proc.returncode == 2 and len(err.strip().splitlines()) == 1, err
    assert "stories15M.bin" in err and "sectorllm download stories15M" in err
    assert hub.requests == []
