"""The boot engine against its golden model: the token ids a boot image generates (under unicorn and under QEMU)
are the fixed-point engine's, every one; plus the image builder, the CLI and the engine's size and speed budget.
Real nasm, QEMU and unicorn; in CI (CI=true) a missing tool fails, elsewhere it skips."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest

from sectorllm.boot import image as img, session
from sectorllm.boot.image import ENGINE_SOURCE, Status, assemble, build_image
from sectorllm.boot.qemu import boot
from sectorllm.config import ModelConfig
from sectorllm.engines.fixed import FixedEngine, FixedSampler, FixedSamplerConfig
from sectorllm.errors import BootError
from sectorllm.generate import Generation, GenerationResult
from sectorllm.packed import PackedModel
from sectorllm.sampling import SamplerConfig

from .conftest import emulator_module, make_checkpoint, require, run_cli

TOKENS = 128  # generated tokens per case at least (fewer only when the model ends its story)
CODE_BUDGET = 2048
INSTRUCTIONS_BUDGET = 1_500_000
GREEDY = SamplerConfig(temperature=0.0)
PROMPTS = ("Once upon a time", "The little dog was sad because", "Tom and Lily went to the park. They")
SHAPES = {  # random weights: kv heads = heads with a separate classifier; odd-ish dims with 3 query heads per kv head
    "kv_equal_separate_cls": ModelConfig(64, 100, 2, 4, 4, 512, 160, shared_classifier=False),
    "dim48_gqa3": ModelConfig(48, 128, 3, 6, 2, 512, 160),
}


@dataclass(frozen=True)
class Case:
    """A boot image and what the fixed-point engine generates for the same model and settings."""

    image: Path
    want: GenerationResult


def golden(packed: PackedModel, prompt: str, steps: int, sampler: SamplerConfig) -> GenerationResult:
    config = FixedSamplerConfig.from_sampler_config(sampler)
    return Generation(FixedEngine(packed), packed.tokenizer, prompt, steps, FixedSampler(config, packed)).result


def make_case(directory: Path, model: tuple[bytes, PackedModel], prompt: str, sampler: SamplerConfig) -> Case:
    blob, packed = model
    steps = len(packed.tokenizer.encode(prompt)) - 1 + TOKENS
    image = directory / "boot.img"
    build_image(blob, session.run_block(packed, prompt, steps, sampler), image)
    return Case(image, golden(packed, prompt, steps, sampler))


def tight_mib(image: session.BootImage) -> int:
    """Just the RAM the engine needs: a stray write past it faults in unicorn instead of passing unseen."""
    return -(-img.memory_end(image.model_bytes, image.config) // (1 << 20))


def emulate(image: Path) -> GenerationResult:
    """The image's generation under unicorn, decoded as session.run_image decodes QEMU's."""
    emulator = emulator_module()
    info = session.read_image(image)
    result = emulator.emulate(image, memory_mib=tight_mib(info))
    assert result.status == Status.OK, result.log
    return session.result_of(info, list(result.tokens), [float(n) for n in result.token_instructions])


def assert_same(got: GenerationResult, want: GenerationResult) -> None:
    assert got.prompt_tokens == want.prompt_tokens
    assert got.generated_tokens == want.generated_tokens
    assert got.text == want.text
    assert got.stop_reason == want.stop_reason
    assert len(want.generated_tokens) >= TOKENS or want.stop_reason in ("bos", "eos")


# ----------------------------------------------------------------------------------------------------- models


@pytest.fixture(scope="session")
def stories(stories260k, tok512) -> tuple[bytes, PackedModel]:
    require("nasm")
    return session.packed_model(stories260k, tok512)


@pytest.fixture(scope="session", params=sorted(SHAPES))
def shape(request, tmp_path_factory, tok512) -> tuple[bytes, PackedModel]:
    require("nasm")
    path = make_checkpoint(tmp_path_factory.mktemp(request.param), SHAPES[request.param], seed=3)
    return session.packed_model(path, tok512)


@pytest.fixture(scope="session")
def shape_gqa(tmp_path_factory, tok512) -> tuple[bytes, PackedModel]:
    require("nasm")
    return session.packed_model(make_checkpoint(tmp_path_factory.mktemp("gqa"), SHAPES["dim48_gqa3"], seed=3), tok512)


STORY_CASES = {
    "greedy_bos": ("", GREEDY),
    **{f"greedy_prompt{i}": (prompt, GREEDY) for i, prompt in enumerate(PROMPTS)},
    "topp_seed1": ("", SamplerConfig(temperature=1.0, topp=0.9, seed=1)),
    "topp_seed2": ("", SamplerConfig(temperature=1.0, topp=0.9, seed=2)),
    "topk40_seed3": ("Lily", SamplerConfig(temperature=1.0, topp=1.0, topk=40, seed=3)),
}


@pytest.fixture(scope="session", params=sorted(STORY_CASES))
def story_case(request, tmp_path_factory, stories) -> Case:
    prompt, sampler = STORY_CASES[request.param]
    return make_case(tmp_path_factory.mktemp(request.param), stories, prompt, sampler)


# ---------------------------------------------------------------------------------------------- bit-exactness


def test_stories260k_under_unicorn(story_case):
    assert_same(emulate(story_case.image), story_case.want)


def test_stories260k_under_qemu(story_case):
    require("qemu-system-i386")
    assert_same(session.run_image(story_case.image, timeout=120).result, story_case.want)


@pytest.mark.parametrize("sampler", [GREEDY, SamplerConfig(temperature=0.8, topp=0.95, topk=20, minp=0.01, seed=7)],
                         ids=["greedy", "sampled"])
def test_random_shapes_under_unicorn(shape, sampler, tmp_path):
    case = make_case(tmp_path, shape, "Hi", sampler)
    assert_same(emulate(case.image), case.want)


def test_random_shape_under_qemu(shape, tmp_path):
    require("qemu-system-i386")
    case = make_case(tmp_path, shape, "", GREEDY)
    assert_same(session.run_image(case.image, timeout=120).result, case.want)


def test_qemu_486_greedy_from_bos(stories, tmp_path):
    require("qemu-system-i386")
    case = make_case(tmp_path, stories, "", GREEDY)
    assert_same(session.run_image(case.image, timeout=120, cpu="486").result, case.want)


def test_kvm_runs_the_mode_switches_through_generation(stories, tmp_path):
    """KVM runs the guest on the CPU itself: the switches to real mode and back for each byte on screen, with the
    32-bit stack the BIOS gets there, as a PC would. A short run."""
    require("qemu-system-i386")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no usable /dev/kvm")
    blob, packed = stories
    image = tmp_path / "kvm.img"
    build_image(blob, session.run_block(packed, "Tom", 12, SamplerConfig(temperature=1.0, seed=4)), image)
    booted = boot(image, accel="kvm", timeout=180, memory_mib=session.read_image(image).memory_mib)
    got = session.result_of(session.read_image(image), list(booted.tokens), [0.0] * len(booted.tokens))
    want = golden(packed, "Tom", 12, SamplerConfig(temperature=1.0, seed=4))
    assert (got.generated_tokens, got.text) == (want.generated_tokens, want.text)


def test_qemu_tells_the_story_on_screen(stories, tmp_path):
    """Clean text from BOS: no leading space, newlines as newlines, no <0x0A> pieces; and the screen shows it."""
    require("qemu-system-i386")
    case = make_case(tmp_path, stories, "", GREEDY)
    streamed: list[bytes] = []
    shot = tmp_path / "screen.png"
    run = session.run_image(case.image, timeout=120, screenshot=shot, on_token=lambda t: streamed.append(t.data))
    text = run.result.text
    assert text == case.want.text and b"".join(streamed).decode() == text
    assert text.startswith("Once upon a time") and "\n" in text and "<0x" not in text and "\r" not in text
    assert run.screenshot == shot and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", shot.read_bytes()[16:24])
    assert (width, height) == (720, 400)  # VGA text mode: the story is on an 80x25 text screen


def test_prompt_longer_than_the_steps_is_echoed_only(stories, tmp_path):
    blob, packed = stories
    prompt, steps = PROMPTS[2], 3
    image = tmp_path / "short.img"
    build_image(blob, session.run_block(packed, prompt, steps, GREEDY), image)
    got = emulate(image)
    want = golden(packed, prompt, steps, GREEDY)
    assert got == GenerationResult(want.prompt_tokens, [], want.text, "steps", 0.0, got.seed)


@pytest.mark.parametrize("seed, stop", [(15, "eos"), (10, "bos")])
def test_sampled_eos_or_bos_ends_the_run_with_no_bytes(shape_gqa, seed, stop, tmp_path):
    """A sampled EOS or BOS is reported as a record with no bytes, ends the run, and is not a generated token."""
    blob, packed = shape_gqa
    sampler = SamplerConfig(temperature=1.0, topp=1.0, seed=seed)
    want = golden(packed, "", 0, sampler)
    assert want.stop_reason == stop and len(want.generated_tokens) < 60  # found for this checkpoint and seed
    image = tmp_path / "stop.img"
    build_image(blob, session.run_block(packed, "", 0, sampler), image)
    emulator = emulator_module()
    result = emulator.emulate(image, memory_mib=tight_mib(session.read_image(image)))
    assert result.tokens[-1].id == (2 if stop == "eos" else 1) and result.tokens[-1].data == b""
    assert_same(emulate(image), want)


# ------------------------------------------------------------------------------------- image and memory layout


def test_engine_memory_layout_matches_session(stories, tmp_path):
    """session's memory arithmetic (for the runners' -m and the refusal) is the engine's own placement."""
    emulator = emulator_module()
    case = make_case(tmp_path, stories, "", GREEDY)
    info = session.read_image(case.image)
    machine = emulator.Emulator(case.image.read_bytes(), memory_mib=info.memory_mib)
    symbols = assemble(ENGINE_SOURCE, tmp_path / "build" / "engine.bin").symbols
    assert (symbols["N_BUFFERS"], symbols["SLOT_BYTES"]) == (img.BUFFER_SLOTS, img.SLOT_BYTES)
    assert symbols["HEAP_ALIGN"] == img.HEAP_ALIGN
    assert machine.run(until=symbols["generate"]) == "breakpoint"

    def var(name: str) -> int:
        return var_at(machine, symbols[name])

    config = stories[1].config
    kv_end = var("kv_base") + config.n_layers * var("layer_bytes")
    assert var("kv_block") * config.n_kv_heads * config.n_layers == img.kv_cache_bytes(config)
    assert kv_end == img.memory_end(info.model_bytes, config)
    assert var("kernel_buf") < var("kernel8_end") < var("kernel16_end") < var("kernel_buf") + img.SLOT_BYTES
    _, layout = img.unpack_run_block(case.image.read_bytes()[img.SECTOR:2 * img.SECTOR])
    assert layout.memory_end == kv_end  # what the boot sector checks the machine's memory against


