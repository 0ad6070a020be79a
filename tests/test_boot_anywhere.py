"""The boot image wherever a user puts it: QEMU's pc, q35 and isapc machines, IDE, USB (xHCI, UHCI, EHCI), virtio
and floppy drives, a 486, 2 MiB of RAM, Bochs with its own BIOS; each run's tokens are the fixed-point engine's.
Also what a user sees when it cannot run: a CPU exception, too little memory, and a plain serial terminal."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sectorllm.boot import session
from sectorllm.boot.bochs import boot_bochs
from sectorllm.boot.image import Status, build_image
from sectorllm.boot.qemu import QEMU, MachineConfig, boot
from sectorllm.config import ModelConfig
from sectorllm.engines.fixed import FixedEngine, FixedSampler, FixedSamplerConfig
from sectorllm.generate import Generation, GenerationResult
from sectorllm.packed import PackedModel
from sectorllm.sampling import SamplerConfig

from .conftest import make_checkpoint, require, run_cli

TOKENS = 64
CASES = {"greedy": SamplerConfig(temperature=0.0), "topp": SamplerConfig(temperature=1.0, topp=0.9, seed=42)}
STORIES15M_SHAPE = ModelConfig(dim=288, hidden_dim=768, n_layers=6, n_heads=6, n_kv_heads=6, vocab_size=32000,
                               seq_len=256)


def golden(packed: PackedModel, steps: int, sampler: SamplerConfig) -> GenerationResult:
    config = FixedSamplerConfig.from_sampler_config(sampler)
    return Generation(FixedEngine(packed), packed.tokenizer, "", steps, FixedSampler(config, packed)).result


@pytest.fixture(scope="module")
def stories(stories260k, tok512) -> tuple[bytes, PackedModel]:
    require("nasm")
    return session.packed_model(stories260k, tok512)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, stories, tmp_path_factory) -> tuple[dict[bool, Path], GenerationResult]:
    """A disk image (for a BIOS and UEFI: the file `sectorllm image` writes) and a floppy image of one run, and what
    the fixed-point engine generates for it."""
    blob, packed = stories
    run = session.run_block(packed, "", TOKENS + 1, CASES[request.param])
    folder = tmp_path_factory.mktemp(request.param)
    images = {floppy: build_image(blob, run, folder / f"{floppy}.img", floppy=floppy,
                                  firmware="bios" if floppy else "both").path for floppy in (False, True)}
    return images, golden(packed, TOKENS + 1, CASES[request.param])


def assert_tokens(got: GenerationResult, want: GenerationResult) -> None:
    assert got.generated_tokens == want.generated_tokens and got.text == want.text
    assert len(want.generated_tokens) >= TOKENS or want.stop_reason in ("bos", "eos")


MATRIX = {  # id: (machine, drive, cpu, memory MiB)
    "pc-ide": ("pc", "ide", None, None),
    "q35-ide": ("q35", "ide", None, None),
    "isapc-ide": ("isapc", "ide", None, None),
    "pc-usb-xhci": ("pc", "usb", None, None),
    "q35-usb-xhci": ("q35", "usb", None, None),
    "pc-usb-uhci": ("pc", "usb-uhci", None, None),
    "pc-usb-ehci": ("pc", "usb-ehci", None, None),
    "pc-virtio": ("pc", "virtio", None, None),
    "pc-floppy": ("pc", "floppy", None, None),
    "isapc-floppy": ("isapc", "floppy", None, None),
    "pc-486": ("pc", "ide", "486", None),
    "pc-2mib": ("pc", "ide", None, 2),
    "isapc-486-2mib-floppy": ("isapc", "floppy", "486", 2),
}


@pytest.mark.parametrize("cell", sorted(MATRIX))
def test_qemu_matrix(cell, case):
    require(QEMU)
    machine, drive, cpu, memory = MATRIX[cell]
    images, want = case
    config = MachineConfig(machine=machine, drive=drive, cpu=cpu, memory_mib=memory)
    run = session.run_image(images[drive == "floppy"], timeout=120, machine=config)
    assert_tokens(run.result, want)


@pytest.mark.parametrize("floppy", [False, True], ids=["ide", "floppy"])
def test_bochs(floppy, case):
    """Bochs's own BIOS and devices: COM1 in a file carries the story as plain text, as the screen shows it."""
    require("bochs")
    images, want = case
    run = boot_bochs(images[floppy], floppy=floppy, memory_mib=4, timeout=240)
    assert run.serial.count(b"\n") == run.serial.count(b"\r\n")  # lines end in CR LF
    assert run.text == want.text


