"""The contract with the boot engine: the disk image it boots from, the memory it needs, the records it answers with.

Disk image (512-byte sectors, LBA), as a hard disk (USB stick, any controller) or a 1.44 MB floppy:

    LBA 0                   boot sector (boot.asm): a floppy's BIOS parameter block, or an MBR partition table with
                            one active partition (type 0xDA, non-filesystem data) over the payload
    LBA payload_lba         run block: RUN_BLOCK_FORMAT below, then the prompt token ids; zero-padded
    .. + 1 .. + E           engine binary (engine.asm), E = engine_sectors <= 64 (it runs at 0x8000..0xFFFF)
    LBA model_lba ..        model blob (the packed model), model_bytes long, zero-padded
    the rest                zeros, to whole cylinders of DISK_HEADS x DISK_SECTORS_PER_TRACK (BIOSes take a disk's
                            geometry from its size) or to the floppy's 2,880 sectors; on a floppy the FAT after the
                            payload makes the medium an empty FAT12 volume, whose reserved sectors hold the payload

Run block (layout.asm RB_*), little-endian:

     0  4s   magic "SLRB"            32  u32  inv_temperature_q16 (0 = greedy)    60  u32 x 8  buffer addresses
     4  u16  version (6)             36  u32  topp_q16 (65536 = off)              92  u32  exp table address
                                                                                 96  u32  kv_base
     6  u16  engine_sectors          40  u32  topk (0 = off)                     100  u32  kv_block
     8  u32  model_lba               44  u32  minp_q16 (0 = off)                 104  u32  off_vt
    12  u32  model_bytes             48  u64  seed (xorshift64* state)           108  u32  kv_stride
    16  u32  memory_end              56  u16  forward passes to run              112  u32  value_row
    20  u16  steps (0 = context)     58  u16  prompt token count (>= 1)          116  u32  layer_bytes
    22  u16  IDT limit               128  IDT: N_VECTORS gates into the          120  u32  0 (the first position)
    24  u32  IDT base (RUN_BLOCK+128)      engine's exception_sled              240  u16[] prompt ids, BOS first
    28  i32  -4 x kernel_macs

The sampling fields are FixedSamplerConfig's integers (engines/fixed.py); the buffers and the KV cache are placed
by memory_layout() from the model's shape: in the low arena (0x10000..0x7FFFF) where they fit, else after the model.
Serial protocol (COM1; SerialDecoder): plain text unless the runner sends SERIAL_RECORDS first; then log text,
never STX, and records `STX 'T' id:u16 n:u8` followed by the token's n raw bytes, `STX 'E' status:u8` at the end
(after which the engine waits for one more byte, SERIAL_GO), `STX 'M' name=value ETX` from the self-test.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

from ..atomic import write_atomically
from ..config import ModelConfig
from ..engines.fixed import ONE_Q16, FixedSamplerConfig
from ..errors import BootError, UsageError
from ..generate import step_budget
from ..packed import HEADER, MAGIC as PACKED_MAGIC, Section, header_config, read_sections
from ..sampling import clock_seed
from ..tokenizer import BOS

SECTOR = 512
DISK_PAYLOAD_LBA = 63  # a disk's payload partition starts on its second track, as DOS placed the first partition
FLOPPY_PAYLOAD_LBA = 1
DISK_HEADS = 16
DISK_SECTORS_PER_TRACK = 63
FLOPPY_SECTORS = 2880  # 1.44 MB: 80 cylinders, 2 heads, 18 sectors per track
PARTITION_TABLE = 446
PARTITION_TYPE = 0xDA  # non-filesystem data
ENGINE_BASE = 0x8000
MAX_ENGINE_SECTORS = 63  # layout.asm: the boot sector reads them all, below 64 KiB
MAX_ENGINE_BYTES = MAX_ENGINE_SECTORS * SECTOR
MODEL_BASE = 0x100000
LOW_ARENA = (0x10000, 0x80000)  # conventional memory free after loading: below any EBDA (at most 128 KiB)
ADDRESSABLE_TOP = 0xC000_0000  # PC memory above 3 GiB is PCI holes and ROM on QEMU's machines
PAGE = 4096
HEAP_ALIGN = PAGE  # the high arena starts on a page after the model
BUFFER_ALIGN = 16
XB_DISTANCE = 0x10000  # layout.asm: xb = x + XB_DISTANCE, so dim <= 16384

RUN_MAGIC = b"SLRB"
RUN_VERSION = 6
RUN_BLOCK_FORMAT = "<4sHHIIIHHIiIIIIQHH8II6II"
RUN_BLOCK = 0x7E00  # where the boot sector loads it
RUN_BLOCK_IDT = 128  # layout.asm RB_IDT
RUN_BLOCK_HEADER = 240  # layout.asm RB_PROMPT_IDS: the prompt ids follow the IDT
MAX_PROMPT_TOKENS = (SECTOR - RUN_BLOCK_HEADER) // 2
MAX_STEPS = 0xFFFF

STX = 0x02
ETX = 0x03
SERIAL_RECORDS = 0x1E  # runner -> engine, before the boot: send records instead of plain text
SERIAL_GO = 0x0D  # runner -> engine, after the end record: exit now

SOURCE_DIR = Path(__file__).resolve().parent
BOOT_SOURCE = SOURCE_DIR / "boot.asm"
ENGINE_SOURCE = SOURCE_DIR / "engine.asm"
BOOT_CALLS = ("read_sectors", "print", "put_char", "fail", "stop")  # the boot sector's routines the engine calls
NASM_INSTALL = "apt-get install nasm"


class Status(IntEnum):
    """End-of-run status: the end record's value and the byte sent to isa-debug-exit (layout.asm STATUS_*)."""

    OK = 0x00
    DISK_ERROR = 0x02  # an INT 13h read kept failing, or INT 15h AH=87h could not copy above 1 MiB
    BAD_RUN_BLOCK = 0x03
    A20_CLOSED = 0x04
    OUT_OF_MEMORY = 0x05  # the RAM from 1 MiB ends before memory_end: the loader refuses the run
    CPU_EXCEPTION = 0x06
    NEEDS_386 = 0x07


