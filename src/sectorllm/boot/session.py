"""The boot engine end to end: a model and run settings in, a boot image out; generation and benchmarks through it."""

from __future__ import annotations

import math
import os
import queue
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from ..api import load_packed
from ..config import ModelConfig
from ..engines.fixed import FixedSamplerConfig
from ..errors import BootError, PackedFormatError, UsageError
from ..generate import (GenerationResult, StreamedGeneration, Token as TextToken, check_steps, encode_prompt,
                        step_budget)
from ..packed import DEFAULT_SCHEME, HEADER, MAGIC, PackedModel, header_config, pack
from ..sampling import SamplerConfig
from ..tokenizer import BOS, EOS
from .image import (ADDRESSABLE_TOP, FLOPPY_PAYLOAD_LBA, MAX_ENGINE_SECTORS, MAX_PROMPT_TOKENS, SECTOR,
                    DiskLayout, ImageInfo, MemoryLayout, RunBlock, Status, Token, build_image, exp_table_offset,
                    image_firmware, memory_layout, payload_lba, unpack_run_block)
from .qemu import DEFAULT_MEMORY_MIB, DEFAULT_TIMEOUT, MachineConfig, boot

MEBIBYTE = 1 << 20
BIOS_HEADROOM_MIB = 4  # SeaBIOS keeps the top of RAM for its tables
BENCH_MODEL = "stories260K"
BENCH_TOKENS = 256


def memory_mib(end: int) -> int:
    """The machine size to give QEMU or the emulator so that [1 MiB, end) is RAM the BIOS reports."""
    return max(DEFAULT_MEMORY_MIB, math.ceil(end / MEBIBYTE) + BIOS_HEADROOM_MIB)


def packed_model(model: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                 scheme: str = DEFAULT_SCHEME) -> tuple[bytes, PackedModel]:
    """A packed .sllm file as it is, or a checkpoint (path or name) quantized with its tokenizer: bytes and model.

    Refuses (BootError) a model whose weights, buffers and KV cache would run past what the engine can address.
    """
    packed = load_packed(model, tokenizer, scheme)
    blob = bytes(pack(packed))
    end = memory_layout(len(blob), packed.config, packed.config.seq_len).memory_end
    if end > ADDRESSABLE_TOP:
        raise BootError(f"{model} needs memory up to {end:#x} for its weights, buffers and KV cache: "
                        f"{end - ADDRESSABLE_TOP} bytes more than the boot engine can address (up to "
                        f"{ADDRESSABLE_TOP:#x})")
    return blob, packed


def run_block(packed: PackedModel, prompt: str, steps: int, sampler: SamplerConfig) -> RunBlock:
    """The run block for a prompt and run.c-style settings; refuses what the model or the image cannot hold."""
    check_steps(steps)
    seq_len = packed.config.seq_len
    tokens = encode_prompt(packed.tokenizer, prompt, seq_len)
    if len(tokens) > MAX_PROMPT_TOKENS:
        raise UsageError(f"the prompt is {len(tokens)} tokens; a boot image holds at most {MAX_PROMPT_TOKENS}: "
                         "shorten it")
    return RunBlock.from_sampler(FixedSamplerConfig.from_sampler_config(sampler), tokens, steps, seq_len)


def make_image(model: str | os.PathLike, tokenizer: str | os.PathLike | None, output: str | os.PathLike, *,
               prompt: str = "", steps: int = 256, temperature: float = 1.0, topp: float = 0.9, topk: int = 0,
               minp: float = 0.0, seed: int = 0, scheme: str = DEFAULT_SCHEME, floppy: bool = False,
               firmware: str = "bios", listing_dir: str | os.PathLike | None = None) -> ImageInfo:
    """Write a boot image that generates from `prompt` with these settings (run.c's meaning, seed 0 = the clock now):
    a partitioned disk image, or a 1.44 MB floppy image. The sizes are in the returned ImageInfo; nasm's listings
    and map files go to listing_dir if given.
    """
    sampler = SamplerConfig(temperature, topp, topk, minp, seed)
    sampler.validate()
    blob, packed = packed_model(model, tokenizer, scheme)
    return build_image(blob, run_block(packed, prompt, steps, sampler), Path(output), floppy=floppy,
                       firmware=firmware, listing_dir=None if listing_dir is None else Path(listing_dir))


