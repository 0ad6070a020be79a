"""The UEFI boot path: the loader (uefi.asm) assembled for an engine, the EFI System Partition that holds it and
the payload (FAT made by dosfstools, filled by mtools), and the QEMU arguments that boot it under OVMF.

The ESP holds two files: \\EFI\\BOOT\\BOOTX64.EFI, the loader, which the firmware's boot manager runs from any
removable or fixed disk without a boot entry, and \\SECTORLLM.BIN, the payload: the run block sector, the engine and
the model, laid out as in the legacy image from LBA 1 on (image.py). The loader reads the payload with the firmware's
file system driver and runs the engine in a compatibility-mode code segment (uefi.asm says how and why).
"""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import BootError
from .image import (SECTOR, SERIAL_GO, SERIAL_RECORDS, SOURCE_DIR, AssembledCode, DiskLayout, End, EngineOutput,
                    SerialDecoder, Token, assemble, whole_sectors)
from .qemu import QEMU_INSTALL, drive_arguments, send_serial

LOADER_SOURCE = SOURCE_DIR / "uefi.asm"
MBR_SOURCE = SOURCE_DIR / "uefi_mbr.asm"
LOADER_PATH = "EFI/BOOT/BOOTX64.EFI"  # the removable-media boot path for x86-64 (UEFI spec 3.5.1)
PAYLOAD_NAME = "SECTORLLM.BIN"
ENGINE_SYMBOLS = ("main32", "screen_hook")  # the engine's UEFI entry point and its screen routine's pointer
# The loader's line on COM1 once the firmware has let go of the port; a runner sends its handshake byte when it
# sees it (the loader waits a second for it), not before the boot: the firmware's serial driver resets the UART.
HANDSHAKE_CUE = b"sectorllm: UEFI loader\r\n"

MBR_TABLE = 446  # the partition table's offset in the MBR
ESP_ENTRY = 1  # the ESP's entry in it: the legacy image's payload partition has the first
ESP_TYPE = 0xEF  # MBR partition type of an EFI System Partition
ESP_ALIGN = 1 << 20  # partitions start on MiB boundaries, as partitioning tools place them
CYLINDER_SECTORS = 16 * 63  # the legacy image's disk geometry (heads x sectors per track)
ESP_MIN_BYTES = 4 << 20  # FAT16 needs 4085 clusters at least: 4 MiB holds 8,000 of 512 bytes
FAT16_MAX_CLUSTERS = 65524
FAT_LABEL = "SECTORLLM"
FAT_SERIAL = "534C4C4D"  # fixed, as the timestamps (FAT_EPOCH): the same inputs give the same partition bytes
FAT_EPOCH = "315532800"  # 1980-01-01, FAT's first date: mtools' SOURCE_DATE_EPOCH

LARGE_PAGE = 1 << 20 << 1  # uefi.asm maps the engine's window in 2 MiB pages
LOADER_TABLES_BYTES = 7 * 4096  # uefi.asm TABLES_BYTES: page tables and the resident page
OVMF_OWN_MIB = 64  # OVMF 2022.11 (q35 or pc) keeps this much: with 48 MiB it cannot spare the loader 4 MiB
QEMU64 = "qemu-system-x86_64"  # OVMF's x86-64 firmware needs a 64-bit machine
OVMF_DIR = Path("/usr/share/OVMF")
OVMF_CODE = OVMF_DIR / "OVMF_CODE_4M.fd"  # Debian's build without Secure Boot: the loader is not signed
OVMF_VARS = OVMF_DIR / "OVMF_VARS_4M.fd"  # the variable store template; each boot writes to its own copy
OVMF_INSTALL = "apt-get install ovmf"
FAT_TOOLS_INSTALL = "apt-get install dosfstools mtools"
SBIN = ("/usr/sbin", "/sbin")  # mkfs.fat lives here, often not on a user's PATH


def assemble_loader(engine: AssembledCode, listing_dir: Path | None = None) -> AssembledCode:
    """Assemble uefi.asm for an engine: the addresses of its main32 and screen_hook come from the engine's map.
    With listing_dir, nasm's listing and map file are kept there (uefi.lst, uefi.map)."""
    missing = [name for name in ENGINE_SYMBOLS if name not in engine.symbols]
    if missing:
        raise BootError(f"the engine has no {' or '.join(missing)}: it cannot run under the UEFI loader")
    return assemble(LOADER_SOURCE, {"ENGINE_MAIN32": engine.symbols["main32"],
                                    "ENGINE_SCREEN_HOOK": engine.symbols["screen_hook"]}, listing_dir)