@dataclass(frozen=True)
class RunBlock:
    """What one boot generates: the prompt, the step budget and FixedSamplerConfig's integers."""

    prompt_tokens: tuple[int, ...] = (BOS,)  # encode(prompt): BOS first, at least BOS
    steps: int = 256  # forward passes, prompt included (run.c's -n); 0 = the whole context
    inv_temperature_q16: int = 0  # round(65536 / temperature); 0 is greedy
    topp_q16: int = ONE_Q16  # round(65536 * top-p); 65536 turns top-p off
    topk: int = 0  # 0 turns top-k off
    minp_q16: int = 0  # round(65536 * min-p); 0 turns min-p off
    seed: int = 1  # the xorshift64* state: never 0, which would stay 0
    passes: int = 0  # the forward passes the engine runs: step_budget(steps, the model's seq_len)

    @classmethod
    def from_sampler(cls, config: FixedSamplerConfig, prompt_tokens: list[int] | tuple[int, ...],
                     steps: int, seq_len: int) -> RunBlock:
        """The run block for a fixed-point sampler and a model's context; seed 0 takes the seed from the clock now,
        as FixedSampler does, and a step count past the u16 field becomes 0: both mean the whole context."""
        return cls(tuple(prompt_tokens), steps if steps <= MAX_STEPS else 0, config.inv_temperature_q16,
                   config.topp_q16, config.topk, config.minp_q16, config.seed or clock_seed(),
                   step_budget(steps, seq_len)[0])

    def validate(self) -> None:
        """Refuse values the run block cannot hold; raises UsageError naming the field."""
        if not self.prompt_tokens:
            raise UsageError("the prompt has no tokens; it starts with BOS at least")
        if len(self.prompt_tokens) > MAX_PROMPT_TOKENS:
            raise UsageError(f"the prompt has {len(self.prompt_tokens)} tokens; a boot image holds at most "
                             f"{MAX_PROMPT_TOKENS}: shorten it")
        if any(not 0 <= t < 1 << 16 for t in self.prompt_tokens):
            raise UsageError("a prompt token id is outside 0..65535: the boot engine stores ids as u16")
        for name, bits in (("steps", 16), ("inv_temperature_q16", 32), ("topp_q16", 32), ("topk", 32),
                           ("minp_q16", 32), ("seed", 64), ("passes", 16)):
            value = getattr(self, name)
            if not 0 <= value < 1 << bits:
                raise UsageError(f"{name} {value} does not fit the run block's unsigned {bits}-bit field")


