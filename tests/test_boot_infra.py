"""The boot infrastructure on its own: image layout, serial protocol, QEMU runner and unicorn emulator, with a
self-test engine that checksums a known blob in high memory (real nasm, QEMU and unicorn; no mocks)."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sectorllm.boot import image as img
from sectorllm.boot.image import (MODEL_BASE, RunBlock, SerialDecoder, Status, Token, assemble, build_image,
                                  pack_run_block, unpack_run_block)
from sectorllm.boot.qemu import BootResult, MachineConfig, boot
from sectorllm.config import ModelConfig
from sectorllm.engines.fixed import FixedSamplerConfig
from sectorllm.errors import BootError, UsageError
from sectorllm.sampling import SamplerConfig

from .conftest import emulator_module, require
SELFTEST = {"SELFTEST": None}
SELFTEST_TOKENS = [Token(1, b"Once"), Token(9038, b" upon\n"), Token(13, b"\n"), Token(0, b""),
                   Token(400, bytes([0x00, 0xFF, 0x02, 0x03, img.SERIAL_RECORDS, 0x80, 0x0D])),
                   Token(65535, b" time.\r\n\x7f")]
RUN = RunBlock(prompt_tokens=(1, 403, 65535, 0), steps=77, inv_temperature_q16=81920, topp_q16=58982, topk=40,
               seed=0x1234_5678_9ABC_DEF1)


def pattern_blob(n: int) -> bytes:
    """A blob whose every word differs, so a misplaced or missing chunk changes both checksums."""
    words = (np.arange(n // 4 + 1, dtype=np.uint64) * 2654435761 + 12345) % (1 << 32)
    return words.astype("<u4").tobytes()[:n]


def checksums(blob: bytes) -> tuple[int, int]:
    """The selftest's sum and weighted sum (engine.asm selftest), computed independently."""
    padded = blob + bytes(-len(blob) % img.SECTOR)
    words = np.frombuffer(padded, dtype="<u4").astype(np.uint64)
    running = np.cumsum(words) % (1 << 32)
    return int(running[-1]), int(running.sum() % (1 << 32))


def png_pixels(png: Path) -> np.ndarray:
    """The RGB pixels of a PNG, read by matplotlib (rows, columns, 3)."""
    from matplotlib.image import imread

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return imread(png)[:, :, :3]


@pytest.fixture(scope="module")
def blob() -> bytes:
    return pattern_blob(300 * 1024 + 5)  # not a whole sector: the engine must pad with zeros


@pytest.fixture(scope="module")
def selftest_image(tmp_path_factory, blob):
    require("nasm")
    return build_image(blob, RUN, tmp_path_factory.mktemp("selftest") / "selftest.img", engine_defines=SELFTEST)


def tiny_boot_image(tmp_path: Path, body: str, cpu: str = "386") -> Path:
    """A one-sector image running body (nasm, 16-bit, at 0:7C00)."""
    source = tmp_path / "tiny.asm"
    source.write_text(f"bits 16\ncpu {cpu}\norg 0x7C00\n{body}\ntimes 510 - ($ - $$) db 0\ndw 0xAA55\n")
    image = tmp_path / "tiny.img"
    image.write_bytes(assemble(source).code)
    return image


def assert_selftest(result, blob: bytes) -> None:
    total, weighted = checksums(blob)
    assert result.status == Status.OK
    assert result.end_status == Status.OK
    assert result.values["sum"] == total
    assert result.values["weighted_sum"] == weighted
    assert result.values["model_bytes"] == len(blob)
    assert result.values["steps"] == RUN.steps
    assert result.values["inv_temperature"] == RUN.inv_temperature_q16
    assert result.values["topp"] == RUN.topp_q16
    assert result.values["topk"] == RUN.topk
    assert result.values["seed_low"] | result.values["seed_high"] << 32 == RUN.seed
    assert result.values["prompt_count"] == len(RUN.prompt_tokens)
    assert result.values["prompt_sum"] == sum(RUN.prompt_tokens)
    assert list(result.tokens) == SELFTEST_TOKENS
    assert result.generated_tokens == [t.id for t in SELFTEST_TOKENS]
    assert result.text_bytes == b"".join(t.data for t in SELFTEST_TOKENS)
    assert result.log == ""  # no log text on a good run: every byte on COM1 is in a record