def loader_code_bytes(loader: AssembledCode) -> int:
    """The loader's code bytes (nasm's map: code_start to code_end), without the PE header, constants and variables."""
    return loader.symbols["code_end"] - loader.symbols["code_start"]


def payload(run_block: bytes, engine: bytes, model: bytes) -> bytes:
    """\\SECTORLLM.BIN: the run block sector, the engine padded to whole sectors, then the model."""
    if len(run_block) != SECTOR:
        raise BootError(f"a run block is one {SECTOR}-byte sector, not {len(run_block)} bytes")
    return run_block + whole_sectors(engine) + model


def esp_files(engine: AssembledCode, run_block: bytes, model: bytes,
              listing_dir: Path | None = None) -> tuple[dict[str, bytes], AssembledCode]:
    """The ESP's files for a run (its run block sector and model) on an engine: the loader assembled for the
    engine at LOADER_PATH, the payload at PAYLOAD_NAME; and the assembled loader, for its size."""
    loader = assemble_loader(engine, listing_dir)
    return {LOADER_PATH: loader.code, PAYLOAD_NAME: payload(run_block, engine.code, model)}, loader


def fat_tool(name: str) -> str:
    """The path of a dosfstools or mtools program; BootError if it is not installed."""
    found = shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))
    if found is None:
        raise BootError(f"{name} is not installed, the EFI System Partition cannot be built: {FAT_TOOLS_INSTALL}")
    return found