BUFFER_NAMES = ("x", "xb", "act", "qkv", "hb", "att", "logits", "kernel")  # engine.asm's order


@dataclass(frozen=True)
class MemoryLayout:
    """Where the engine's buffers and KV cache go (addresses), the cache's geometry, and the end of it all."""

    buffers: tuple[int, ...]  # BUFFER_NAMES' addresses
    exp_table: int  # the packed model's exp table in memory: MODEL_BASE + its section's offset
    kv_base: int
    kv_block: int  # bytes of one (layer, kv head) block: cache_len key rows, then the values transposed
    off_vt: int  # the values' offset in a block
    kv_stride: int  # bytes of a key row: head_size int16 keys, Dk, Dv
    value_row: int  # bytes of a transposed value row: cache_len int16
    layer_bytes: int
    kernel_macs: int  # multiply-adds in each dot-product kernel: the longest dot product
    memory_end: int  # the first address past the model and everything placed after it

    @property
    def fields(self) -> tuple[int, ...]:
        return (*self.buffers, self.exp_table, self.kv_base, self.kv_block, self.off_vt, self.kv_stride, self.value_row,
                self.layer_bytes)


def exp_table_offset(model_blob: bytes, name: str = "the packed model") -> int:
    """Where a packed model's exp table section starts in the file (the engine's sampler and attention read it);
    PackedFormatError, naming the blob, if it is not a sound packed model."""
    return read_sections(model_blob, name)[1][Section.EXP_TABLE].offset