@dataclass(frozen=True)
class BootImage:
    """What an image file holds: its run block and the shape of its model."""

    path: Path
    run: RunBlock
    disk: DiskLayout
    memory: MemoryLayout
    config: ModelConfig
    floppy: bool
    firmware: str  # image.image_firmware: "bios", "uefi" or "both"

    @property
    def model_bytes(self) -> int:
        return self.disk.model_bytes

    @property
    def memory_mib(self) -> int:
        return memory_mib(self.memory.memory_end)

    def model_blob(self) -> bytes:
        """The packed model's bytes, from the payload partition or (a UEFI-only image) the ESP's payload file."""
        if self.firmware == "uefi":
            from .uefi import read_esp_file

            return read_esp_file(self.path)[SECTOR * (1 + self.disk.engine_sectors):][:self.disk.model_bytes]
        with open(self.path, "rb") as f:
            f.seek(self.disk.model_lba * SECTOR)
            return f.read(self.disk.model_bytes)

    @property
    def forward_passes(self) -> tuple[int, str]:
        """run.c's step budget for this run block (generate.step_budget): passes and the reason at the end."""
        return step_budget(self.run.steps, self.config.seq_len)

    @property
    def echoed(self) -> int:
        """Token records that are the prompt echoed (every prompt token after the first, up to the budget)."""
        return min(len(self.run.prompt_tokens) - 1, self.forward_passes[0])


