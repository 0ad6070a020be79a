"""The UEFI boot path for real: the loader (uefi.asm) in an EFI System Partition made by dosfstools and mtools,
booted by OVMF under qemu-system-x86_64 (q35) from a virtio disk and a USB stick, running a stand-in engine with
engine.asm's contract (tests/uefi_stub.asm) in compatibility mode. COM1 is the engine's; the firmware's console
(ConOut) is read back through the terminal OVMF keeps on COM2."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from sectorllm.boot import uefi
from sectorllm.boot.image import (MODEL_BASE, DiskLayout, MemoryLayout, RunBlock, Status, assemble, pack_run_block,
                                  sectors)
from sectorllm.errors import BootError

from .conftest import IN_CI, require
from .test_boot_infra import checksums, pattern_blob

STUB_SOURCE = Path(__file__).with_name("uefi_stub.asm")
QEMU64 = "qemu-system-x86_64"
MIB = 1 << 20


def require_uefi() -> None:
    for tool in ("nasm", QEMU64, "mcopy"):
        require(tool)
    try:
        uefi.ovmf_firmware()
        uefi._tool("mkfs.fat", uefi.FAT_TOOLS_INSTALL)
    except BootError as error:
        if IN_CI:
            pytest.fail(f"{error} (.ci/run must install it)")
        pytest.skip(str(error))


def boot_ovmf(image: Path, drive: str = "virtio", memory_mib: int = 256, answer: bytes = b"",
              timeout: float = 120) -> tuple[int, bytes, bytes]:
    """Boot image under OVMF until the guest leaves through isa-debug-exit, sending answer to COM1 once the loader's
    cue arrives: QEMU's exit code, COM1, COM2."""
    with tempfile.TemporaryDirectory(prefix="sectorllm-ovmf-") as scratch:
        com2 = Path(scratch) / "com2.txt"
        command = [QEMU64, "-machine", "q35", *uefi.ovmf_qemu_args(uefi.copy_ovmf_vars(Path(scratch))),
                   "-m", str(memory_mib),
                   "-display", "none", "-no-reboot", "-nic", "none", "-serial", "stdio", "-serial", f"file:{com2}",
                   "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", *uefi.drive_args(image, drive)]
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        watchdog = threading.Timer(timeout, process.kill)
        watchdog.start()
        com1 = bytearray()
        try:
            while chunk := os.read(process.stdout.fileno(), 1 << 16):
                com1 += chunk
                if answer and uefi.HANDSHAKE_CUE in com1:
                    process.stdin.write(answer)
                    process.stdin.flush()
                    answer = b""
            code = process.wait()
        finally:
            watchdog.cancel()
            process.kill()
            process.wait()
            process.stdin.close()
            process.stdout.close()
        assert code != -signal.SIGKILL, f"QEMU killed after {timeout} s: {bytes(com1[-300:])!r}"
        return code, bytes(com1), com2.read_bytes()


@pytest.fixture(scope="module")
def stub(tmp_path_factory):
    require_uefi()
    engine = assemble(STUB_SOURCE)
    return engine, uefi.assemble_loader(engine)


def stub_run_block(engine_sectors: int, model_bytes: int, memory_end: int) -> bytes:
    """A run block for the stub engine: its size, the model's, and the memory the loader must map."""
    memory = MemoryLayout((0,) * 9, 0, 0, 0, 0, 0, 0, 1, memory_end)
    return pack_run_block(RunBlock(), DiskLayout(0, engine_sectors, 0, model_bytes), memory)


def stub_disk(stub, path: Path, model: bytes, memory_end: int, *, run_block: bytes | None = None,
              with_payload: bool = True) -> Path:
    engine, loader = stub
    block = run_block if run_block is not None else stub_run_block(sectors(engine.size), len(model), memory_end)
    files = {uefi.LOADER_PATH: loader.code}
    if with_payload:
        files[uefi.PAYLOAD_NAME] = uefi.payload(block, engine.code, model)
    path.write_bytes(uefi.uefi_disk_image(files))
    return path


def exit_code(status: int) -> int:
    return status << 1 | 1  # isa-debug-exit


@pytest.mark.parametrize("drive, answer, seen", [("virtio", b"\x1e", "1E"), ("usb", b"", "--")])
def test_loader_runs_the_engine_in_compatibility_mode(stub, tmp_path, drive, answer, seen):
    model = pattern_blob(700 * 1024 + 3)
    memory_end = MODEL_BASE + 5 * MIB + 4096  # not a 2 MiB multiple: the loader rounds its window up
    code, com1, com2 = boot_ovmf(stub_disk(stub, tmp_path / "disk.img", model, memory_end), drive, answer=answer)
    total, weighted = checksums(model)
    assert com1.index(uefi.HANDSHAKE_CUE) < com1.index(b"stub ")
    assert f"stub handshake={seen} sum={total:08X} weighted={weighted:08X} top=5EC7011A\n".encode() in com1
    assert b"sectorllm stub on ConOut\r\n" in com2  # every byte through screen_hook, registers kept
    assert code == exit_code(Status.OK)


