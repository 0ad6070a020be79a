"""What we write: the umask's mode, never over a device, a folder or an input, one rule for missing folders, and
errors that name the user's path."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from sectorllm.atomic import check_output, write_atomically
from sectorllm.errors import OutputError

from .conftest import run_cli


def _quantize(model, tok, output, umask: int = 0o022) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sectorllm", "quantize", str(model), "-z", str(tok), "-o",
                           str(output)], capture_output=True, timeout=600, preexec_fn=lambda: os.umask(umask))


def _one_line(proc: subprocess.CompletedProcess, *words: str) -> str:
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, err
    return err


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_files_get_the_umask_mode(tmp_path, stories260k, tok512, umask, mode):
    out = tmp_path / "m.sllm"
    assert _quantize(stories260k, tok512, out, umask).returncode == 0
    assert stat.S_IMODE(out.stat().st_mode) == mode


def test_a_replaced_file_keeps_its_mode(tmp_path, stories260k, tok512):
    out = tmp_path / "m.sllm"
    out.write_bytes(b"old")
    out.chmod(0o640)
    assert _quantize(stories260k, tok512, out, 0o077).returncode == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o640 and out.read_bytes() != b"old"


def test_never_over_a_fifo_or_a_folder(tmp_path, stories260k, tok512):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    _one_line(_quantize(stories260k, tok512, fifo), "not a regular file")
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    _one_line(_quantize(stories260k, tok512, tmp_path), "a folder")
    assert list(tmp_path.iterdir()) == [fifo]  # no temporary file either


def test_never_over_an_input(tmp_path, stories260k, tok512):
    model = tmp_path / "model.bin"
    model.write_bytes(stories260k.read_bytes())
    tok = tmp_path / "tok.bin"
    tok.write_bytes(tok512.read_bytes())
    os.link(tok, tmp_path / "same_tok.bin")
    for output in (model, tok, tmp_path / "same_tok.bin", tmp_path / "." / "model.bin"):
        _one_line(_quantize(model, tok, output), "one of this command's inputs")
    assert model.read_bytes() == stories260k.read_bytes() and tok.read_bytes() == tok512.read_bytes()
    _one_line(run_cli("eval", str(model), "-z", str(tok), "--plot", str(tok)), "one of this command's inputs")


def test_a_missing_folder_is_refused_not_created(tmp_path, stories260k, tok512):
    _one_line(_quantize(stories260k, tok512, tmp_path / "no" / "such" / "m.sllm"), "does not exist")
    assert not (tmp_path / "no").exists()


def test_a_symlink_is_written_through(tmp_path, stories260k, tok512):
    real = tmp_path / "real.sllm"
    real.write_bytes(b"old")
    link = tmp_path / "link.sllm"
    link.symlink_to(real)
    assert _quantize(stories260k, tok512, link).returncode == 0
    assert link.is_symlink() and real.read_bytes().startswith(b"SLLM")


def test_errors_name_the_users_path_not_the_temporary_file(tmp_path):
    target = tmp_path / ("x" * 250)  # fits a file name, but not with the temporary file's prefix and suffix
    with pytest.raises(OSError) as info:
        write_atomically(target, [b"data"])
    assert info.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []


def test_check_output_rules(tmp_path):
    assert check_output(tmp_path / "new.bin") == tmp_path / "new.bin"
    with pytest.raises(OutputError, match="does not exist"):
        check_output(tmp_path / "missing" / "new.bin")
    with pytest.raises(OutputError, match="not a regular file"):
        check_output("/dev/null")


def test_plot_without_matplotlib_is_refused_before_the_work(tmp_path, stories260k, tok512):
    """matplotlib hidden from this one process (an import of a None module raises ImportError)."""
    code = ("import sys; sys.modules['matplotlib'] = None; from sectorllm.cli import main; "
            f"sys.exit(main(['eval', {str(stories260k)!r}, '-z', {str(tok512)!r}, '--plot', "
            f"{str(tmp_path / 'p.png')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    _one_line(proc, "matplotlib")
    assert b"eval row" not in proc.stderr  # no progress bar: no prompt was scored


@pytest.mark.slow
def test_plot_draws_every_scheme(tmp_path, stories260k, tok512):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\nLily and Tom\n")
    png = tmp_path / "eval.png"
    proc = run_cli("eval", str(stories260k), "-z", str(tok512), "--prompts", str(prompts), "--positions", "16",
                   "--scheme", "row", "--scheme", "tensor", "--plot", str(png))
    assert proc.returncode == 0, proc.stderr.decode()
    assert png.read_bytes().startswith(b"\x89PNG")


def test_image_follows_the_same_rules(tmp_path, stories260k, tok512):
    """One rule for missing folders in every command: image refuses them too, and never writes over its input."""
    _one_line(run_cli("image", str(stories260k), "-z", str(tok512), "-o", str(tmp_path / "no" / "boot.img")),
              "does not exist")
    assert not (tmp_path / "no").exists()
    model = tmp_path / "model.bin"
    model.write_bytes(stories260k.read_bytes())
    _one_line(run_cli("image", str(model), "-z", str(tok512), "-o", str(model)), "one of this command's inputs")
    assert model.read_bytes() == stories260k.read_bytes()
    _one_line(run_cli("boot", str(model), "--screenshot", str(model)), "one of this command's inputs")