def align(n: int, to: int) -> int:
    return -(-n // to) * to


def memory_layout(model_bytes: int, config: ModelConfig | None, passes: int,
                  exp_table_offset: int = 0) -> MemoryLayout:
    """Place the buffers and the KV cache for a model and a number of forward passes (the cache holds that many
    positions): x at the start of the low arena and xb XB_DISTANCE after it; the others, largest first, each in the
    first free range of the low arena it fits (the kernels on whole pages), else after the model; and say where the
    model's exp table (its section at exp_table_offset) lies. Without a config (a blob that is not a packed model:
    the self-test's) nothing is placed."""
    model_end = MODEL_BASE + sectors(model_bytes) * SECTOR
    if config is None:
        return MemoryLayout((0,) * len(BUFFER_NAMES), 0, 0, 0, 0, 0, 0, 0, 1, model_end)
    c, cache_len = config, max(passes, 1)
    macs = max(c.dim, c.hidden_dim, cache_len)
    kv_stride = 2 * c.head_size + 8
    value_row = 2 * cache_len
    off_vt = cache_len * kv_stride
    kv_block = off_vt + c.head_size * value_row
    layer_bytes = kv_block * c.n_kv_heads
    sizes = {"x": 4 * c.dim, "xb": 4 * c.dim, "act": 4 * max(c.dim, c.hidden_dim), "qkv": 4 * (c.dim + 2 * c.kv_dim),
             "hb": 8 * c.hidden_dim, "att": 4 * cache_len, "logits": 4 * c.vocab_size,  # then the sampler's keys
             "kernel": 2 * (16 * macs + 1), "kv": layer_bytes * c.n_layers}
    x = LOW_ARENA[0]
    placed = {"x": x, "xb": x + XB_DISTANCE}  # rmsnorm writes xb at x + XB_DISTANCE
    free = [[x + sizes["x"], x + XB_DISTANCE], [x + XB_DISTANCE + sizes["xb"], LOW_ARENA[1]],
            [align(model_end, HEAP_ALIGN), None]]  # [start, end) ranges; the last one is open
    rest = [name for name in sizes if name not in placed]  # in sizes' order: equal sizes keep it (a set would not)
    for name in sorted(rest, key=lambda n: -sizes[n]):
        granule = PAGE if name == "kernel" else BUFFER_ALIGN  # QEMU takes a slow path on every write to a code page
        size = align(sizes[name], granule)
        space = next(r for r in free if r[1] is None or align(r[0], granule) + size <= r[1])
        placed[name] = align(space[0], granule)
        space[0] = placed[name] + size
    high = free[-1][0]
    return MemoryLayout(tuple(placed[name] for name in BUFFER_NAMES), MODEL_BASE + exp_table_offset, placed["kv"],
                        kv_block, off_vt, kv_stride, value_row, layer_bytes, macs,
                        align(max(model_end, high), 1024))  # whole KiB, as reported


@dataclass(frozen=True)
class DiskLayout:
    """Where the boot sector and the engine find the parts of an image."""

    payload_lba: int  # the run block; the engine follows it
    engine_sectors: int
    model_lba: int
    model_bytes: int


def interrupt_table(engine_symbols: Mapping[str, int]) -> bytes:
    """The engine's IDT (exceptions.asm): for each of its N_VECTORS, a 32-bit interrupt gate in CODE32 to the
    vector's push in exception_sled (two bytes each)."""
    sled, selector = engine_symbols["exception_sled"], engine_symbols["CODE32"]
    return b"".join(struct.pack("<HHHH", (sled + 2 * v) & 0xFFFF, selector, 0x8E00, (sled + 2 * v) >> 16)
                    for v in range(engine_symbols["N_VECTORS"]))


def pack_run_block(run: RunBlock, disk: DiskLayout, memory: MemoryLayout, idt: bytes = b"") -> bytes:
    """The run block sector for a run, a disk layout, a memory layout and the engine's interrupt_table."""
    run.validate()
    if len(idt) > RUN_BLOCK_HEADER - RUN_BLOCK_IDT:
        raise BootError(f"the engine's IDT is {len(idt)} bytes, more than the run block's room for it")
    header = struct.pack(RUN_BLOCK_FORMAT, RUN_MAGIC, RUN_VERSION, disk.engine_sectors, disk.model_lba,
                         disk.model_bytes, memory.memory_end, run.steps, max(len(idt), 1) - 1,
                         RUN_BLOCK + RUN_BLOCK_IDT, -4 * memory.kernel_macs, run.inv_temperature_q16, run.topp_q16,
                         run.topk, run.minp_q16, run.seed, run.passes, len(run.prompt_tokens), *memory.fields, 0)
    prompt = struct.pack(f"<{len(run.prompt_tokens)}H", *run.prompt_tokens)
    return (header.ljust(RUN_BLOCK_IDT, b"\0") + idt).ljust(RUN_BLOCK_HEADER, b"\0") + prompt.ljust(
        SECTOR - RUN_BLOCK_HEADER, b"\0")


def unpack_run_block(sector: bytes, payload_lba: int) -> tuple[RunBlock, DiskLayout, MemoryLayout]:
    """Read back a run block sector; raises BootError if it is not one."""
    (magic, version, engine_sectors, model_lba, model_bytes, memory_end, steps, _, _, kernel_disp,
     inv_temperature_q16, topp_q16, topk, minp_q16, seed, passes, n_prompt, *fields, _) = struct.unpack_from(
        RUN_BLOCK_FORMAT, sector)
    if magic != RUN_MAGIC or version != RUN_VERSION or n_prompt > MAX_PROMPT_TOKENS:
        raise BootError(f"not a version {RUN_VERSION} sectorllm run block (magic {magic!r}, version {version})")
    prompt = struct.unpack_from(f"<{n_prompt}H", sector, RUN_BLOCK_HEADER)
    n = len(BUFFER_NAMES)
    return (RunBlock(prompt, steps, inv_temperature_q16, topp_q16, topk, minp_q16, seed, passes),
            DiskLayout(payload_lba, engine_sectors, model_lba, model_bytes),
            MemoryLayout(tuple(fields[:n]), *fields[n:], -kernel_disp // 4, memory_end))


def image_firmware(boot_sector: bytes) -> str:
    """What a disk or floppy image boots under, from its partition table: "bios" (a payload partition, or none: a
    floppy), "uefi" (only an EFI System Partition, type 0xEF) or "both"."""
    kinds = {boot_sector[PARTITION_TABLE + 16 * i + 4] for i in range(4)} if len(boot_sector) == SECTOR else set()
    if 0xEF not in kinds:
        return "bios"
    return "both" if PARTITION_TYPE in kinds else "uefi"


def payload_lba(boot_sector: bytes) -> int:
    """Where an image's run block is: the start of its partition of PARTITION_TYPE, else (a floppy) sector 1."""
    entry = boot_sector[PARTITION_TABLE:PARTITION_TABLE + 16]
    if len(entry) == 16 and entry[4] == PARTITION_TYPE:
        return int.from_bytes(entry[8:12], "little")
    return FLOPPY_PAYLOAD_LBA


def sectors(n_bytes: int) -> int:
    """Sectors needed for n_bytes."""
    return -(-n_bytes // SECTOR)


def whole_sectors(data: bytes) -> bytes:
    """data zero-padded to whole sectors."""
    return data.ljust(sectors(len(data)) * SECTOR, b"\0")


@dataclass(frozen=True)
class AssembledCode:
    """One nasm output and the assembler's own report of it (map file), and where its listing went if kept."""

    code: bytes
    origin: int  # the org address
    size: int  # bytes of output, from the map file's section summary
    symbols: Mapping[str, int]  # labels (addresses) and equ constants, from the map file
    warnings: tuple[str, ...]
    listing: Path | None  # the .lst and .map files, when a listing folder was asked for


def assemble(source: Path, defines: Mapping[str, str | int | None] | None = None,
             listing_dir: Path | None = None) -> AssembledCode:
    """Run nasm -f bin -w+all on source (includes from its folder) in a temporary folder; with listing_dir, keep
    its listing and map file there as <source stem>.lst and .map."""
    nasm = shutil.which("nasm")
    if nasm is None:
        raise BootError(f"nasm is not installed, the boot image cannot be built: {NASM_INSTALL}")
    source = Path(source).resolve()
    flags = [f"-D{name}" if value is None else f"-D{name}={value}" for name, value in (defines or {}).items()]
    with tempfile.TemporaryDirectory(prefix="sectorllm-nasm-") as scratch:
        # The map directive takes a bare file name: run in the scratch folder so no path can break it.
        command = [nasm, "-f", "bin", "-w+all", *flags, "-I", f"{source.parent}/", "--before",
                   f"[map all {source.stem}.map]", "-l", f"{source.stem}.lst", "-o", "out.bin", str(source)]
        done = subprocess.run(command, cwd=scratch, capture_output=True, text=True)
        if done.returncode != 0:
            raise BootError(f"nasm failed on {source.name}: {done.stderr.strip()}")
        origin, size, symbols = parse_map((Path(scratch) / f"{source.stem}.map").read_text())
        listing = None
        if listing_dir is not None:
            listing = Path(listing_dir) / f"{source.stem}.lst"
            listing.parent.mkdir(exist_ok=True)  # the folder asked for, in a folder that exists
            for suffix in (".lst", ".map"):
                shutil.copyfile(Path(scratch) / f"{source.stem}{suffix}", listing.with_suffix(suffix))
        code = (Path(scratch) / "out.bin").read_bytes()
    return AssembledCode(code, origin, size, symbols, tuple(done.stderr.splitlines()), listing)


_MAP_ORIGIN = re.compile(r"-- Program origin -+\s+([0-9A-Fa-f]+)")
_MAP_SECTION = re.compile(r"^\s*[0-9A-Fa-f]+\s+[0-9A-Fa-f]+\s+[0-9A-Fa-f]+\s+([0-9A-Fa-f]+)\s+progbits\s+\S+$", re.M)
_MAP_LABEL = re.compile(r"^\s*([0-9A-Fa-f]+)\s+[0-9A-Fa-f]+\s+(\S+)$", re.M)
_MAP_CONSTANT = re.compile(r"^([0-9A-Fa-f]{8})\s+(\S+)$", re.M)


def parse_map(text: str) -> tuple[int, int, dict[str, int]]:
    """Origin, total section length and symbols of a nasm bin map file ([map all])."""
    origin = _MAP_ORIGIN.search(text)
    lengths = _MAP_SECTION.findall(text)
    if origin is None or not lengths:
        raise BootError("nasm's map file has no origin or section summary (unexpected nasm version?)")
    symbols_part = text[text.index("-- Symbols"):]
    symbols = {name: int(value, 16) for value, name in _MAP_CONSTANT.findall(symbols_part)}
    symbols.update({name: int(value, 16) for value, name in _MAP_LABEL.findall(symbols_part)})
    return int(origin.group(1), 16), sum(int(n, 16) for n in lengths), symbols


@dataclass(frozen=True)
class ImageInfo:
    """A built image and its size figures (from the assembler's map files)."""

    path: Path
    disk: DiskLayout
    memory: MemoryLayout
    floppy: bool
    firmware: str  # "bios", "uefi" or "both": what the image boots under
    boot_code_bytes: int  # the boot sector's code and messages, between the BPB area and the partition table
    engine_bytes: int
    image_bytes: int
    boot: AssembledCode
    engine: AssembledCode
    loader_code_bytes: int  # the UEFI loader's code (uefi.py loader_code_bytes); 0 for an image without one


def partition_entry(first_lba: int, n_sectors: int) -> bytes:
    """An active MBR partition entry of PARTITION_TYPE over [first_lba, first_lba + n_sectors), with its CHS
    addresses in the DISK_HEADS x DISK_SECTORS_PER_TRACK geometry (saturated past cylinder 1023, as usual)."""

    def chs(lba: int) -> bytes:
        cylinder, rest = divmod(lba, DISK_HEADS * DISK_SECTORS_PER_TRACK)
        head, sector = divmod(rest, DISK_SECTORS_PER_TRACK)
        if cylinder > 1023:
            cylinder, head, sector = 1023, DISK_HEADS - 1, DISK_SECTORS_PER_TRACK - 1
        return bytes((head, (sector + 1) | (cylinder >> 8) << 6, cylinder & 0xFF))

    return (b"\x80" + chs(first_lba) + bytes((PARTITION_TYPE,)) + chs(first_lba + n_sectors - 1)
            + struct.pack("<II", first_lba, n_sectors))


def floppy_parameter_block(reserved_sectors: int) -> bytes:
    """Bytes 3..61 of a 1.44 MB floppy's boot sector: a FAT12 BIOS parameter block whose reserved sectors (the boot
    sector and the payload) come before an empty file system, so an operating system sees a blank floppy."""
    return struct.pack("<8sHBHBHHBHHHII BBBI11s8s", b"SECTLLM ", SECTOR, 1, reserved_sectors, 2, 224,
                       FLOPPY_SECTORS, 0xF0, 9, 18, 2, 0, 0, 0, 0, 0x29, 0x5EC7011, b"SECTORLLM  ", b"FAT12   ")


FIRMWARES = ("bios", "uefi", "both")


def build_image(model_blob: bytes, run: RunBlock, output: Path, *, floppy: bool = False, firmware: str = "bios",
                engine_defines: Mapping[str, str | int | None] | None = None, listing_dir: Path | None = None,
                memory_limit: int = ADDRESSABLE_TOP) -> ImageInfo:
    """Assemble the boot sector and the engine (their listings kept in listing_dir if given) and write the image:
    a partitioned disk image, or with floppy a 1.44 MB floppy image (BootError if the payload does not fit). With
    firmware "both" the disk also holds an EFI System Partition with the UEFI loader (uefi.py), "uefi" only that.

    memory_limit is the first physical address the engine may not use; a model (with, for a packed model, the
    engine's buffers and KV cache) that would run past it is refused.
    """
    output = Path(output)
    if firmware not in FIRMWARES:
        raise UsageError(f"firmware {firmware!r} is not one of {', '.join(FIRMWARES)}")
    if floppy and firmware != "bios":
        raise UsageError("a floppy image boots under a BIOS only: UEFI firmware boots from disks (no --floppy)")
    config = header_config(HEADER.unpack_from(model_blob)) if model_blob[:4] == PACKED_MAGIC else None
    memory = memory_layout(len(model_blob), config, run.passes, exp_table_offset(model_blob) if config else 0)
    if memory.memory_end > memory_limit:
        raise BootError(f"the model is {len(model_blob)} bytes: loaded at 1 MiB, with the engine's buffers and KV "
                        f"cache, it overruns the addressable memory (up to {memory_limit:#x}) by "
                        f"{memory.memory_end - memory_limit} bytes")
    if config is not None and 4 * config.dim > XB_DISTANCE:
        raise BootError(f"dim {config.dim} is more than the boot engine takes ({XB_DISTANCE // 4}: rmsnorm writes xb "
                        f"{XB_DISTANCE:#x} bytes after x)")
    payload_lba = FLOPPY_PAYLOAD_LBA if floppy else DISK_PAYLOAD_LBA
    boot = assemble(BOOT_SOURCE, {"PAYLOAD_LBA": payload_lba}, listing_dir)
    calls = {name.upper(): boot.symbols[name] for name in BOOT_CALLS}
    engine = assemble(ENGINE_SOURCE, {**calls, **(engine_defines or {})}, listing_dir)
    if engine.size > MAX_ENGINE_BYTES:
        raise BootError(f"the engine is {engine.size} bytes, {engine.size - MAX_ENGINE_BYTES} more than the "
                        f"{MAX_ENGINE_BYTES} it can have below 64 KiB")
    engine_sectors = sectors(engine.size)
    disk = DiskLayout(payload_lba, engine_sectors, payload_lba + 1 + engine_sectors, len(model_blob))
    payload_end = disk.model_lba + sectors(len(model_blob))
    boot_sector = bytearray(boot.code)
    if floppy:
        if payload_end > FLOPPY_SECTORS - 32:  # room for the FAT12 volume's two FATs and root directory
            raise BootError(f"the model is {len(model_blob):,} bytes: with the engine it needs {payload_end} "
                            f"sectors, more than a 1.44 MB floppy holds: build a disk image (no --floppy)")
        boot_sector[3:62] = floppy_parameter_block(payload_end)
        total = FLOPPY_SECTORS
    else:
        total = align(payload_end, DISK_HEADS * DISK_SECTORS_PER_TRACK)
        boot_sector[PARTITION_TABLE:PARTITION_TABLE + 16] = partition_entry(payload_lba, total - payload_lba)
    run_block = pack_run_block(run, disk, memory, interrupt_table(engine.symbols))
    parts = [bytes(boot_sector), bytes((payload_lba - 1) * SECTOR), run_block, whole_sectors(engine.code),
             whole_sectors(model_blob)]
    if floppy:
        fat = b"\xf0\xff\xff".ljust(9 * SECTOR, b"\0")
        parts += [fat, fat]
    used = sum(map(len, parts))
    parts.append(bytes(total * SECTOR - used))
    loader_code_bytes = 0
    if firmware != "bios":
        from .uefi import esp_files, loader_code_bytes as code_bytes, uefi_disk_image, add_esp

        files, loader = esp_files(engine, run_block, model_blob, listing_dir)
        parts = [add_esp(b"".join(parts), files) if firmware == "both" else uefi_disk_image(files, listing_dir)]
        loader_code_bytes = code_bytes(loader)
    image_bytes = write_atomically(output, parts)
    return ImageInfo(output, disk, memory, floppy, firmware, boot.symbols["code_end"] - boot.symbols["entry"],
                     engine.size, image_bytes, boot, engine, loader_code_bytes)


@dataclass(frozen=True)
class Token:
    """A generated token: its id and the bytes the engine printed for it."""

    id: int
    data: bytes


@dataclass(frozen=True)
class Value:
    """A named number the engine reported (an `M` record)."""

    name: str
    value: int


@dataclass(frozen=True)
class End:
    """The end record: the run is over, with this status."""

    status: int


Record = Token | Value | End


@dataclass(frozen=True)
class EngineOutput:
    """Everything the engine said on COM1, decoded."""

    tokens: tuple[Token, ...]
    log: str  # the text outside records: start-up messages, errors
    values: Mapping[str, int]
    end_status: int | None  # None when no end record came (the boot sector failed, or the run was cut short)

    @property
    def generated_tokens(self) -> list[int]:
        return [t.id for t in self.tokens]

    @property
    def text_bytes(self) -> bytes:
        return b"".join(t.data for t in self.tokens)

    @property
    def text(self) -> str:
        return self.text_bytes.decode("utf-8", errors="replace")


@dataclass
class SerialDecoder:
    """Splits the engine's serial stream into log text and records, as its bytes arrive in chunks of any size.

    Records (engine.asm SERIAL PROTOCOL): STX 'T' id (u16) n (u8) and n bytes: a token; STX 'E' status (u8): the
    end; STX 'M' name '=' decimal ETX: a self-test value. Outside records the stream is log text.
    """

    log: bytearray = field(default_factory=bytearray)
    records: list[Record] = field(default_factory=list)
    _tag: int | None = field(default=None, init=False, repr=False)  # 0 after STX until the tag arrives
    _body: bytearray = field(default_factory=bytearray, init=False, repr=False)
    _token_left: int = field(default=0, init=False, repr=False)  # a token's bytes still to come

    def feed(self, data: bytes) -> list[Record]:
        """Take more bytes; returns the records they completed."""
        done: list[Record] = []
        for byte in data:
            if self._tag is None:
                if byte == STX:
                    self._tag, self._body = 0, bytearray()
                else:
                    self.log.append(byte)
                continue
            if self._tag == 0:
                if byte not in b"TEM":
                    raise BootError(f"malformed serial record from the engine: tag {byte:#04x}")
                self._tag = byte
                continue
            record = self._take(byte)
            if record is not None:
                done.append(record)
                self._tag = None
        self.records += done
        return done

    def _take(self, byte: int) -> Record | None:
        """One more byte of the current record; the record once it is complete."""
        tag, body = chr(self._tag), self._body
        if tag == "M":
            if byte != ETX:
                body.append(byte)
                return None
            match = re.fullmatch(rb"([a-z0-9_]+)=(\d+)", body)
            if match is None:
                raise BootError(f"malformed serial record from the engine: {bytes(body)!r}")
            return Value(match[1].decode(), int(match[2]))
        body.append(byte)
        if tag == "E":
            return End(byte)
        if len(body) < 3:
            return None
        if len(body) == 3:
            self._token_left = body[2]
        else:
            self._token_left -= 1
        return Token(int.from_bytes(body[:2], "little"), bytes(body[3:])) if self._token_left == 0 else None

    def output(self) -> EngineOutput:
        """The decoded stream so far."""
        ends = [r.status for r in self.records if isinstance(r, End)]
        return EngineOutput(tokens=tuple(r for r in self.records if isinstance(r, Token)),
                            log=self.log.decode("utf-8", errors="replace"),
                            values={r.name: r.value for r in self.records if isinstance(r, Value)},
                            end_status=ends[-1] if ends else None)
