"""The contract with the boot engine: the disk image it boots from, the memory it needs, the records it answers with.

Disk image (512-byte sectors, LBA), each part starting on a sector boundary:

    LBA 0                   boot sector (boot.asm): loads the run block, the engine and the model (INT 13h AH=42h,
                            INT 15h AH=87h above 1 MiB) after checking the RAM against memory_end
    LBA 1                   run block: RUN_BLOCK_FORMAT below, then the prompt token ids; zero-padded
    LBA 2 .. 2+E-1          engine binary (engine.asm), E = engine_sectors <= 64 (it runs at 0x8000..0xFFFF)
    LBA model_lba ..        model blob (the packed model), model_bytes long, zero-padded

Run block, little-endian (offsets are the RB_* constants of boot.asm and engine.asm); the sampling fields are those
of FixedSamplerConfig (engines/fixed.py), the integers the fixed-point sampler uses:

     0  4s   magic "SLRB"            16  u32  inv_temperature_q16 (0 = greedy)    32  u64  seed (xorshift64* state)
     4  u16  version (4)             20  u32  topp_q16 (65536 = off)              40  u16  forward passes to run
     6  u16  engine_sectors          24  u32  topk (0 = off)                      42  u16  prompt token count (>= 1)
     8  u32  model_lba               28  u32  minp_q16 (0 = off)                  44  u16  steps (0 = whole context)
    12  u32  model_bytes                                                          46  u32  memory_end
                                                                                  50  u16[] prompt token ids, BOS first

The model sits at MODEL_BASE (1 MiB); memory_end() is the end of it, the engine's buffers and its KV cache.
Serial protocol (COM1; SerialDecoder): log text, never STX, and records `STX 'T' id:u16 n:u8` followed by the
token's n raw bytes, `STX 'E' status:u8` at the end, `STX 'M' name=value ETX` from the self-test.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

from ..atomic import write_atomically
from ..config import ModelConfig
from ..engines.fixed import ONE_Q16, FixedSamplerConfig
from ..errors import BootError, UsageError
from ..generate import step_budget
from ..packed import HEADER, MAGIC as PACKED_MAGIC, header_config
from ..sampling import clock_seed
from ..tokenizer import BOS

SECTOR = 512
RUN_BLOCK_LBA = 1
ENGINE_LBA = 2
ENGINE_BASE = 0x8000
MAX_ENGINE_BYTES = 0x10000 - ENGINE_BASE  # code and data need 16-bit offsets with DS = 0
MODEL_BASE = 0x100000
ADDRESSABLE_TOP = 0xC000_0000  # PC memory above 3 GiB is PCI holes and ROM on QEMU's machines
# engine.asm's memory map after the model: BUFFER_SLOTS buffers of SLOT_BYTES from the heap, then the KV cache
BUFFER_SLOTS = 9  # N_BUFFERS
SLOT_BYTES = 1 << 20  # SLOT_BYTES
KERNEL_MACS = (SLOT_BYTES - 2) // 32  # setup_model's two kernels of 16-byte multiply-adds share a slot
HEAP_ALIGN = 4096  # HEAP_ALIGN

RUN_MAGIC = b"SLRB"
RUN_VERSION = 4
RUN_BLOCK_FORMAT = "<4sHHIIIIIIQHHHI"
RUN_BLOCK_HEADER = struct.calcsize(RUN_BLOCK_FORMAT)
MAX_PROMPT_TOKENS = (SECTOR - RUN_BLOCK_HEADER) // 2
MAX_STEPS = 0xFFFF

STX = 0x02
ETX = 0x03
SERIAL_HOLD = 0x12  # runner -> engine: wait at the end until SERIAL_GO
SERIAL_GO = 0x14

SOURCE_DIR = Path(__file__).resolve().parent
BOOT_SOURCE = SOURCE_DIR / "boot.asm"
ENGINE_SOURCE = SOURCE_DIR / "engine.asm"
NASM_INSTALL = "apt-get install nasm"


class Status(IntEnum):
    """End-of-run status: the end record's value and the byte sent to isa-debug-exit (boot.asm, engine.asm)."""

    OK = 0x00
    DISK_ERROR = 0x02  # an INT 13h read or INT 15h AH=87h copy failed (as it does on a BIOS without INT 13h AH=42h)
    BAD_RUN_BLOCK = 0x03
    A20_CLOSED = 0x04
    MODEL_TOO_LARGE = 0x05  # the RAM above 1 MiB ends before memory_end: the boot sector refuses the run


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


@dataclass(frozen=True)
class DiskLayout:
    """Where the boot sector and the engine find the parts of an image, and how much memory the run needs."""

    engine_sectors: int
    model_lba: int
    model_bytes: int
    memory_end: int  # memory_end(): the boot sector refuses a machine whose RAM from 1 MiB ends before it


def pack_run_block(run: RunBlock, layout: DiskLayout) -> bytes:
    """The run block sector for a run and a layout."""
    run.validate()
    header = struct.pack(RUN_BLOCK_FORMAT, RUN_MAGIC, RUN_VERSION, layout.engine_sectors, layout.model_lba,
                         layout.model_bytes, run.inv_temperature_q16, run.topp_q16, run.topk, run.minp_q16, run.seed,
                         run.passes, len(run.prompt_tokens), run.steps, layout.memory_end)
    prompt = struct.pack(f"<{len(run.prompt_tokens)}H", *run.prompt_tokens)
    return (header + prompt).ljust(SECTOR, b"\0")