def read_image(path: str | os.PathLike) -> BootImage:
    """Read a boot image's run block and its model's shape; BootError if the file is not a sectorllm image."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            boot_sector = f.read(SECTOR)
            firmware = image_firmware(boot_sector)
            if firmware == "uefi":  # the payload is a file on the EFI System Partition
                from .uefi import read_esp_file

                payload = read_esp_file(path)
                run, disk, memory = unpack_run_block(payload[:SECTOR], 0)
                header = payload[SECTOR * (1 + disk.engine_sectors):][:HEADER.size]
            else:
                lba = payload_lba(boot_sector)
                f.seek(lba * SECTOR)
                run, disk, memory = unpack_run_block(f.read(SECTOR), lba)
                f.seek(disk.model_lba * SECTOR)
                header = f.read(HEADER.size)
    except OSError as e:
        raise BootError(f"cannot read boot image {path}: {e.strerror}") from None
    except struct.error:
        raise BootError(f"{path} is too short to be a sectorllm boot image") from None
    if len(header) < HEADER.size or header[:len(MAGIC)] != MAGIC:
        raise BootError(f"{path} holds no packed model where its run block says: not a sectorllm boot image")
    return BootImage(path, run, disk, memory, header_config(HEADER.unpack_from(header)),
                     firmware == "bios" and disk.payload_lba == FLOPPY_PAYLOAD_LBA, firmware)


def verify_image(path: str | os.PathLike) -> BootImage:
    """read_image, then what the engine would trip over, each refused in one line (BootError) before any boot: parts
    past the file's end, a packed model whose CRC or section table is wrong, prompt ids outside the vocabulary, a
    memory layout or step budget other than the one image.py gives this model."""
    image = read_image(path)
    disk, run, config = image.disk, image.run, image.config
    size = image.path.stat().st_size
    if not 1 <= disk.engine_sectors <= MAX_ENGINE_SECTORS or image.firmware != "uefi" and (
            disk.model_lba < disk.payload_lba + 1 + disk.engine_sectors
            or (disk.model_lba + -(-disk.model_bytes // SECTOR)) * SECTOR > size):
        raise BootError(f"{image.path}: its run block places the engine or the model outside the image: the image "
                        "is damaged, build it again")
    blob = image.model_blob()
    try:
        exp_table = exp_table_offset(blob, "its packed model")
    except PackedFormatError as e:
        raise BootError(f"{image.path}: {e}; build the image again") from None
    bad = [t for t in run.prompt_tokens if t >= config.vocab_size]
    if not run.prompt_tokens or run.prompt_tokens[0] != BOS or bad:
        raise BootError(f"{image.path}: its prompt is not BOS and token ids below {config.vocab_size}: the image is "
                        "damaged, build it again")
    if run.passes != step_budget(run.steps, config.seq_len)[0] or \
            image.memory != memory_layout(disk.model_bytes, config, run.passes, exp_table):
        raise BootError(f"{image.path}: its run block's step budget or memory layout is not this model's: the image "
                        "is damaged, build it again")
    return image


def result_of(image: BootImage, tokens: list[Token], seconds: list[float]) -> GenerationResult:
    """GenerationResult from an image's token records (prompt echo first, then generated, maybe a stop record) and
    the times they arrived."""
    generated = tokens[image.echoed:]
    stop_reason = image.forward_passes[1]
    if generated and generated[-1].id in (BOS, EOS) and not generated[-1].data:
        stop_reason = "bos" if generated[-1].id == BOS else "eos"
        generated = generated[:-1]
    times = seconds[image.echoed:image.echoed + len(generated)]
    tok_per_s = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0
    text = b"".join(t.data for t in tokens).decode("utf-8", errors="replace")
    return GenerationResult(list(image.run.prompt_tokens), [t.id for t in generated], text, stop_reason, tok_per_s,
                            image.run.seed)


@dataclass(frozen=True)
class BootRun:
    """One boot of an image in QEMU: the generation it did and how the machine ended."""

    result: GenerationResult
    status: int
    seconds: float
    screenshot: Path | None


def run_image(path: str | os.PathLike, *, timeout: float = DEFAULT_TIMEOUT, machine: MachineConfig = MachineConfig(),
              screenshot: Path | None = None, on_token: Callable[[Token], None] | None = None) -> BootRun:
    """Boot an image in QEMU (verify_image first), calling on_token for each token record as it arrives; BootError if
    the engine fails."""
    image = verify_image(path)
    if machine.drive == "floppy" and not image.floppy:
        raise UsageError(f"{image.path} is a disk image; --drive floppy takes a floppy image (sectorllm image "
                         "--floppy)")
    if image.firmware != "both" and image.firmware != machine.firmware:
        rebuild = "" if image.floppy else ", or build it with sectorllm image --firmware both"
        raise UsageError(f"{image.path} boots under {'UEFI' if image.firmware == 'uefi' else 'a BIOS'} only: "
                         f"use --firmware {'uefi' if image.firmware == 'uefi' else 'bios'}{rebuild}")
    tokens: list[Token] = []
    seconds: list[float] = []

    def arrived(token: Token) -> None:
        tokens.append(token)
        seconds.append(time.monotonic())
        if on_token is not None:
            on_token(token)

    if machine.firmware == "uefi":
        from .uefi import ovmf_memory_mib

        memory = ovmf_memory_mib(image.memory.memory_end)
    else:
        memory = image.memory_mib
    booted = boot(image.path, timeout=timeout, machine=machine, memory_mib=memory, screenshot=screenshot,
                  on_token=arrived)
    if booted.status != Status.OK:
        name = Status(booted.status).name if booted.status in Status.__members__.values() else booted.status
        raise BootError(f"the boot engine ended with status {name}: {booted.log.strip()[-300:] or 'no output'}")
    return BootRun(result_of(image, tokens, seconds), booted.status, booted.seconds, booted.screenshot)


class BootGeneration(StreamedGeneration):
    """Generation through a boot image in QEMU, iterated like generate.Generation: Tokens as the engine sends them,
    then `result`. The image is built in a temporary folder when the iteration starts."""

    def __init__(self, blob: bytes, run: RunBlock, timeout: float, machine: MachineConfig) -> None:
        self.blob, self.run, self.timeout, self.machine = blob, run, timeout, machine

    def __iter__(self) -> Iterator[TextToken]:
        if self._result is not None:
            return
        arrivals: queue.Queue[Token | BootRun | BaseException] = queue.Queue()
        with tempfile.TemporaryDirectory(prefix="sectorllm-boot-") as scratch:
            path = Path(scratch) / "boot.img"
            build_image(self.blob, self.run, path, floppy=self.machine.drive == "floppy",
                        firmware="uefi" if self.machine.firmware == "uefi" else "bios")
            echoed = read_image(path).echoed

            def run() -> None:
                try:
                    arrivals.put(run_image(path, timeout=self.timeout, machine=self.machine, on_token=arrivals.put))
                except BaseException as error:  # handed to the consumer, which raises it
                    arrivals.put(error)

            worker = threading.Thread(target=run, daemon=True)
            worker.start()
            count = 0
            while True:
                item = arrivals.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, BootRun):
                    break
                if item.data or item.id not in (BOS, EOS):
                    yield TextToken(item.id, item.data, generated=count >= echoed)
                count += 1
            worker.join()
        self._result = item.result


@dataclass
class BootModel:
    """A model loaded for the boot engine, with api.Model's generate(): `sectorllm run --engine boot`."""

    blob: bytes
    packed: PackedModel
    timeout: float = DEFAULT_TIMEOUT
    machine: MachineConfig = MachineConfig()

    @property
    def config(self) -> ModelConfig:
        return self.packed.config

    def generate(self, prompt: str = "", *, steps: int = 256, temperature: float = 1.0, topp: float = 0.9,
                 topk: int = 0, minp: float = 0.0, seed: int = 0) -> BootGeneration:
        """As api.Model.generate: iterate for Tokens as QEMU sends them; `.result` holds the whole run."""
        return BootGeneration(self.blob, run_block(self.packed, prompt, steps,
                                                   SamplerConfig(temperature, topp, topk, minp, seed)), self.timeout,
                               self.machine)