# ------------------------------------------------------------------------------------------ layout, protocol


DISK = img.DiskLayout(payload_lba=63, engine_sectors=5, model_lba=69, model_bytes=123456)
MEMORY = img.MemoryLayout(buffers=tuple(range(0x10000, 0x10008)), exp_table=0x101000, kv_base=0x200000,
                          kv_block=1000, off_vt=600, kv_stride=24, value_row=50, layer_bytes=4000, kernel_macs=512,
                          memory_end=0x1234567)


def test_run_block_round_trips():
    sector = pack_run_block(RUN, DISK, MEMORY)
    assert len(sector) == img.SECTOR and sector[:4] == b"SLRB"
    assert unpack_run_block(sector, DISK.payload_lba) == (RUN, DISK, MEMORY)


def test_run_block_from_sampler_holds_the_fixed_sampler_settings():
    config = FixedSamplerConfig.from_sampler_config(SamplerConfig(temperature=0.8, topp=0.9, topk=5, minp=0.05,
                                                                  seed=42))
    run = RunBlock.from_sampler(config, [5, 6], steps=10, seq_len=512)
    assert run == RunBlock((5, 6), 10, inv_temperature_q16=81920, topp_q16=58982, topk=5, minp_q16=3277, seed=42,
                           passes=10)
    whole = RunBlock.from_sampler(config, [1], steps=70000, seq_len=512)
    assert (whole.steps, whole.passes) == (0, 512)  # past u16 and past the context: the whole context
    assert RunBlock.from_sampler(config, [1], steps=0, seq_len=256).passes == 256
    assert RunBlock.from_sampler(FixedSamplerConfig(0), [1], 10, 512).seed != 0  # 0 takes the clock, as FixedSampler


def test_run_block_refuses_what_it_cannot_hold():
    most = (img.SECTOR - img.RUN_BLOCK_HEADER) // 2
    with pytest.raises(UsageError, match=f"at most {most}"):
        pack_run_block(RunBlock(prompt_tokens=(1,) * (most + 1)), DISK, MEMORY)
    with pytest.raises(UsageError, match="passes"):
        pack_run_block(RunBlock(passes=1 << 16), DISK, MEMORY)
    with pytest.raises(UsageError, match="outside 0..65535"):
        pack_run_block(RunBlock(prompt_tokens=(65536,)), DISK, MEMORY)
    with pytest.raises(UsageError, match="seed"):
        pack_run_block(RunBlock(seed=1 << 64), DISK, MEMORY)


def test_serial_decoder_separates_log_tokens_values_and_end():
    stream = (b"boot log\n\x02Mchecksum=42\x03\x02T\x07\x01\x05\x02\x03\n\x00\xff" b"more log\x02T\x08\x00\x00"
              b"\x02E\x00")
    whole = SerialDecoder()
    whole.feed(stream)
    for decoder in (whole, SerialDecoder()):
        if decoder is not whole:
            for i in range(len(stream)):
                decoder.feed(stream[i:i + 1])
        out = decoder.output()
        assert out.log == "boot log\nmore log"
        assert out.values == {"checksum": 42}
        assert list(out.tokens) == [Token(263, b"\x02\x03\n\x00\xff"), Token(8, b"")]
        assert out.end_status == 0


def test_serial_decoder_reports_each_record_when_complete():
    decoder = SerialDecoder()
    assert decoder.feed(b"\x02T\x03\x00\x02a") == []
    assert decoder.feed(b"b\x02E") == [Token(3, b"ab")]
    assert decoder.feed(b"\x05") == [img.End(5)]


@pytest.mark.parametrize("stream", [b"\x02X", b"\x02Mseven\x03", b"\x02M=1\x03"])
def test_serial_decoder_rejects_malformed_records(stream):
    with pytest.raises(BootError, match="malformed"):
        SerialDecoder().feed(stream)


