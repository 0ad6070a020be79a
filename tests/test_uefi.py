"""The UEFI boot path for real: the loader (uefi.asm) in an EFI System Partition made by dosfstools and mtools,
booted by OVMF under qemu-system-x86_64 (q35) from a virtio disk and a USB stick. A stand-in engine with engine.asm's
contract (tests/uefi_stub.asm) shows what the loader set up; the real engine tells the fixed-point engine's stories,
token for token, from the same image file SeaBIOS boots. COM1 is the engine's; the firmware's console (ConOut) is
read back through the terminal OVMF keeps on COM2."""

from __future__ import annotations

import struct
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from sectorllm.boot import session, uefi
from sectorllm.boot.image import (MODEL_BASE, SECTOR, DiskLayout, RunBlock, Status, assemble, build_image,
                                  memory_layout, pack_run_block, sectors)
from sectorllm.config import ModelConfig
from sectorllm.errors import BootError
from sectorllm.generate import GenerationResult
from sectorllm.packed import PackedModel
from sectorllm.sampling import SamplerConfig

from .conftest import IN_CI, make_checkpoint, require
from .test_boot_engine import GREEDY, TOKENS, assert_same, golden
from .test_boot_infra import checksums, pattern_blob

STUB_SOURCE = Path(__file__).with_name("uefi_stub.asm")
MIB = 1 << 20


def require_uefi() -> None:
    for tool in ("nasm", uefi.QEMU64, "mcopy"):
        require(tool)
    try:
        uefi.ovmf_firmware()
        uefi.fat_tool("mkfs.fat")
    except BootError as error:
        if IN_CI:
            pytest.fail(f"{error} (.ci/run must install it)")
        pytest.skip(str(error))


def boot_ovmf(image: Path, drive: str = "virtio", memory_mib: int = 256, handshake: int | None = None,
              timeout: float = 120) -> tuple[int, bytes, bytes]:
    """QEMU's exit code, COM1 and COM2 of a boot under OVMF."""
    run = uefi.run_ovmf(image, drive=drive, memory_mib=memory_mib, handshake=handshake, timeout=timeout)
    return run.exit_code, run.serial, run.console


@pytest.fixture(scope="module")
def stub(tmp_path_factory):
    require_uefi()
    build = tmp_path_factory.mktemp("stub")
    engine = assemble(STUB_SOURCE)
    return engine, uefi.assemble_loader(engine)


def stub_disk(stub, path: Path, model: bytes, memory_end: int, *, run_block: bytes | None = None,
              with_payload: bool = True) -> Path:
    engine, loader = stub
    disk = DiskLayout(0, sectors(engine.size), 0, len(model))
    memory = replace(memory_layout(len(model), None, 0), memory_end=memory_end)
    block = run_block if run_block is not None else pack_run_block(RunBlock(), disk, memory)
    files = {uefi.LOADER_PATH: loader.code}
    if with_payload:
        files[uefi.PAYLOAD_NAME] = uefi.payload(block, engine.code, model)
    path.write_bytes(uefi.uefi_disk_image(files))
    return path


def exit_code(status: int) -> int:
    return status << 1 | 1  # isa-debug-exit


@pytest.mark.parametrize("drive, handshake, seen", [("virtio", 0x1E, "1E"), ("usb", None, "--")])
def test_loader_runs_the_engine_in_compatibility_mode(stub, tmp_path, drive, handshake, seen):
    model = pattern_blob(700 * 1024 + 3)
    memory_end = MODEL_BASE + 5 * MIB + 4096  # not a 2 MiB multiple: the loader rounds its window up
    code, com1, com2 = boot_ovmf(stub_disk(stub, tmp_path / "disk.img", model, memory_end), drive, handshake=handshake)
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
    assert code == exit_code(Status.CPU_EXCEPTION)