def load_boot(model: str | os.PathLike, tokenizer: str | os.PathLike | None = None, scheme: str = DEFAULT_SCHEME,
              timeout: float = DEFAULT_TIMEOUT, machine: MachineConfig = MachineConfig()) -> BootModel:
    """Load a checkpoint or packed file for generation through a boot image in QEMU (packed_model's refusals)."""
    return BootModel(*packed_model(model, tokenizer, scheme), timeout, machine)


@dataclass(frozen=True)
class BootBench:
    """The boot engine's deterministic speed and size: unicorn's exact instruction count per generated token."""

    model: str
    tokens: int  # generated greedily from BOS
    instructions_per_token: float  # from the start of the first forward pass to the last token's record
    code_bytes: int  # the engine binary, from nasm's map file
    boot_code_bytes: int  # the boot sector's code and messages (between its BPB area and its partition table)
    uefi_loader_bytes: int  # the UEFI loader's code (uefi.asm, for this engine)

    def as_dict(self) -> dict:
        return asdict(self)


def bench_boot(model: str = BENCH_MODEL, tokens: int = BENCH_TOKENS) -> BootBench:
    """Greedy from BOS for `tokens` steps under the unicorn emulator (sectorllm.boot.emulator, needs unicorn)."""
    from .emulator import Emulator

    with tempfile.TemporaryDirectory(prefix="sectorllm-bench-") as scratch:
        info = make_image(model, None, Path(scratch) / "bench.img", steps=tokens, temperature=0.0)
        image = read_image(info.path)
        emulator = Emulator(info.path.read_bytes(), memory_mib=image.memory_mib)
        if emulator.run(until=info.engine.symbols["generate"]) != "breakpoint":
            raise BootError(f"the engine stopped before generating: {emulator.result().log.strip()[-300:]}")
        start = emulator.instructions
        emulator.run()
        result = emulator.result()
    if result.status != Status.OK or not result.token_instructions:
        raise BootError(f"the emulated engine failed (status {result.status}): {result.log.strip()[-300:]}")
    done = result.token_instructions[-1]
    from .uefi import assemble_loader, loader_code_bytes

    return BootBench(str(model), len(result.tokens), (done - start) / len(result.tokens), info.engine_bytes,
                     info.boot_code_bytes, loader_code_bytes(assemble_loader(info.engine)))