def test_boot_sector_refuses_a_machine_too_small_for_the_buffers(stories, tmp_path):
    """2 MiB holds the model but not the engine's buffers and KV cache: the boot sector says so before loading it,
    and the engine never runs."""
    emulator = emulator_module()
    blob, packed = stories
    image = tmp_path / "small.img"
    build_image(blob, session.run_block(packed, "", 8, GREEDY), image)
    assert img.MODEL_BASE + len(blob) < 2 << 20 < session.read_image(image).memory_mib << 20
    result = emulator.emulate(image, memory_mib=2)
    assert result.status == Status.MODEL_TOO_LARGE and result.end_status is None and not result.tokens
    assert result.log == "sectorllm: out of memory\n"


def test_breakpoint_on_code_that_already_ran(stories, tmp_path):
    """serial_put prints the start-up banner before generation; a breakpoint set later must still stop there."""
    emulator = emulator_module()
    case = make_case(tmp_path, stories, "", GREEDY)
    machine = emulator.Emulator(case.image.read_bytes(), memory_mib=session.read_image(case.image).memory_mib)
    symbols = assemble(ENGINE_SOURCE, tmp_path / "build" / "engine.bin").symbols
    assert machine.run(until=symbols["generate"]) == "breakpoint"
    assert machine.run(until=symbols["serial_put"]) == "breakpoint"
    assert machine.registers()["eip"] == symbols["serial_put"]