@pytest.fixture(scope="module")
def stories15m_shape(tmp_path_factory, llama_tokenizer) -> tuple[bytes, PackedModel]:
    require("nasm")
    path = make_checkpoint(tmp_path_factory.mktemp("15m"), STORIES15M_SHAPE, seed=7)
    return session.packed_model(path, llama_tokenizer)


def test_stories15m_shape_in_32_mib(tmp_path, stories15m_shape):
    """A 32000-token vocabulary, 6 layers of dim 288: loaded from the disk in pieces, run in 32 MiB."""
    require(QEMU)
    blob, packed = stories15m_shape
    image = tmp_path / "15m.img"
    info = build_image(blob, session.run_block(packed, "", TOKENS + 1, CASES["greedy"]), image)
    assert 16 << 20 < info.memory.memory_end <= 30 << 20
    run = session.run_image(image, timeout=300, machine=MachineConfig(memory_mib=32))
    assert_tokens(run.result, golden(packed, TOKENS + 1, CASES["greedy"]))


def test_too_small_a_machine_says_what_it_needs(tmp_path, stories15m_shape):
    require(QEMU)
    blob, packed = stories15m_shape
    image = tmp_path / "15m.img"
    info = build_image(blob, session.run_block(packed, "", 8, CASES["greedy"]), image)
    result = boot(image, timeout=60, memory_mib=16)
    assert result.status == Status.OUT_OF_MEMORY and not result.tokens
    needs = info.memory.memory_end // 1024
    found = result.log.split("found ")[1].split(" KiB")[0]
    assert result.log == f"sectorllm: out of memory: needs {needs} KiB, found {found} KiB\r\n"
    assert 15 * 1024 < int(found) < 16 * 1024  # 16 MiB less what the BIOS keeps


def test_cpu_exception_is_reported_on_com1_and_the_screen(stories, tmp_path):
    """A test-only engine that loads a selector past the GDT: #GP (13), reported with the faulting EIP, then the
    run ends; the line is on COM1 and on the text screen."""
    require(QEMU)
    blob, packed = stories
    info = build_image(blob, session.run_block(packed, "", 8, CASES["greedy"]), tmp_path / "fault.img",
                       engine_defines={"FAULT_TEST": None})
    result = boot(info.path, timeout=60, screenshot=tmp_path / "fault.png")
    line = f"sectorllm: CPU exception 13 at 0x{info.engine.symbols['fault_test']:X}"
    assert result.status == Status.CPU_EXCEPTION and not result.tokens
    assert result.log == line + "\n"
    assert line in result.screen_text.splitlines()