def test_cpu_exception_in_the_engine_is_reported(tmp_path):
    require_uefi()
    engine = assemble(STUB_SOURCE, {"FAULT": None})
    loader = uefi.assemble_loader(engine)
    disk = stub_disk((engine, loader), tmp_path / "disk.img", pattern_blob(4096), MODEL_BASE + MIB)
    code, com1, com2 = boot_ovmf(disk)
    line = f"sectorllm: CPU exception 6 at 0x{engine.symbols['fault']:X}\r\n".encode()
    assert com1.endswith(line)
    assert b"sectorllm stub on ConOut\r\n" + line in com2
    assert code == exit_code(6)  # engine.asm STATUS_CPU_EXCEPTION


def test_bad_run_block_is_refused_on_com1_and_conout(stub, tmp_path):
    model = pattern_blob(4096)
    block = bytearray(stub_run_block(1, len(model), MODEL_BASE + MIB))
    block[:4] = b"XXXX"
    code, com1, com2 = boot_ovmf(stub_disk(stub, tmp_path / "disk.img", model, 0, run_block=bytes(block)))
    assert com1.endswith(b"sectorllm: bad image\r\n")
    assert b"sectorllm: bad image\r\n" in com2
    assert code == exit_code(Status.BAD_RUN_BLOCK)


def test_missing_payload_is_a_disk_error(stub, tmp_path):
    code, com1, _ = boot_ovmf(stub_disk(stub, tmp_path / "disk.img", b"", 0, with_payload=False))
    assert com1.endswith(b"sectorllm: disk error\r\n")
    assert code == exit_code(Status.DISK_ERROR)


def test_out_of_memory_names_what_the_run_needs(stub, tmp_path):
    memory_end = 1 << 30  # more than the 256 MiB machine has
    code, com1, _ = boot_ovmf(stub_disk(stub, tmp_path / "disk.img", pattern_blob(4096), memory_end))
    needed_kib = (memory_end + 2 * MIB + 7 * 4096) // 1024  # the window, 2 MiB alignment, page tables and resident
    assert com1.endswith(f"sectorllm: out of memory: the run needs {needed_kib} KiB of RAM below 4 GiB\r\n".encode())
    assert code == exit_code(Status.OUT_OF_MEMORY)


def test_esp_is_a_valid_fat_holding_the_files(tmp_path):
    require_uefi()
    files = {uefi.LOADER_PATH: b"MZ" + bytes(1000), uefi.PAYLOAD_NAME: pattern_blob(3 * MIB + 7)}
    esp = uefi.build_esp(files, 2048)
    assert len(esp) % MIB == 0 and len(esp) >= uefi.ESP_MIN_BYTES
    assert esp[54:62] == b"FAT16   "  # the boot sector's file system type
    assert int.from_bytes(esp[28:32], "little") == 2048  # hidden sectors: where the partition starts
    fat = tmp_path / "esp.img"
    fat.write_bytes(esp)
    check = subprocess.run([uefi._tool("fsck.fat", uefi.FAT_TOOLS_INSTALL), "-n", str(fat)], capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    for name, content in files.items():
        out = tmp_path / Path(name).name
        subprocess.run(["mcopy", "-i", str(fat), f"::/{name}", str(out)], check=True)
        assert out.read_bytes() == content


def test_esp_joins_a_partitioned_disk_in_the_second_entry(tmp_path):
    require_uefi()
    legacy_entry = bytes.fromhex("80 01 01 00 da 0f 3f 00 3f 000000 b1030000".replace(" ", ""))
    legacy = bytes(446) + legacy_entry + bytes(48) + b"\x55\xaa" + pattern_blob(1007 * 512)
    files = {uefi.PAYLOAD_NAME: pattern_blob(5000)}
    disk = uefi.add_esp(legacy, files)
    assert disk[:446 + 16] == legacy[:446 + 16] and disk[512:len(legacy)] == legacy[512:]
    kind, start, size = disk[462 + 4], *struct.unpack_from("<II", disk, 462 + 8)
    assert (kind, start) == (0xEF, 2048)  # the first MiB boundary past the 1008 legacy sectors
    time.sleep(1.1)  # a later second: the partition's bytes do not depend on the clock
    assert disk[start * 512:(start + size) * 512] == uefi.build_esp(files, start)
    assert len(disk) % (1008 * 512) == 0 and len(disk) >= (start + size) * 512
    with pytest.raises(BootError, match="entry 2 is taken"):
        uefi.add_esp(disk, files)
    with pytest.raises(BootError, match="no MBR"):
        uefi.add_esp(bytes(1024), files)


def test_loader_needs_the_engines_uefi_entry(tmp_path):
    require("nasm")
    source = tmp_path / "old.asm"
    source.write_text("bits 32\norg 0x8000\nstart: hlt\n")
    with pytest.raises(BootError, match="main32 or screen_hook"):
        uefi.assemble_loader(assemble(source))