def var_at(machine, address: int) -> int:
    return struct.unpack("<I", machine.read_memory(address, 4))[0]


def test_make_image_sizes_and_run_block(stories260k, tok512, tmp_path):
    require("nasm")
    info = session.make_image(stories260k, tok512, tmp_path / "boot.img", prompt="Hi", steps=50, temperature=0.8,
                              topp=0.9, topk=5, minp=0.02, seed=11)
    assert info.path.stat().st_size == info.image_bytes
    assert 0 < info.boot_code_bytes <= 510 and info.engine_bytes == info.engine.size
    image = session.read_image(info.path)
    run = image.run
    assert (run.steps, run.inv_temperature_q16, run.topp_q16, run.topk, run.minp_q16, run.seed) == \
           (50, 81920, 58982, 5, 1311, 11)
    assert run.prompt_tokens[0] == 1 and len(run.prompt_tokens) > 1
    assert image.config.dim == 64 and image.memory_mib >= 12


def test_make_image_refuses_a_model_past_addressable_memory(stories260k, tok512, tmp_path, monkeypatch):
    require("nasm")
    monkeypatch.setattr(session, "ADDRESSABLE_TOP", 8 << 20)
    with pytest.raises(BootError, match=r"bytes more than the boot engine can address"):
        session.make_image(stories260k, tok512, tmp_path / "boot.img")
    assert not (tmp_path / "boot.img").exists()