def esp_bytes(files: Mapping[str, bytes]) -> int:
    """The partition size for files: room for them in 512-byte clusters and their directories, FAT16's minimum, a
    whole number of MiB (so a partition that follows stays aligned)."""
    data = sum(-(-len(content) // SECTOR) * SECTOR for content in files.values())
    needed = max(ESP_MIN_BYTES, data + data // 16 + (1 << 20))  # FATs, root directory, folders, slack
    return -(-needed // (1 << 20)) << 20


def build_esp(files: Mapping[str, bytes], start_lba: int) -> bytes:
    """A FAT16 EFI System Partition holding files (path with "/" -> content), for a disk where it starts at
    start_lba (the boot sector's hidden-sector count)."""
    mkfs, mmd, mcopy = (fat_tool(name) for name in ("mkfs.fat", "mmd", "mcopy"))
    size = esp_bytes(files)
    cluster_sectors = 1
    while size // (cluster_sectors * SECTOR) > FAT16_MAX_CLUSTERS:
        cluster_sectors *= 2
    with tempfile.TemporaryDirectory(prefix="sectorllm-esp-") as scratch:
        fat = Path(scratch) / "esp.img"
        _run([mkfs, "--invariant", "-F", "16", "-s", str(cluster_sectors), "-h", str(start_lba), "-i", FAT_SERIAL,
              "-n", FAT_LABEL, "-C", str(fat), str(size // 1024)])
        folders = sorted({str(parent) for name in files for parent in Path(name).parents} - {"."})
        for folder in folders:  # parents before children: sorted puts "EFI" before "EFI/BOOT"
            _run([mmd, "-i", str(fat), f"::/{folder}"])
        for name, content in files.items():
            source = Path(scratch) / "file"
            source.write_bytes(content)
            _run([mcopy, "-i", str(fat), str(source), f"::/{name}"])
        return fat.read_bytes()


def _run(command: list[str]) -> bytes:
    """Run one FAT tool: its output; BootError with its message if it fails."""
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1", "SOURCE_DATE_EPOCH": FAT_EPOCH}
    done = subprocess.run(command, capture_output=True, env=env)
    if done.returncode != 0:
        message = (done.stderr or done.stdout).decode(errors="replace").strip()
        raise BootError(f"{Path(command[0]).name} failed on an EFI System Partition: {message}")
    return done.stdout


def partition_entry(kind: int, start_lba: int, sectors: int) -> bytes:
    """One 16-byte MBR partition table entry, not active; the CHS fields hold the "use LBA" marker (1023/254/63)."""
    chs_beyond = b"\xfe\xff\xff"
    return struct.pack("<B3sB3sII", 0, chs_beyond, kind, chs_beyond, start_lba, sectors)


def add_esp(disk: bytes, files: Mapping[str, bytes]) -> bytes:
    """disk (an MBR-partitioned image whose second table entry is free) with an EFI System Partition holding files
    added: on the next MiB boundary, in the table's second entry; the whole padded to cylinders of CYLINDER_SECTORS,
    as BIOSes take a disk's geometry from its size."""
    if len(disk) < SECTOR or disk[510:512] != b"\x55\xaa" or len(disk) % SECTOR:
        raise BootError("the disk image has no MBR (boot signature 0x55AA): the EFI System Partition needs one")
    entry = MBR_TABLE + 16 * ESP_ENTRY
    if any(disk[entry:entry + 16]):
        raise BootError(f"the disk image's partition table entry {ESP_ENTRY + 1} is taken: no room for the EFI "
                        "System Partition")
    start = -(-len(disk) // ESP_ALIGN) * ESP_ALIGN // SECTOR
    esp = build_esp(files, start)
    mbr = bytearray(disk[:SECTOR])
    mbr[entry:entry + 16] = partition_entry(ESP_TYPE, start, len(esp) // SECTOR)
    image = bytes(mbr) + disk[SECTOR:] + bytes(start * SECTOR - len(disk)) + esp
    return image + bytes(-len(image) % (CYLINDER_SECTORS * SECTOR))


def hybrid_image(legacy: bytes, engine: AssembledCode, disk: DiskLayout) -> tuple[bytes, AssembledCode]:
    """A legacy image (image.py build_image: its bytes, engine and disk layout) that boots under UEFI too: the ESP
    added with the loader and the payload taken from the legacy partition; and the assembled loader."""
    run_block = legacy[disk.payload_lba * SECTOR:(disk.payload_lba + 1) * SECTOR]
    model = legacy[disk.model_lba * SECTOR:disk.model_lba * SECTOR + disk.model_bytes]
    files, loader = esp_files(engine, run_block, model)
    return add_esp(legacy, files), loader


def uefi_disk_image(files: Mapping[str, bytes], listing_dir: Path | None = None) -> bytes:
    """A disk that boots under UEFI only: an MBR whose one partition is the ESP holding files, and whose code
    (uefi_mbr.asm) tells a BIOS that boots it so."""
    mbr = assemble(MBR_SOURCE, None, listing_dir).code
    return add_esp(mbr + bytes(510 - len(mbr)) + b"\x55\xaa", files)


def loader_bytes(memory_end: int) -> int:
    """The block the loader asks the firmware for: the engine's window (memory_end rounded up to 2 MiB), 2 MiB to
    align it, its page tables and resident page."""
    window = -(-memory_end // LARGE_PAGE) * LARGE_PAGE
    return window + LARGE_PAGE + LOADER_TABLES_BYTES


def ovmf_memory_mib(memory_end: int) -> int:
    """The RAM to give QEMU for a run under OVMF: the loader's block and the firmware's own."""
    return -(-loader_bytes(memory_end) // (1 << 20)) + OVMF_OWN_MIB


def read_esp_file(image: Path, name: str = PAYLOAD_NAME) -> bytes:
    """A file from the ESP of a disk image (mtools reading the partition in place); BootError if the image has no
    ESP or the ESP no such file."""
    with open(image, "rb") as f:
        mbr = f.read(SECTOR)
    entries = [mbr[MBR_TABLE + 16 * i:MBR_TABLE + 16 * (i + 1)] for i in range(4)] if len(mbr) == SECTOR else []
    starts = [int.from_bytes(entry[8:12], "little") for entry in entries if entry[4] == ESP_TYPE]
    if not starts:
        raise BootError(f"{image} has no EFI System Partition in its partition table")
    return _run([fat_tool("mcopy"), "-i", f"{image}@@{starts[0] * SECTOR}", f"::/{name}", "-"])


def ovmf_firmware() -> tuple[Path, Path]:
    """OVMF's code (read-only) and variable-store template; BootError if the ovmf package is missing."""
    for path in (OVMF_CODE, OVMF_VARS):
        if not path.is_file():
            raise BootError(f"OVMF firmware {path} not found, the image cannot boot under UEFI: {OVMF_INSTALL}")
    return OVMF_CODE, OVMF_VARS


def ovmf_qemu_args(vars_copy: Path) -> list[str]:
    """qemu-system-x86_64 arguments that make OVMF the firmware (q35 is the machine it is tested on): its code
    read-only, vars_copy (a copy of OVMF_VARS made for this boot, as the firmware writes to it) its variable store."""
    code, _ = ovmf_firmware()
    return ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
            "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}"]


def copy_ovmf_vars(directory: Path) -> Path:
    """A fresh copy of OVMF's variable store in directory, for one boot."""
    _, template = ovmf_firmware()
    target = Path(directory) / "OVMF_VARS.fd"
    shutil.copyfile(template, target)
    return target


@dataclass(frozen=True)
class OvmfRun:
    """One boot under OVMF: how QEMU ended, what COM1 and the firmware's console carried, when tokens arrived."""

    exit_code: int  # QEMU's: (status << 1) | 1 after isa-debug-exit
    serial: bytes  # COM1, all of it: the firmware's boot messages, the loader's cue, then the engine's stream
    console: bytes  # COM2, where OVMF keeps a terminal: what ConOut showed, with the terminal's escape sequences
    output: EngineOutput  # COM1 after the cue, decoded
    token_times: tuple[float, ...]  # time.monotonic() as each token record completed


def run_ovmf(image: Path, *, drive: str = "virtio", memory_mib: int = 256, handshake: int | None = SERIAL_RECORDS,
             timeout: float = 300.0) -> OvmfRun:
    """Boot image under OVMF (qemu-system-x86_64, q35, TCG, headless) until the guest ends the run, sending the
    handshake byte (None: none, as a terminal would) when the loader's cue arrives and SERIAL_GO after the end
    record; BootError after timeout."""
    binary = shutil.which(QEMU64)
    if binary is None:
        raise BootError(f"{QEMU64} is not installed, the image cannot boot under UEFI: {QEMU_INSTALL}")
    with tempfile.TemporaryDirectory(prefix="sectorllm-ovmf-") as scratch:
        com2 = Path(scratch) / "com2.txt"
        command = [binary, "-machine", "q35", *ovmf_qemu_args(copy_ovmf_vars(Path(scratch))), "-m", str(memory_mib),
                   "-display", "none", "-no-reboot", "-nic", "none", "-serial", "stdio", "-serial", f"file:{com2}",
                   "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", *drive_arguments(Path(image), drive)]
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        watchdog = threading.Timer(timeout, process.kill)
        watchdog.start()
        serial, decoder, times, cue = bytearray(), SerialDecoder(), [], -1
        try:
            while chunk := os.read(process.stdout.fileno(), 1 << 16):
                serial += chunk
                if cue < 0 and (cue := serial.find(HANDSHAKE_CUE)) >= 0:
                    cue += len(HANDSHAKE_CUE)
                    if handshake is not None:
                        send_serial(process, handshake)
                    chunk = serial[cue:]
                for record in decoder.feed(chunk) if cue >= 0 else ():
                    if isinstance(record, Token):
                        times.append(time.monotonic())
                    elif isinstance(record, End):
                        send_serial(process, SERIAL_GO)  # the engine waits for it after its end record
            exit_code = process.wait()
            stderr = process.stderr.read().decode(errors="replace")
        finally:
            watchdog.cancel()
            if process.poll() is None:
                process.kill()
            process.wait()
            for stream in (process.stdin, process.stdout, process.stderr):
                stream.close()
        if exit_code == -signal.SIGKILL:
            raise BootError(f"the UEFI boot did not finish within {timeout:g} s (QEMU killed): raise the timeout, or "
                            f"look at the output so far: {bytes(serial[-200:])!r}")
        if exit_code & 1 == 0:
            raise BootError(f"QEMU ended (exit code {exit_code}) without the guest ending the run: {stderr.strip()}")
        return OvmfRun(exit_code, bytes(serial), com2.read_bytes(), decoder.output(), tuple(times))