def test_missing_nasm_is_a_boot_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BootError, match="apt-get install nasm"):
        assemble(img.ENGINE_SOURCE)


def test_missing_qemu_is_a_boot_error(tmp_path, monkeypatch):
    image = tmp_path / "x.img"
    image.write_bytes(bytes(512))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BootError, match="apt-get install qemu-system-x86"):
        boot(image)


# ----------------------------------------------------------------------------------------------- building


def test_image_layout_and_sizes(selftest_image, blob):
    info = selftest_image
    data = info.path.read_bytes()
    assert info.image_bytes == len(data) and len(data) % (img.DISK_HEADS * img.DISK_SECTORS_PER_TRACK * 512) == 0
    assert data[510:512] == b"\x55\xaa"
    run, disk, memory = unpack_run_block(data[63 * img.SECTOR:64 * img.SECTOR], 63)
    assert (run, disk, memory) == (RUN, info.disk, info.memory)
    assert disk.engine_sectors == img.sectors(info.engine_bytes)
    assert disk.model_lba == 63 + 1 + disk.engine_sectors
    assert data[64 * img.SECTOR:][:info.engine_bytes] == info.engine.code
    assert data[disk.model_lba * img.SECTOR:][:len(blob)] == blob
    assert info.engine_bytes == len(info.engine.code)  # the map's figure is the binary's size
    assert 0 < info.boot_code_bytes <= img.PARTITION_TABLE - 62
    assert info.boot.warnings == () and info.engine.warnings == ()
    assert info.engine.listing is None
    assert sorted(p.name for p in info.path.parent.iterdir()) == ["selftest.img"]  # nasm's files stay in a temp dir


def test_partition_table_as_sfdisk_reads_it(selftest_image):
    """util-linux's sfdisk, not our reader: one active partition of type 0xDA over the payload, to the disk's end."""
    require("sfdisk")
    dump = subprocess.run(["sfdisk", "--json", str(selftest_image.path)], capture_output=True, text=True, check=True)
    table = json.loads(dump.stdout)["partitiontable"]
    assert table["label"] == "dos"
    (partition,) = table["partitions"]
    total = selftest_image.image_bytes // img.SECTOR
    assert (partition["start"], partition["size"], partition["type"]) == (63, total - 63, "da")
    assert partition.get("bootable") is True


def test_listing_dir_keeps_nasm_listings(tmp_path, blob):
    require("nasm")
    info = build_image(blob, RUN, tmp_path / "x.img", engine_defines=SELFTEST, listing_dir=tmp_path / "listing")
    assert sorted(p.name for p in (tmp_path / "listing").iterdir()) == ["boot.lst", "boot.map", "engine.lst",
                                                                         "engine.map"]
    assert info.engine.listing == tmp_path / "listing" / "engine.lst"


def test_memory_layout_places_every_buffer_apart_and_in_ram():
    config = ModelConfig(dim=288, hidden_dim=768, n_layers=6, n_heads=6, n_kv_heads=6, vocab_size=32000,
                         seq_len=256)
    layout = img.memory_layout(15_000_000, config, passes=256)
    sizes = {"x": 4 * 288, "xb": 4 * 288, "act": 4 * 768, "qkv": 4 * 3 * 288, "hb": 8 * 768, "att": 4 * 256,
             "logits": 4 * 32000, "kernel": 2 * (16 * 768 + 1)}
    spans = [(a, a + sizes[n]) for a, n in zip(layout.buffers, img.BUFFER_NAMES)]
    spans.append((layout.kv_base, layout.kv_base + 6 * 6 * 256 * (4 * 48 + 8)))
    model_end = MODEL_BASE + img.sectors(15_000_000) * img.SECTOR
    for start, end in spans:
        assert img.LOW_ARENA[0] <= start and (end <= img.LOW_ARENA[1] or start >= model_end)
        assert end <= layout.memory_end
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # no two overlap
    assert layout.buffers[1] == layout.buffers[0] + img.XB_DISTANCE
    kernel = layout.buffers[img.BUFFER_NAMES.index("kernel")]  # pages of its own: QEMU slows writes near code
    kernel_pages_end = kernel + img.align(sizes["kernel"], 4096)
    assert kernel % 4096 == 0 and not any(start < kernel_pages_end and kernel < end for start, end in spans
                                          if start != kernel)
    assert layout.kernel_macs == 768 and layout.layer_bytes == 6 * layout.kv_block
    assert layout.kv_block == 256 * (4 * 48 + 8)


