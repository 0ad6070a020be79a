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
from sectorllm.boot.image import Status, build_image
from sectorllm.boot.qemu import MachineConfig, boot
from sectorllm.config import ModelConfig
from sectorllm.engines.fixed import FixedEngine, FixedSampler, FixedSamplerConfig
from sectorllm.errors import BootError
from sectorllm.generate import Generation, GenerationResult
from sectorllm.packed import PackedModel, Section, read_sections
from sectorllm.sampling import SamplerConfig

from .conftest import emulator_module, make_checkpoint, require, run_cli

TOKENS = 128  # generated tokens per case at least (fewer only when the model ends its story)
CODE_BUDGET = 2900  # the boot sector's code and the engine together
INSTRUCTIONS_BUDGET = 1_448_226  # per token, before the boot sector and the engine learned to boot anywhere
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
    return max(2, -(-image.memory.memory_end // (1 << 20)))


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


@pytest.mark.parametrize("sampler", [
    SamplerConfig(temperature=1.0, topp=1.0, minp=0.5, seed=21),  # a key or two, in index order
    SamplerConfig(temperature=1.0, topp=1.0, minp=0.3, topk=2, seed=22),  # sorting two or three keys
    SamplerConfig(temperature=3.0, topp=0.999, topk=1, seed=23),  # top-k cuts at the first key
    SamplerConfig(temperature=5.0, topp=0.999, seed=24),  # nearly every key kept: the walk goes deep
], ids=["minp_only", "topk2_minp", "topk1", "flat_topp"])
def test_sampler_edges_under_unicorn(stories, sampler, tmp_path):
    """The sampler's keys, sort and cut at their extremes draw the fixed engine's tokens."""
    case = make_case(tmp_path, stories, "Tom", sampler)
    assert_same(emulate(case.image), case.want)


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
    assert_same(session.run_image(case.image, timeout=120, machine=MachineConfig(cpu="486")).result, case.want)


def test_kvm_runs_the_mode_switches_through_generation(stories, tmp_path):
    """KVM runs the guest on the CPU itself: the switches to real mode and back for each byte on screen, with the
    32-bit stack the BIOS gets there, as a PC would. A short run."""
    require("qemu-system-i386")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no usable /dev/kvm")
    blob, packed = stories
    image = tmp_path / "kvm.img"
    build_image(blob, session.run_block(packed, "Tom", 12, SamplerConfig(temperature=1.0, seed=4)), image)
    booted = boot(image, machine=MachineConfig(accel="kvm"), timeout=180,
                  memory_mib=session.read_image(image).memory_mib)
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


def stopped_at_generate(stories, tmp_path: Path, steps: int):
    """A stories260K image greedy from BOS in a 2 MiB emulated PC, stopped where generation starts; and its info."""
    blob, packed = stories
    image = tmp_path / "boot.img"
    info = build_image(blob, session.run_block(packed, "", steps, GREEDY), image)
    machine = emulator_module().Emulator(image.read_bytes(), memory_mib=2)
    assert machine.run(until=info.engine.symbols["generate"]) == "breakpoint"
    return machine, info


def test_engine_takes_its_memory_layout_from_the_run_block(stories, tmp_path):
    """The engine's buffers, KV cache geometry and kernels are where image.py's memory_layout put them."""
    machine, info = stopped_at_generate(stories, tmp_path, 40)
    symbols, packed = info.engine.symbols, stories[1]

    def var(name: str) -> int:
        return var_at(machine, symbols[name])

    layout = info.memory
    assert [var(f"{name}_buf") for name in img.BUFFER_NAMES] == list(layout.buffers)
    assert [var(name) for name in ("exp_table", "kv_base", "kv_block", "off_vt", "kv_stride", "value_row",
                                   "layer_bytes")] == list(layout.fields[len(img.BUFFER_NAMES):])
    assert layout.exp_table == img.MODEL_BASE + read_sections(stories[0])[1][Section.EXP_TABLE].offset
    kernel_bytes = 16 * layout.kernel_macs + 1
    assert var("kernel8_end") == layout.buffers[-1] + kernel_bytes - 1
    assert var("kernel16_end") == layout.buffers[-1] + 2 * kernel_bytes - 1
    assert layout.kernel_macs == max(packed.config.dim, packed.config.hidden_dim, 40)
    assert layout.memory_end <= 2 << 20  # stories260K runs in 2 MiB


def test_loader_refuses_a_machine_too_small_for_the_run(tmp_path, tok512):
    """A long context's KV cache does not fit 2 MiB beside the model: the loader says so, with both figures,
    before loading the model, and the engine never runs."""
    emulator = emulator_module()
    require("nasm")
    path = make_checkpoint(tmp_path, ModelConfig(64, 100, 2, 4, 4, 512, 2048), seed=5)
    blob, packed = session.packed_model(path, tok512)
    image = tmp_path / "small.img"
    info = build_image(blob, session.run_block(packed, "", 0, GREEDY), image)
    needs = info.memory.memory_end
    assert needs > 2 << 20  # 2 layers x 4 kv heads x 2048 positions x 72 bytes of cache
    result = emulator.emulate(image, memory_mib=2)
    assert result.status == Status.OUT_OF_MEMORY and not result.tokens
    assert result.log == f"sectorllm: out of memory: needs {needs >> 10} KiB, found 2048 KiB\r\n"


def test_breakpoint_on_code_that_already_ran(stories, tmp_path):
    """real_call ran while the loader read the model; a breakpoint set on it afterwards must still stop there (the
    first token's bytes go to the screen through it)."""
    machine, info = stopped_at_generate(stories, tmp_path, 20)
    symbols = info.engine.symbols
    assert machine.run(until=symbols["real_call.pushed"]) == "breakpoint"
    assert machine.registers()["eip"] == symbols["real_call.pushed"]


def var_at(machine, address: int) -> int:
    return struct.unpack("<I", machine.read_memory(address, 4))[0]


def test_make_image_sizes_and_run_block(stories260k, tok512, tmp_path):
    require("nasm")
    info = session.make_image(stories260k, tok512, tmp_path / "boot.img", prompt="Hi", steps=50, temperature=0.8,
                              topp=0.9, topk=5, minp=0.02, seed=11)
    assert info.path.stat().st_size == info.image_bytes
    assert 0 < info.boot_code_bytes <= img.PARTITION_TABLE - 62 and info.engine_bytes == info.engine.size
    image = session.read_image(info.path)
    run = image.run
    assert (run.steps, run.inv_temperature_q16, run.topp_q16, run.topk, run.minp_q16, run.seed) == \
           (50, 81920, 58982, 5, 1311, 11)
    assert run.prompt_tokens[0] == 1 and len(run.prompt_tokens) > 1
    assert image.config.dim == 64 and image.memory == info.memory and not image.floppy


def test_make_image_refuses_a_model_past_addressable_memory(stories260k, tok512, tmp_path, monkeypatch):
    require("nasm")
    monkeypatch.setattr(session, "ADDRESSABLE_TOP", (1 << 20) + 100_000)  # below the end of the model itself
    with pytest.raises(BootError, match=r"bytes more than the boot engine can address"):
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


def test_code_fits_the_budget(stories, tmp_path):
    blob, packed = stories
    info = build_image(blob, session.run_block(packed, "", 8, GREEDY), tmp_path / "boot.img")
    size = info.boot_code_bytes + info.engine_bytes
    assert size <= CODE_BUDGET, f"the code is {size} bytes, {size - CODE_BUDGET} over the {CODE_BUDGET}-byte budget"


def test_instructions_per_token_fit_the_budget(stories260k):
    emulator_module()
    require("nasm")
    bench = session.bench_boot(stories260k)
    assert bench.tokens == 256 and bench.instructions_per_token <= INSTRUCTIONS_BUDGET