def test_plain_qemu_serial_is_the_story_as_text(case, tmp_path):
    """What README's `qemu-system-i386 -drive file=boot.img,format=raw -serial stdio` prints: the story in plain
    text with CR LF line ends (no runner, so no records)."""
    require(QEMU)
    images, want = case
    done = subprocess.run([QEMU, "-drive", f"file={images[False]},format=raw,snapshot=on", "-serial", "stdio",
                           "-display", "none", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    assert done.returncode == (Status.OK << 1) | 1
    assert b"\x02" not in done.stdout
    assert done.stdout.replace(b"\r\n", b"\n").decode() == want.text


@pytest.mark.parametrize("damage", ["model byte", "prompt id", "layout", "model past the end"])
def test_boot_refuses_a_damaged_image_before_booting(damage, stories, tmp_path):
    """`sectorllm boot` checks the image first: one line, exit 2, and no QEMU started."""
    require("nasm")
    blob, packed = stories
    image = tmp_path / "boot.img"
    info = build_image(blob, session.run_block(packed, "Once", 20, CASES["greedy"]), image)
    data = bytearray(image.read_bytes())
    run_block = info.disk.payload_lba * 512
    if damage == "model byte":
        data[info.disk.model_lba * 512 + 5000] ^= 0x40
    elif damage == "prompt id":
        data[run_block + 242:run_block + 244] = (600).to_bytes(2, "little")  # the second prompt id, past 512
    elif damage == "layout":
        data[run_block + 100:run_block + 104] = (12345).to_bytes(4, "little")  # the KV cache's block bytes
    else:
        del data[(info.disk.model_lba + 10) * 512:]
    image.write_bytes(bytes(data))
    done = run_cli("boot", str(image))
    assert done.returncode == 2 and done.stdout == b""
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sectorllm: error: {image}") and "damaged" in lines[0]


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signals_end_boot_and_its_qemu(sig, code, stories, tmp_path):
    """SIGTERM or Ctrl-C to `sectorllm boot` mid-story: exit 143 or 130, no traceback, no QEMU left running."""
    require(QEMU)
    blob, packed = stories
    image = tmp_path / "long.img"
    build_image(blob, session.run_block(packed, "", 0, CASES["greedy"]), image)  # the whole context: seconds
    process = subprocess.Popen([sys.executable, "-m", "sectorllm", "boot", str(image)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    assert process.stdout.read(20), process.communicate()[1]  # the story has started: QEMU is running
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == code and b"Traceback" not in stderr
    time.sleep(0.5)
    running = [p for p in Path("/proc").glob("[0-9]*/cmdline") if str(image).encode() in _read(p)]
    assert running == []


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""  # the process ended while we looked


def test_one_image_file_boots_under_a_bios_and_under_uefi(stories260k, tok512, tmp_path):
    """`sectorllm image` writes one file for both (its default): SeaBIOS and OVMF (q35, virtio and a USB stick)
    tell the fixed engine's story from it, and `info` says what it holds."""
    require(QEMU)
    require("qemu-system-x86_64")
    image = tmp_path / "both.img"
    args = ["-z", str(tok512), "-t", "1", "-p", "0.9", "-s", "42", "-n", "65"]
    built = run_cli("image", str(stories260k), "-o", str(image), *args)
    assert built.returncode == 0 and b"for BIOS and UEFI" in built.stdout and b"UEFI loader" in built.stdout
    want = run_cli("run", str(stories260k), *args, "--engine", "fixed").stdout
    for options in ([], ["--firmware", "uefi", "--machine", "q35", "--drive", "virtio"],
                    ["--firmware", "uefi", "--machine", "q35", "--drive", "usb"]):
        booted = run_cli("boot", str(image), "--timeout", "300", *options)
        assert booted.returncode == 0, booted.stderr
        assert booted.stdout == want
    assert "EFI System Partition" in run_cli("info", str(image)).stdout.decode()


def test_firmware_and_image_must_match(stories, stories260k, tok512, tmp_path):
    require("nasm")
    blob, packed = stories
    run = session.run_block(packed, "", 8, CASES["greedy"])
    bios = build_image(blob, run, tmp_path / "bios.img").path
    done = run_cli("boot", str(bios), "--firmware", "uefi")
    assert done.returncode == 2 and b"boots under a BIOS only" in done.stderr
    done = run_cli("image", str(stories260k), "-z", str(tok512), "-o", str(tmp_path / "f.img"), "--floppy",
                   "--firmware", "uefi")
    assert done.returncode == 2 and b"a floppy image boots under a BIOS only" in done.stderr
    assert not (tmp_path / "f.img").exists()