def unpack_run_block(sector: bytes) -> tuple[RunBlock, DiskLayout]:
    """Read back a run block sector; raises BootError if it is not one."""
    (magic, version, engine_sectors, model_lba, model_bytes, inv_temperature_q16, topp_q16, topk, minp_q16, seed,
     passes, n_prompt, steps, memory_end) = struct.unpack_from(RUN_BLOCK_FORMAT, sector)
    if magic != RUN_MAGIC or version != RUN_VERSION or n_prompt > MAX_PROMPT_TOKENS:
        raise BootError(f"not a version {RUN_VERSION} sectorllm run block (magic {magic!r}, version {version})")
    prompt = struct.unpack_from(f"<{n_prompt}H", sector, RUN_BLOCK_HEADER)
    return (RunBlock(prompt, steps, inv_temperature_q16, topp_q16, topk, minp_q16, seed, passes),
            DiskLayout(engine_sectors, model_lba, model_bytes, memory_end))


def sectors(n_bytes: int) -> int:
    """Sectors needed for n_bytes."""
    return -(-n_bytes // SECTOR)


def kv_cache_bytes(config: ModelConfig) -> int:
    """engine.asm store_kv's blocks: per layer and kv head, seq_len key rows (int16 keys, Dk, Dv) and int16 values."""
    return config.n_layers * config.n_kv_heads * config.seq_len * (4 * config.head_size + 8)


def memory_end(model_bytes: int, config: ModelConfig | None) -> int:
    """The first physical address past everything the engine uses: the model loaded at MODEL_BASE and, for a packed
    model's config, its buffers and KV cache (engine.asm setup_model)."""
    model_end = MODEL_BASE + sectors(model_bytes) * SECTOR
    if config is None:
        return model_end
    heap = -(-model_end // HEAP_ALIGN) * HEAP_ALIGN
    return heap + BUFFER_SLOTS * SLOT_BYTES + kv_cache_bytes(config)


@dataclass(frozen=True)
class AssembledCode:
    """One nasm output and the assembler's own report of it (listing, map file)."""

    binary: Path
    listing: Path
    map_file: Path
    origin: int  # the org address
    size: int  # bytes of output, from the map file's section summary
    symbols: Mapping[str, int]  # labels (addresses) and equ constants, from the map file
    warnings: tuple[str, ...]


def assemble(source: Path, output: Path, defines: Mapping[str, str | int | None] | None = None) -> AssembledCode:
    """Run nasm -f bin -w+all on source; the listing and the map file go next to output (.lst, .map)."""
    nasm = shutil.which("nasm")
    if nasm is None:
        raise BootError(f"nasm is not installed, the boot image cannot be built: {NASM_INSTALL}")
    output = output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    listing, map_file = output.with_suffix(".lst"), output.with_suffix(".map")
    flags = [f"-D{name}" if value is None else f"-D{name}={value}" for name, value in (defines or {}).items()]
    # The map directive takes a bare file name: run in the output folder so paths with spaces cannot break it.
    command = [nasm, "-f", "bin", "-w+all", *flags, "--before", f"[map all {map_file.name}]",
               "-l", listing.name, "-o", output.name, str(Path(source).resolve())]
    done = subprocess.run(command, cwd=output.parent, capture_output=True, text=True)
    if done.returncode != 0:
        raise BootError(f"nasm failed on {source}: {done.stderr.strip()}")
    origin, size, symbols = parse_map(map_file.read_text())
    return AssembledCode(output, listing, map_file, origin, size, symbols, tuple(done.stderr.splitlines()))


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
    layout: DiskLayout
    boot_code_bytes: int  # boot sector bytes before the padding and the 0xAA55 signature
    engine_bytes: int
    image_bytes: int
    boot: AssembledCode
    engine: AssembledCode


def build_image(model_blob: bytes, run: RunBlock, output: Path, *,
                engine_defines: Mapping[str, str | int | None] | None = None, build_dir: Path | None = None,
                memory_limit: int = ADDRESSABLE_TOP) -> ImageInfo:
    """Assemble boot sector and engine (listings in build_dir, default output's folder/build) and write the image.

    memory_limit is the first physical address the engine may not use; a model (with, for a packed model, the
    engine's buffers and KV cache) that would run past it is refused.
    """
    output = Path(output)
    config = header_config(HEADER.unpack_from(model_blob)) if model_blob[:4] == PACKED_MAGIC else None
    end = memory_end(len(model_blob), config)
    if end > memory_limit:
        raise BootError(f"the model is {len(model_blob)} bytes: loaded at 1 MiB, with the engine's buffers and KV "
                        f"cache, it overruns the addressable memory (up to {memory_limit:#x}) by {end - memory_limit} "
                        "bytes")
    build = Path(build_dir) if build_dir is not None else output.parent / "build"
    boot = assemble(BOOT_SOURCE, build / "boot.bin")
    engine = assemble(ENGINE_SOURCE, build / "engine.bin", engine_defines)
    if engine.size > MAX_ENGINE_BYTES:
        raise BootError(f"the engine is {engine.size} bytes, {engine.size - MAX_ENGINE_BYTES} more than the "
                        f"{MAX_ENGINE_BYTES} it can have below 64 KiB")
    layout = DiskLayout(sectors(engine.size), ENGINE_LBA + sectors(engine.size), len(model_blob), end)
    parts = (boot.binary.read_bytes(), pack_run_block(run, layout), engine.binary.read_bytes(), model_blob)
    output.parent.mkdir(parents=True, exist_ok=True)
    image_bytes = write_atomically(output, [piece for part in parts for piece in (part, bytes(-len(part) % SECTOR))])
    return ImageInfo(output, layout, boot.symbols["code_end"] - boot.origin, engine.size, image_bytes, boot, engine)


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
