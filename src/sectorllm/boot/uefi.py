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
import struct
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

from ..errors import BootError
from .image import RUN_VERSION, SECTOR, SOURCE_DIR, AssembledCode, assemble

LOADER_SOURCE = SOURCE_DIR / "uefi.asm"
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

OVMF_DIR = Path("/usr/share/OVMF")
OVMF_CODE = OVMF_DIR / "OVMF_CODE_4M.fd"  # Debian's build without Secure Boot: the loader is not signed
OVMF_VARS = OVMF_DIR / "OVMF_VARS_4M.fd"  # the variable store template; each boot writes to its own copy
OVMF_INSTALL = "apt-get install ovmf"
FAT_TOOLS_INSTALL = "apt-get install dosfstools mtools"
SBIN = ("/usr/sbin", "/sbin")  # mkfs.fat lives here, often not on a user's PATH


def assemble_loader(engine: AssembledCode, listing_dir: Path | None = None) -> AssembledCode:
    """Assemble uefi.asm for an engine: the addresses of its main32 and screen_hook come from the engine's map."""
    missing = [name for name in ENGINE_SYMBOLS if name not in engine.symbols]
    if missing:
        raise BootError(f"the engine has no {' or '.join(missing)}: it cannot run under the UEFI loader")
    return assemble(LOADER_SOURCE, {"ENGINE_MAIN32": engine.symbols["main32"],
                                    "ENGINE_SCREEN_HOOK": engine.symbols["screen_hook"], "RUN_VERSION": RUN_VERSION},
                    listing_dir)


def loader_code_bytes(loader: AssembledCode) -> int:
    """The loader's code bytes (nasm's map: code_start to code_end), without the PE header, constants and variables."""
    return loader.symbols["code_end"] - loader.symbols["code_start"]


def payload(run_block: bytes, engine: bytes, model: bytes) -> bytes:
    """\\SECTORLLM.BIN: the run block sector, the engine padded to whole sectors, then the model."""
    if len(run_block) != SECTOR:
        raise BootError(f"a run block is one {SECTOR}-byte sector, not {len(run_block)} bytes")
    return run_block + engine + bytes(-len(engine) % SECTOR) + model


def _tool(name: str, install: str) -> str:
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
    mkfs, mmd, mcopy = (_tool(name, FAT_TOOLS_INSTALL) for name in ("mkfs.fat", "mmd", "mcopy"))
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


def _run(command: list[str]) -> None:
    """Run one FAT tool; BootError with its message if it fails."""
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1", "SOURCE_DATE_EPOCH": FAT_EPOCH}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise BootError(f"{Path(command[0]).name} failed building the EFI System Partition: "
                        f"{(done.stderr or done.stdout).strip()}")


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


def uefi_disk_image(files: Mapping[str, bytes]) -> bytes:
    """A disk that boots under UEFI only: an MBR with no boot code whose one partition is the ESP holding files."""
    return add_esp(bytes(510) + b"\x55\xaa", files)


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


def drive_args(image: Path, drive: str) -> list[str]:
    """QEMU arguments attaching image as a virtio disk or a USB stick (usb-storage on an xHCI controller)."""
    if drive == "virtio":
        return ["-drive", f"file={image},format=raw,if=virtio,snapshot=on"]
    if drive == "usb":
        return ["-drive", f"file={image},format=raw,if=none,id=stick,snapshot=on", "-device", "qemu-xhci",
                "-device", "usb-storage,drive=stick"]
    raise BootError(f"unknown drive {drive!r} for a UEFI boot: use virtio or usb")