def test_bad_run_block_is_refused_on_com1_and_conout(stub, tmp_path):
    model = pattern_blob(4096)
    block = bytearray(pack_run_block(RunBlock(), DiskLayout(0, 1, 0, len(model)), memory_layout(len(model), None, 0)))
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
    assert uefi.loader_bytes(memory_end) == needed_kib * 1024  # what runners size OVMF's RAM by
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
    check = subprocess.run([uefi.fat_tool("fsck.fat"), "-n", str(fat)], capture_output=True,
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
    (tmp_path / "disk.img").write_bytes(disk)
    assert uefi.read_esp_file(tmp_path / "disk.img") == files[uefi.PAYLOAD_NAME]
    with pytest.raises(BootError, match="mcopy failed on an EFI System Partition: .*LOADER.EFI"):
        uefi.read_esp_file(tmp_path / "disk.img", "LOADER.EFI")
    (tmp_path / "legacy.img").write_bytes(legacy)
    with pytest.raises(BootError, match="has no EFI System Partition"):
        uefi.read_esp_file(tmp_path / "legacy.img")
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


# ----------------------------------------------------------------------------------------- the real engine


STORY_CASES = {"greedy_bos": ("", GREEDY), "topp_seed1": ("", SamplerConfig(temperature=1.0, topp=0.9, seed=1))}
STORIES15M_SHAPE = ModelConfig(288, 768, 6, 6, 6, 32000, 256)


def story_image(directory: Path, model: tuple[bytes, PackedModel], prompt: str,
                sampler: SamplerConfig) -> tuple[Path, GenerationResult]:
    """The legacy image with the ESP added (loader and payload): one file for both firmwares; and the golden run."""
    blob, packed = model
    steps = len(packed.tokenizer.encode(prompt)) - 1 + TOKENS
    legacy = directory / "legacy.img"
    info = build_image(blob, session.run_block(packed, prompt, steps, sampler), legacy)
    hybrid, _ = uefi.hybrid_image(legacy.read_bytes(), info.engine, info.disk)
    image = directory / "hybrid.img"
    image.write_bytes(hybrid)
    assert uefi.read_esp_file(image) == hybrid[info.disk.payload_lba * SECTOR:info.disk.model_lba * SECTOR + len(blob)]
    return image, golden(packed, prompt, steps, sampler)


def ovmf_generation(image: Path, drive: str = "virtio", timeout: float = 300) -> tuple[GenerationResult, bytes]:
    """Boot image under OVMF in the RAM uefi.ovmf_memory_mib gives it, asking for records: the generation, decoded
    as session.run_image decodes SeaBIOS's, and what ConOut showed (COM2)."""
    memory_mib = uefi.ovmf_memory_mib(session.read_image(image).memory.memory_end)
    run = uefi.run_ovmf(image, drive=drive, memory_mib=memory_mib, timeout=timeout)
    assert (run.exit_code, run.output.end_status) == (exit_code(Status.OK), Status.OK), run.output.log
    tokens = list(run.output.tokens)
    return session.result_of(session.read_image(image), tokens, [0.0] * len(tokens)), run.console


@pytest.fixture(scope="module", params=sorted(STORY_CASES))
def story(request, tmp_path_factory, stories260k, tok512):
    require_uefi()
    prompt, sampler = STORY_CASES[request.param]
    return story_image(tmp_path_factory.mktemp(request.param), session.packed_model(stories260k, tok512), prompt,
                        sampler)


@pytest.mark.parametrize("drive", ["virtio", "usb"])
def test_stories260k_under_ovmf_is_the_fixed_engines(story, drive):
    image, want = story
    got, screen = ovmf_generation(image, drive)
    assert_same(got, want)
    assert want.text.replace("\n", "\r\n").encode() in screen  # the story on ConOut, newlines as newlines


def test_the_same_file_boots_under_seabios(story):
    require("qemu-system-i386")
    image, want = story
    assert_same(session.run_image(image, timeout=120).result, want)


def test_stories15m_shape_under_ovmf(tmp_path, llama_tokenizer):
    require_uefi()
    checkpoint = make_checkpoint(tmp_path, STORIES15M_SHAPE, seed=5)
    image, want = story_image(tmp_path, session.packed_model(checkpoint, llama_tokenizer), "", GREEDY)
    assert_same(ovmf_generation(image, timeout=600)[0], want)


def test_uefi_only_image_tells_a_bios_so(stub, tmp_path):
    require("qemu-system-i386")
    disk = stub_disk(stub, tmp_path / "disk.img", pattern_blob(4096), MODEL_BASE + MIB)
    done = subprocess.run(["qemu-system-i386", "-display", "none", "-no-reboot", "-nic", "none", "-serial", "stdio",
                           "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                           "-drive", f"file={disk},format=raw,snapshot=on"], capture_output=True, timeout=60)
    assert done.stdout.endswith(b"sectorllm: this image boots under UEFI only\r\n")
    assert done.returncode == exit_code(8)  # uefi_mbr.asm STATUS_NEEDS_UEFI