def test_floppy_image_is_an_empty_fat12_floppy(tmp_path, blob):
    """A 1.44 MB image whose boot sector is a FAT12 volume's: mtools reads it as an empty floppy."""
    require("nasm")
    info = build_image(blob, RUN, tmp_path / "floppy.img", engine_defines=SELFTEST, floppy=True)
    data = info.path.read_bytes()
    assert len(data) == 1_474_560 and data[510:512] == b"\x55\xaa" and data[0] == 0xEB
    assert info.disk.payload_lba == 1 and data[img.SECTOR:img.SECTOR + 4] == b"SLRB"
    require("mdir")
    listing = subprocess.run(["mdir", "-i", str(info.path), "::"], capture_output=True, text=True,
                             env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
    assert listing.returncode == 0, listing.stderr
    assert "No files" in listing.stdout or "0 files" in listing.stdout
    with pytest.raises(BootError, match="floppy holds"):
        build_image(bytes(1_500_000), RUN, tmp_path / "big.img", engine_defines=SELFTEST, floppy=True)


def test_assembly_constants_match_python(selftest_image):
    engine, boot_sector = selftest_image.engine.symbols, selftest_image.boot.symbols
    fields = ["MAGIC", "VERSION", "ENGINE_SECTORS", "MODEL_LBA", "MODEL_BYTES", "MEMORY_END", "STEPS",
              "IDT_DESCRIPTOR", None, "KERNEL_DISP", "INV_TEMPERATURE", "TOPP", "TOPK", "MINP", "SEED", "PASSES",
              "PROMPT_COUNT", "BUFFERS"]  # None: the IDT's base, the descriptor's second half
    codes = re.findall(r"\d*[A-Za-z]", img.RUN_BLOCK_FORMAT)
    for i, name in enumerate(fields):
        if name is not None:
            assert engine[f"RB_{name}"] == struct.calcsize("<" + "".join(codes[:i])), name
    assert engine["RB_SETTINGS"] == engine["RB_INV_TEMPERATURE"]
    assert engine["RB_EXP_TABLE"] == engine["RB_BUFFERS"] + 4 * len(img.BUFFER_NAMES)
    assert engine["RB_KV_BASE"] == engine["RB_EXP_TABLE"] + 4
    assert engine["RB_POS"] == engine["RB_KV_BASE"] + 24
    assert engine["RB_SETTINGS_END"] == struct.calcsize(img.RUN_BLOCK_FORMAT)
    assert engine["RB_IDT"] == img.RUN_BLOCK_IDT and engine["RUN_BLOCK"] == img.RUN_BLOCK
    assert engine["RB_PROMPT_IDS"] == img.RUN_BLOCK_HEADER == img.RUN_BLOCK_IDT + 8 * engine["N_VECTORS"]
    assert boot_sector["RUN_MAGIC"].to_bytes(4, "little") == img.RUN_MAGIC
    for name in ("RUN_VERSION", "ENGINE_BASE", "MODEL_BASE", "SERIAL_RECORDS", "PARTITION_TABLE",
                 "XB_DISTANCE"):
        assert boot_sector.get(name, engine.get(name)) == getattr(img, name), name
    assert boot_sector["RB_MAGIC"] == engine["RB_MAGIC"] == 0
    assert boot_sector["MAX_ENGINE_SECTORS"] * img.SECTOR == img.MAX_ENGINE_BYTES
    assert engine["ENGINE_BASE"] == engine["engine_start"]
    assert (engine["STX"], engine["ETX"]) == (img.STX, img.ETX)
    assert engine["N_BUFFERS"] == len(img.BUFFER_NAMES)
    statuses = {k: v for k, v in {**boot_sector, **engine}.items() if k.startswith("STATUS_")}
    assert statuses == {f"STATUS_{s.name}": s.value for s in Status}


def test_build_image_refuses_a_model_past_addressable_memory(tmp_path):
    with pytest.raises(BootError, match="by 1024 bytes"):
        build_image(bytes(2048), RunBlock(), tmp_path / "x.img", memory_limit=MODEL_BASE + 1024)
    assert not (tmp_path / "x.img").exists()


# ----------------------------------------------------------------------------------------------------- QEMU


def test_qemu_runs_the_selftest_and_exits_through_isa_debug_exit(selftest_image, blob):
    require("qemu-system-i386")
    streamed: list[Token] = []
    result = boot(selftest_image.path, timeout=30, on_token=streamed.append)
    assert isinstance(result, BootResult)
    assert_selftest(result, blob)
    assert streamed == SELFTEST_TOKENS
    assert result.exit_code == (Status.OK << 1) | 1
    assert 100 * 1024 < result.values["mem_top_kib"] < 128 * 1024  # QEMU's 128 MiB, less what SeaBIOS keeps


def test_qemu_selftest_on_a_486(selftest_image, blob):
    require("qemu-system-i386")
    assert_selftest(boot(selftest_image.path, timeout=30, machine=MachineConfig(cpu="486")), blob)


def test_qemu_screenshot_shows_the_final_screen(selftest_image, blob, tmp_path):
    require("qemu-system-i386")
    shot = tmp_path / "screen.png"
    result = boot(selftest_image.path, timeout=30, screenshot=shot)
    assert_selftest(result, blob)
    assert result.screenshot == shot and result.exit_code == 1
    pixels = png_pixels(shot)
    assert pixels.shape == (400, 720, 3)  # VGA text mode 80x25, 9x16 cells
    lit = np.count_nonzero(pixels.any(axis=2))
    assert 1000 < lit < pixels.shape[0] * pixels.shape[1] // 2  # text on a dark screen
    assert "Once upon" in result.screen_text and " time." in result.screen_text  # the self-test's tokens


def test_qemu_boot_sector_failure_is_reported(selftest_image, tmp_path):
    require("qemu-system-i386")
    broken = tmp_path / "broken.img"
    data = bytearray(selftest_image.path.read_bytes())
    data[63 * img.SECTOR:63 * img.SECTOR + 4] = b"XXXX"
    broken.write_bytes(bytes(data))
    result = boot(broken, timeout=30)
    assert result.status == Status.BAD_RUN_BLOCK and result.end_status is None
    assert result.exit_code == (Status.BAD_RUN_BLOCK << 1) | 1
    assert "sectorllm: bad image" in result.log


def test_qemu_timeout_kills_qemu(tmp_path):
    require("nasm")
    require("qemu-system-i386")
    image = tiny_boot_image(tmp_path, "spin: jmp spin")
    with pytest.raises(BootError, match="did not finish within 1.5 s"):
        boot(image, timeout=1.5)
    still_running = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(image).encode() in cmdline.read_bytes():
                still_running.append(cmdline.parent.name)
        except OSError:
            continue  # the process ended while we looked
    assert still_running == []


def test_kvm_runs_the_selftest(selftest_image, blob):
    """KVM runs the guest on the CPU itself, checking segments as hardware does: the boot sector's INT 15h AH=87h
    copies and the engine's mode switches must hold there too. SeaBIOS boots in ~4 s."""
    require("qemu-system-i386")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no usable /dev/kvm")
    assert_selftest(boot(selftest_image.path, timeout=120, machine=MachineConfig(accel="kvm")), blob)


# ------------------------------------------------------------------------------------------------- unicorn


def test_emulator_runs_the_selftest(selftest_image, blob):
    emulator = emulator_module()
    streamed: list[Token] = []
    result = emulator.emulate(selftest_image.path, memory_mib=16, on_token=streamed.append)
    assert_selftest(result, blob)
    assert streamed == SELFTEST_TOKENS
    assert result.stop == "exit"
    assert result.values["mem_top_kib"] == 16 * 1024
    model_end = MODEL_BASE + img.sectors(len(blob)) * img.SECTOR
    assert result.values["heap_base"] == -(-model_end // 4096) * 4096
    assert result.screen.startswith(b"Once upon\r\n")  # the screen shows token bytes only
    assert b"Once upon\r\n\r\n" in result.screen  # token bytes on screen, "\n" as CR LF
    assert len(result.token_instructions) == len(SELFTEST_TOKENS)
    assert all(n > 0 for n in result.instructions_between_tokens)
    again = emulator.emulate(selftest_image.path, memory_mib=16)
    assert (again.instructions, again.token_instructions) == (result.instructions, result.token_instructions)


def test_emulator_breakpoint_reads_the_loaded_model(selftest_image, blob):
    emulator = emulator_module()
    total = emulator.emulate(selftest_image.path, memory_mib=16).instructions
    machine = emulator.Emulator(selftest_image.path.read_bytes(), memory_mib=16)
    assert machine.run(until=selftest_image.engine.symbols["selftest"]) == "breakpoint"
    assert machine.registers()["eip"] == selftest_image.engine.symbols["selftest"]
    assert machine.read_memory(MODEL_BASE, len(blob)) == blob
    assert machine.read_memory(MODEL_BASE + len(blob), 3) == bytes(3)  # sector padding
    at_breakpoint = machine.instructions
    assert machine.run() == "exit"
    assert machine.instructions == total > at_breakpoint
    limited = emulator.Emulator(selftest_image.path.read_bytes(), memory_mib=16)
    assert limited.run(max_instructions=at_breakpoint) == "limit"
    assert limited.instructions <= at_breakpoint
    assert limited.run() == "exit" and limited.instructions == total


def test_emulator_reports_a_model_too_large_for_memory(tmp_path):
    require("nasm")
    emulator = emulator_module()
    info = build_image(bytes(1536 * 1024), RunBlock(), tmp_path / "big.img", engine_defines=SELFTEST)
    result = emulator.emulate(info.path, memory_mib=2)
    assert result.status == Status.OUT_OF_MEMORY and result.end_status is None  # refused before the handshake
    assert result.log == "sectorllm: out of memory: needs 2560 KiB, found 2048 KiB\r\n"


def test_emulator_reports_a_disk_error(selftest_image, tmp_path):
    emulator = emulator_module()
    data = selftest_image.path.read_bytes()
    cut = data[:(selftest_image.disk.model_lba + 10) * img.SECTOR]
    result = emulator.emulate(cut, memory_mib=16)
    assert result.status == Status.DISK_ERROR
    assert result.log == "sectorllm: disk error\r\n"  # the emulator's INT 13h fails past the image's end


def test_emulator_bios_keys_and_ticks(tmp_path):
    require("nasm")
    emulator = emulator_module()
    image = tiny_boot_image(tmp_path, """
        mov ah, 0x01
        int 0x16                        ; ZF clear: a key is waiting
        jnz next_key
        mov al, '!'
        jmp send
    next_key:
        xor ah, ah
        int 0x16
    send:
        mov dx, 0x3F8
        out dx, al
        cmp al, '.'
        jne next_key
        mov ecx, 800000
    spin:
        dec ecx
        jnz spin
        xor ah, ah
        int 0x1A                        ; CX:DX = ticks
        mov al, dl
        out 0xF4, al
    """)
    machine = emulator.Emulator(image.read_bytes(), keys=b"ab")
    assert machine.run() == "key"
    assert machine.result().log == "ab"
    machine.type_keys(b".")
    assert machine.run() == "exit"
    result = machine.result()
    assert result.log == "ab."
    assert result.status == 1600000 // emulator.INSTRUCTIONS_PER_TICK


def test_memory_layout_is_the_same_in_every_process():
    """Buffers of equal size (stories260K's att and logits) must land in the same order whatever Python's string
    hashing: `boot` checks an image's layout against a fresh memory_layout in another process."""
    code = ("from sectorllm.boot.image import memory_layout; from sectorllm.config import ModelConfig; "
            "print(memory_layout(352000, ModelConfig(64, 172, 5, 8, 4, 512, 512), 512))")
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in range(6)}
    assert len(outputs) == 1