def test_make_image_refuses_a_model_past_the_kernels(stories260k, tok512, tmp_path, monkeypatch):
    require("nasm")
    monkeypatch.setattr(session, "KERNEL_MACS", 700)  # stories260K needs 64 + 172 + 512 = 748 multiply-adds
    with pytest.raises(BootError, match=r"dim \+ hidden_dim \+ seq_len is 748; .* at most 700"):
        session.make_image(stories260k, tok512, tmp_path / "boot.img")
    assert not (tmp_path / "boot.img").exists()


def test_read_image_refuses_other_files(tmp_path):
    other = tmp_path / "other.img"
    other.write_bytes(bytes(2048))
    with pytest.raises(BootError, match="run block"):
        session.read_image(other)


# ------------------------------------------------------------------------------------------------------- CLI


def test_cli_image_then_boot_json(stories260k, tok512, tmp_path):
    require("nasm")
    require("qemu-system-i386")
    image = tmp_path / "boot.img"
    built = run_cli("image", str(stories260k), "-z", str(tok512), "-o", str(image), "-i", "Once upon a time",
                    "-n", "40", "-t", "0")
    assert built.returncode == 0, built.stderr
    assert b"engine" in built.stdout and b"boot sector" in built.stdout
    booted = run_cli("boot", str(image), "--json")
    assert booted.returncode == 0, booted.stderr
    result = json.loads(booted.stdout)
    fixed = run_cli("run", str(stories260k), "-z", str(tok512), "--engine", "fixed", "-i", "Once upon a time",
                    "-n", "40", "-t", "0", "--json")
    want = json.loads(fixed.stdout)
    assert result["generated_tokens"] == want["generated_tokens"]
    assert result["text"] + "\n" == want["text"]


def test_cli_run_engine_boot_streams_what_fixed_prints(stories260k, tok512):
    require("nasm")
    require("qemu-system-i386")
    args = [str(stories260k), "-z", str(tok512), "-i", "Lily", "-n", "30", "-t", "1", "-s", "5", "-k", "10"]
    boot_run = run_cli("run", *args, "--engine", "boot")
    fixed_run = run_cli("run", *args, "--engine", "fixed")
    assert boot_run.returncode == 0, boot_run.stderr
    assert boot_run.stdout == fixed_run.stdout
    assert b"achieved tok/s" in boot_run.stderr


def test_cli_boot_errors_are_one_line(tmp_path):
    missing = run_cli("boot", str(tmp_path / "nothing.img"))
    assert missing.returncode == 2
    assert missing.stderr.decode().count("\n") == 1 and b"sectorllm: error:" in missing.stderr


# ----------------------------------------------------------------------------------------------- the budget


def test_bench_boot_reports_instructions_and_code_bytes(models_dir):
    emulator_module()
    require("nasm")
    result = run_cli("bench", "--boot", "--json", env={"SECTORLLM_MODELS": str(models_dir)})
    assert result.returncode == 0, result.stderr
    bench = json.loads(result.stdout)
    assert bench["tokens"] == 256 and bench["model"] == "stories260K"
    assert 500_000 < bench["instructions_per_token"] < 3_000_000 and 1000 < bench["code_bytes"] < 32768


def test_engine_code_fits_the_budget(tmp_path):
    require("nasm")
    size = assemble(ENGINE_SOURCE, tmp_path / "engine.bin").size
    assert size <= CODE_BUDGET, f"the engine is {size} bytes, {size - CODE_BUDGET} over the {CODE_BUDGET}-byte budget"


def test_instructions_per_token_fit_the_budget(stories260k):
    emulator_module()
    require("nasm")
    bench = session.bench_boot(stories260k)
    assert bench.tokens == 256 and bench.instructions_per_token <= INSTRUCTIONS_BUDGET
