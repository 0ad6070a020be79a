"""The `sectorllm` command: argparse over the API; the only code that prints, exits or reads argv."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from . import __version__
from .errors import SectorLLMError, UsageError

DEFAULT_MODEL = "stories260K"
# Measured on a fresh install of the float engine on 2 cores shared with other work (load 5): 40 s to the first
# token; under a second or two once compiled.
COMPILE_NOTE = "loading; the first run after installing compiles the engines (numba, once), which can take a minute"


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake in one line (exit 2), pointing at --help."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


@contextmanager
def _progress_if_slow(message: str, after_seconds: float = 1.5) -> Iterator[None]:
    """Say what is happening when a step takes long (the first run compiles the engines): on a terminal, a line
    with the elapsed time that is cleared when the step ends, so what follows starts on a clean line; else one note."""
    done = threading.Event()

    def show() -> None:
        if done.wait(after_seconds):
            return
        if not sys.stderr.isatty():
            _note(message)
            return
        from tqdm import tqdm

        with tqdm(desc=message, bar_format="{desc}: {elapsed}", file=sys.stderr, leave=False) as bar:
            while not done.wait(0.5):
                bar.refresh()

    thread = threading.Thread(target=show, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _run_c_seed(text: str) -> int:
    from .sampling import run_c_seed

    try:
        return run_c_seed(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _number(convert: type, low: float | None = None, high: float | None = None) -> Callable[[str], float]:
    """An argparse type: a finite `convert` of the text, at least `low` and at most `high`; argparse turns the
    ArgumentTypeError into one usage line naming the flag. Sampling settings get their ranges from
    SamplerConfig.validate, before any work."""

    def parse(text: str) -> float:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if convert is int else 'a number'}")
        if convert is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        if low is not None and value < low:
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {low} or more")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {high} or less")
        return value

    return parse


def _run_c_overrides(args: argparse.Namespace) -> None:
    """run.c's own corrections of out-of-range -t, -p and -n, each with a note saying what it changed."""
    if args.temperature < 0:
        _note(f"-t {args.temperature:g} is negative: using 0 (greedy), as run.c does")
        args.temperature = 0.0
    if not 0 <= args.topp <= 1:
        _note(f"-p {args.topp:g} is outside [0, 1]: using 0.9, as run.c does")
        args.topp = 0.9
    if args.steps < 0:
        _note(f"-n {args.steps} is negative: using 0 (the whole context), as run.c does")
        args.steps = 0


def cmd_run(args: argparse.Namespace) -> int:
    from .api import load
    from .sampling import SamplerConfig

    _run_c_overrides(args)
    SamplerConfig(args.temperature, args.topp, args.topk, args.minp, args.seed).validate()  # before the slow load
    chat = args.mode == "chat"
    if chat and (args.json or args.engine == "boot"):
        raise UsageError(f"-m chat reads turns from stdin: it runs on the float or fixed engine, without --json")
    if args.system_prompt is not None and not chat:
        raise UsageError("-y is the chat mode's system prompt: add -m chat")
    with _progress_if_slow(COMPILE_NOTE):
        if args.engine == "boot":
            from .boot.session import load_boot

            model = load_boot(args.checkpoint, args.tokenizer, scheme=args.scheme, timeout=args.timeout,
                              machine=_machine(args))
        else:
            model = load(args.checkpoint, args.tokenizer, engine=args.engine, scheme=args.scheme,
                         threads=args.threads)
    seq_len = model.config.seq_len
    if args.steps > seq_len:
        _note(f"-n {args.steps} is beyond the model's {seq_len}-token context: generating up to {seq_len}")
    settings = dict(steps=args.steps, temperature=args.temperature, topp=args.topp, topk=args.topk,
                    minp=args.minp, seed=args.seed)
    out = sys.stdout.buffer
    if chat:
        for text in model.chat(_read_stdin_line, None if args.prompt is None else args.prompt,
                               args.system_prompt, **settings):
            out.write(text)
            out.flush()
        return 0
    generation = model.generate(args.prompt or "", **settings)
    for token in generation:
        if not args.json:
            out.write(token.piece)
            out.flush()
    result = generation.result
    if args.json:
        payload = {**result.as_dict(), "text": result.text + "\n"}  # what the plain run prints on stdout, as run.c
        print(json.dumps(payload, ensure_ascii=False))
    else:
        out.write(b"\n")  # before any note: a note on a terminal starts on a line of its own
        out.flush()
    if args.verbose and not args.seed and args.temperature > 0:
        print(f"seed: {result.seed} (taken from the clock; pass -s {result.seed} to repeat this run)",
              file=sys.stderr)
    if result.stop_reason == "context":
        _note(f"stopped at the end of the model's {seq_len}-token context")
    if not args.json:
        print(f"achieved tok/s: {result.tok_per_s:.1f}", file=sys.stderr)
    return 0


def _read_stdin_line() -> str | None:
    """One line of the chat's input without its newline, as run.c's fgets; None once stdin ends."""
    sys.stdout.flush()
    line = sys.stdin.buffer.readline()
    if not line:
        return None
    return line.removesuffix(b"\n").decode("utf-8", errors="replace")


def cmd_info(args: argparse.Namespace) -> int:
    from .describe import describe
    from .hub import resolve_model

    path = Path(args.file)
    rows = describe(path if path.is_file() else resolve_model(args.file))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench_model

    if args.boot:
        return cmd_bench_boot(args)

    from tqdm import tqdm

    results = []
    runs = [(model, engine) for model in args.models for engine in args.engine or ["float"]]
    with tqdm(runs, desc="bench", unit="run", file=sys.stderr, disable=args.json or None, leave=False) as bar:
        for model, engine in bar:
            bar.set_postfix_str(f"{model} {engine}")
            result = bench_model(model, engine, decode_tokens=args.decode, prefill_tokens=args.prefill,
                                 threads=args.threads)
            results.append(result)
            if not args.json:
                bar.write(f"{result.model:<22} {result.engine:<6} decode {result.decode_tok_per_s:>10,.1f} tok/s"
                          f" ({result.decode_tokens} tokens)   prefill {result.prefill_tok_per_s:>10,.1f} tok/s"
                          f" ({result.prefill_tokens}-token prompt)", file=sys.stdout)
    if args.json:
        print(json.dumps([r.as_dict() for r in results]))
    return 0


def cmd_bench_boot(args: argparse.Namespace) -> int:
    from .boot.session import bench_boot

    with _progress_if_slow("bench --boot: building the image and emulating its tokens under unicorn"):
        result = bench_boot()
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print(f"{result.model:<22} boot   {result.instructions_per_token:>12,.0f} instructions/token ({result.tokens} "
              f"tokens greedy from BOS, unicorn)   code: boot sector {result.boot_code_bytes} + engine "
              f"{result.code_bytes:,} = {result.boot_code_bytes + result.code_bytes:,} bytes; UEFI loader "
              f"{result.uefi_loader_bytes:,} bytes")
    return 0


def cmd_image(args: argparse.Namespace) -> int:
    from .atomic import check_output
    from .boot.session import make_image, read_image

    _run_c_overrides(args)
    check_output(args.output, [p for p in (args.checkpoint, args.tokenizer) if p])  # atomic.py's rules, first
    info = make_image(args.checkpoint, args.tokenizer, args.output, prompt=args.prompt or "", steps=args.steps,
                      temperature=args.temperature, topp=args.topp, topk=args.topk, minp=args.minp, seed=args.seed,
                      scheme=args.scheme, floppy=args.floppy, listing_dir=args.listing,
                      firmware=args.firmware or ("bios" if args.floppy else "both"))
    medium = {"bios": "BIOS", "uefi": "UEFI", "both": "BIOS and UEFI"}[info.firmware]
    loader = f", UEFI loader {info.loader_code_bytes:,} bytes" if info.loader_code_bytes else ""
    boot = f"boot sector {info.boot_code_bytes} bytes of code, " if info.firmware != "uefi" else ""
    print(f"wrote {info.path}: {'1.44 MB floppy' if info.floppy else 'disk'} image for {medium}, "
          f"{info.image_bytes:,} bytes ({boot}engine {info.engine_bytes:,} bytes{loader}, model "
          f"{info.disk.model_bytes:,} bytes); the run needs "
          f"{info.memory.memory_end // 1024:,} KiB of RAM and a 386 or later")
    if args.temperature > 0 and not args.seed:
        print(f"seed: {read_image(info.path).run.seed} (taken from the clock)")
    return 0


def cmd_boot(args: argparse.Namespace) -> int:
    from .atomic import check_output
    from .boot.session import run_image

    out = sys.stdout.buffer

    def show(token) -> None:
        if not args.json:
            out.write(token.data)
            out.flush()

    screenshot = Path(args.screenshot) if args.screenshot else None
    if screenshot is not None:
        check_output(screenshot, [args.image])  # atomic.py's rules, before the boot
    run = run_image(args.image, timeout=args.timeout, machine=_machine(args), screenshot=screenshot, on_token=show)
    result = run.result
    if args.json:
        print(json.dumps({**result.as_dict(), "seconds": run.seconds,
                          "screenshot": str(run.screenshot) if run.screenshot else None}, ensure_ascii=False))
    else:
        out.write(b"\n")
        out.flush()
        print(f"achieved tok/s: {result.tok_per_s:.1f} (QEMU, {run.seconds:.1f} s with the boot)", file=sys.stderr)
        if run.screenshot:
            print(f"screenshot: {run.screenshot}", file=sys.stderr)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from .api import checkpoint_tokenizer
    from .atomic import check_output
    from .checkpoint import load_checkpoint
    from .hub import resolve_model
    from .packed import write_packed
    from .quantize import quantize

    path = resolve_model(args.checkpoint)
    check_output(args.output, [path, *([args.tokenizer] if args.tokenizer else [])])  # before the work
    checkpoint = load_checkpoint(path)
    packed, report = quantize(checkpoint, checkpoint_tokenizer(checkpoint, path, args.tokenizer), args.scheme)
    write_packed(args.output, packed)
    print(report.format_table())
    print(f"wrote {args.output}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .api import checkpoint_tokenizer
    from .atomic import check_output
    from .checkpoint import load_checkpoint
    from .evaluate import BUILTIN_PROMPTS, ablate, ablations, evaluate, plot_reports, require_matplotlib
    from .hub import resolve_model
    from .packed import DEFAULT_SCHEME

    prompts = BUILTIN_PROMPTS if args.prompts is None else _read_prompts(args.prompts)
    path = resolve_model(args.checkpoint)
    if args.plot and args.ablate:
        raise UsageError("--plot draws the evaluation of each scheme and --ablate prints a table instead: drop one")
    if args.plot:  # before the minutes of work, not after them
        require_matplotlib()
        check_output(args.plot, [path, *(p for p in (args.tokenizer, args.prompts) if p)])
    checkpoint = load_checkpoint(path)
    tokenizer = checkpoint_tokenizer(checkpoint, path, args.tokenizer)
    if args.ablate:
        scheme = (args.scheme or [DEFAULT_SCHEME])[0]
        with tqdm(total=len(ablations()), desc=f"ablate {scheme}", unit="row", disable=args.json or None,
                  file=sys.stderr) as bar:
            rows = ablate(checkpoint, tokenizer, scheme, prompts, args.positions, progress=bar.update)
        if args.json:
            print(json.dumps([r.as_dict() for r in rows]))
            return 0
        print(f"{'steps':<34}{'top-1 agree':>12}{'mean KL':>10}{'greedy BOS':>12}{'greedy mean':>13}")
        for r in rows:
            print(f"{r.label:<34}{r.top1_agreement:>12.2%}{r.mean_kl:>10.5f}{r.greedy_prefix_bos:>12}"
                  f"{r.greedy_prefix_mean:>13.1f}")
        return 0
    reports = []
    for scheme in args.scheme or [DEFAULT_SCHEME]:
        with tqdm(total=len(prompts), desc=f"eval {scheme}", unit="prompt", disable=args.json or None,
                  file=sys.stderr) as bar:
            reports.append(evaluate(checkpoint, tokenizer, scheme, prompts, args.positions, progress=bar.update))
    if args.plot:
        plot_reports(reports, args.plot)
    if args.json:
        payloads = [r.as_dict() for r in reports]
        print(json.dumps(payloads[0] if len(payloads) == 1 else payloads))
        return 0
    print(f"{'scheme':<11}{'top-1 agree':>12}{'mean KL':>10}{'greedy BOS':>12}{'greedy mean':>13}"
          f"{'ppl float':>11}{'ppl fixed':>11}{'packed bytes':>14}{'of float':>10}{'calib top-1':>13}{'calib KL':>10}")
    for r in reports:
        print(f"{r.scheme:<11}{r.top1_agreement:>12.2%}{r.mean_kl:>10.5f}"
              f"{r.greedy_prefix_bos:>8}/{r.greedy_tokens_bos:<3}"
              f"{r.greedy_prefix_mean:>13.1f}{r.ppl_float:>11.3f}{r.ppl_fixed:>11.3f}{r.packed_bytes:>14,}"
              f"{r.packed_bytes / r.float_bytes:>10.1%}{r.calibration_top1_agreement:>13.2%}"
              f"{r.calibration_mean_kl:>10.5f}")
    if args.plot:
        print(f"plot: {args.plot}")
    return 0


def _read_prompts(path: str) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read prompts from {path}: {e}: give a UTF-8 text file, one prompt per line") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise UsageError(f"{path} holds no prompts: write one prompt per line")
    return prompts


def cmd_download(args: argparse.Namespace) -> int:
    from .hub import download

    for path in download(args.name):
        print(path)
    return 0


def _add_generation_flags(parser: argparse.ArgumentParser, schemes: tuple[str, ...], default_scheme: str) -> None:
    """run.c's flags (-z -t -p -s -n -i), our -k and --minp, and the quantization scheme: for run and image."""
    parser.add_argument("-z", "--tokenizer", help="tokenizer .bin (default: the one that matches the model)")
    parser.add_argument("-t", "--temperature", type=_number(float), default=1.0,
                        help="up to 65536; 0 = greedy, and so is anything below 1e-4; negative becomes 0, as in "
                             "run.c (default 1.0)")
    parser.add_argument("-p", "--topp", type=_number(float), default=0.9,
                        help="top-p (nucleus) in [0, 1]; 0 or 1 = off; outside [0, 1] becomes 0.9, as in run.c "
                             "(default 0.9)")
    parser.add_argument("-k", "--topk", type=int, default=0,
                        help="keep only the k likeliest tokens, 0 .. 2147483647 (default 0 = off)")
    parser.add_argument("--minp", type=_number(float), default=0.0,
                        help="drop tokens below minp x the top probability, in [0, 1) (0 = off)")
    parser.add_argument("-s", "--seed", type=_run_c_seed, default=0,
                        help="random seed, read as run.c reads it (a 32-bit int; default 0 = from the clock)")
    parser.add_argument("-n", "--steps", type=int, default=256,
                        help="forward passes, prompt included; 0 or more than the context = the whole context; "
                             "negative becomes 0, as in run.c (default 256)")
    parser.add_argument("-i", "--prompt", help="prompt text (default: start from BOS)")
    parser.add_argument("--scheme", default=default_scheme, choices=schemes,
                        help="quantization scheme when a checkpoint is quantized (fixed and boot engines)")


def _add_machine_flags(parser: argparse.ArgumentParser) -> None:
    """The QEMU machine a boot image runs on: `boot` and `run --engine boot` share these."""
    from .boot.qemu import ACCELS, DRIVES, MACHINES

    group = parser.add_argument_group("the emulated PC (QEMU)")
    group.add_argument("--machine", default="pc", choices=MACHINES, help="QEMU machine type (default pc)")
    group.add_argument("--memory", type=_number(int, 1), metavar="MIB",
                       help="RAM in MiB, 1..3072 (default: what the image needs, at least 128)")
    group.add_argument("--drive", default="ide", choices=DRIVES,
                       help="how the image is attached: IDE disk, floppy (a --floppy image), virtio-blk, or a USB "
                            "stick on an xHCI, UHCI or EHCI controller (default ide)")
    group.add_argument("--accel", default="tcg", choices=ACCELS, help="tcg (default) or kvm")
    group.add_argument("--cpu", help="QEMU CPU model, e.g. 486 (default: QEMU's)")
    group.add_argument("--firmware", default="bios", choices=["bios", "uefi"],
                       help="SeaBIOS (default), or OVMF: UEFI in qemu-system-x86_64 (an image built for uefi or both)")
    group.add_argument("--qemu-arg", action="append", default=[], metavar="ARG",
                       help="one more argument for QEMU, as it is (repeatable)")
    group.add_argument("--timeout", type=_number(float, 0.1, 86400), default=120.0,
                       help="seconds before QEMU is killed, 0.1..86400 (default 120)")


def _machine(args: argparse.Namespace):
    from .boot.qemu import MachineConfig

    machine = MachineConfig(args.machine, args.memory, args.drive, args.cpu, args.accel, tuple(args.qemu_arg),
                            args.firmware)
    machine.validate()
    return machine


def build_parser() -> argparse.ArgumentParser:
    from .packed import DEFAULT_SCHEME, SCHEMES

    parser = _Parser(prog="sectorllm", description="Tiny Llama 2 inference: float engine, integer engine, boot image.")
    parser.add_argument("--version", action="version", version=f"sectorllm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="generate text (llama2.c run's flags)",
                         description="Generate text from a llama2.c checkpoint, streaming it as it comes. "
                                     "Flags are run.c's; -n counts the prompt's tokens too.")
    run.add_argument("checkpoint", nargs="?", default=DEFAULT_MODEL,
                     help=f"checkpoint path or model name (stories260K, stories15M, stories42M, stories110M; "
                          f"default {DEFAULT_MODEL})")
    _add_generation_flags(run, SCHEMES, DEFAULT_SCHEME)
    run.add_argument("-m", "--mode", choices=["generate", "chat"], default="generate",
                     help="generate (default) or chat: run.c's chat mode, Llama 2 [INST] turns read from stdin; "
                          "-i is the first user turn, -y the system prompt")
    run.add_argument("-y", "--system-prompt", help="the system prompt of -m chat (default: asked on stdin)")
    run.add_argument("--engine", choices=["float", "fixed", "boot"],
                     help="float (default for checkpoints) or fixed: the integer engine, quantizing a checkpoint in "
                          "memory (the only engine for a packed .sllm file); boot: the fixed engine's boot image, "
                          "run in QEMU")
    run.add_argument("--threads", type=_number(int, 0), default=0,
                     help="threads for the float and fixed engines (default 0: all cores)")
    run.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    run.add_argument("-v", "--verbose", action="store_true", help="report the seed taken from the clock")
    _add_machine_flags(run)
    run.set_defaults(func=cmd_run)

    info = sub.add_parser("info", help="describe a checkpoint, tokenizer, packed model or boot image",
                          description="What a file is: a llama2.c checkpoint (any version) or tokenizer, a packed "
                                      ".sllm model (scheme, sections, CRC) or a boot image (parts, run settings, "
                                      "model, RAM needed).")
    info.add_argument("file", help="a file, or a model name (stories260K...)")
    info.set_defaults(func=cmd_info)

    bench = sub.add_parser("bench", help="measure decode and prefill speed",
                           description="Decode: greedy steps from BOS; prefill: one batched prompt. Median of 5 runs. "
                                       "'random:NAME' is a random-weight model of NAME's shape.")
    bench.add_argument("models", nargs="*", default=[DEFAULT_MODEL, "random:stories15M"],
                       help="model names, paths or random:NAME (default: stories260K random:stories15M)")
    bench.add_argument("--engine", action="append", choices=["float", "fixed"],
                       help="engine to measure (repeatable; default float)")
    bench.add_argument("--decode", type=_number(int, 1), default=256,
                       help="decode steps, 1 or more, at most the model's context (default 256)")
    bench.add_argument("--prefill", type=_number(int, 1), default=200,
                       help="prompt length for prefill, 1 or more, at most the model's context (default 200)")
    bench.add_argument("--threads", type=_number(int, 0), default=0,
                       help="threads for the float and fixed engines (default 0: all cores)")
    bench.add_argument("--json", action="store_true", help="print a JSON list of results")
    bench.add_argument("--boot", action="store_true",
                       help="instead: the boot engine's instructions per token (256 greedy from BOS on stories260K, "
                            "counted by the unicorn emulator) and its code bytes")
    bench.set_defaults(func=cmd_bench)

    image = sub.add_parser("image", help="write a boot image that generates text (the x86 boot engine)",
                           description="Build a bootable image: boot sector, run block (prompt and sampling "
                                       "settings), the boot engine and the packed model; a partitioned disk image "
                                       "(USB stick, any disk) or a 1.44 MB floppy. Flags are run's.")
    image.add_argument("checkpoint", help="checkpoint path or model name, or a packed .sllm file")
    image.add_argument("-o", "--output", required=True, help="image file to write (e.g. boot.img)")
    image.add_argument("--floppy", action="store_true",
                       help="a 1.44 MB floppy image (an empty FAT12 volume around the payload), for models that fit")
    image.add_argument("--listing", metavar="DIR", help="keep nasm's listings and map files in DIR")
    image.add_argument("--firmware", choices=["bios", "uefi", "both"],
                       help="what the image boots under: a legacy BIOS (or a UEFI PC's CSM), UEFI (an EFI System "
                            "Partition with the loader; needs mtools and dosfstools), or both (the default for a "
                            "disk image; a floppy is bios)")
    _add_generation_flags(image, SCHEMES, DEFAULT_SCHEME)
    image.set_defaults(func=cmd_image)

    boot = sub.add_parser("boot", help="boot an image in QEMU and stream the text it tells",
                          description="Boot a sectorllm image in qemu-system-i386 (headless) and print the tokens "
                                      "as the engine sends them on COM1.")
    boot.add_argument("image", help="the boot image (sectorllm image)")
    boot.add_argument("--json", action="store_true",
                      help="print one JSON object (generated_tokens, text, ...) instead of streaming text")
    boot.add_argument("--screenshot", help="save the final screen as this PNG")
    _add_machine_flags(boot)
    boot.set_defaults(func=cmd_boot)

    quant = sub.add_parser("quantize", help="write a packed integer model (.sllm) from a checkpoint",
                           description="Quantize a llama2.c checkpoint into sectorllm's packed format (docs/format.md) "
                                       "and print the error of every tensor.")
    quant.add_argument("checkpoint", help="checkpoint path or model name")
    quant.add_argument("-z", "--tokenizer", help="tokenizer .bin (default: the one that matches the model)")
    quant.add_argument("-o", "--output", required=True, help="packed file to write (e.g. stories260K.sllm)")
    quant.add_argument("--scheme", default=DEFAULT_SCHEME, choices=SCHEMES,
                       help="calibrated (default): one int8 scale per output row, values rounded for each row's output "
                            "on the float model's own stories; row: the same scales rounded to nearest; tensor: one "
                            "scale per tensor, as the original")
    quant.set_defaults(func=cmd_quantize)

    ev = sub.add_parser("eval", help="precision of the fixed-point engine against the float engine",
                        description="Teacher-forced top-1 agreement and KL on each prompt's float greedy continuation "
                                    "and a sampled one, greedy common prefixes (from BOS and from each prompt), and "
                                    "perplexity of both engines on the same texts.")
    ev.add_argument("checkpoint", nargs="?", default=DEFAULT_MODEL, help="checkpoint path or model name")
    ev.add_argument("-z", "--tokenizer", help="tokenizer .bin (default: the one that matches the model)")
    ev.add_argument("--scheme", action="append", choices=SCHEMES,
                    help=f"scheme(s) to compare (repeatable; default {DEFAULT_SCHEME})")
    ev.add_argument("--prompts", help="text file, one prompt per line (default: 50 built-in story openings)")
    ev.add_argument("--positions", type=_number(int, 1), default=128,
                    help="positions scored after each prompt, 1 or more (default 128)")
    ev.add_argument("--json", action="store_true", help="print JSON (one object, or a list for several schemes)")
    ev.add_argument("--plot", help="draw agreement and KL against position into this PNG")
    ev.add_argument("--ablate", action="store_true",
                    help="instead: the error budget, each integer step swapped in turn for its exact float counterpart")
    ev.set_defaults(func=cmd_eval)

    download = sub.add_parser("download", help="fetch a model and its tokenizer from the Hugging Face hub")
    download.add_argument("name", help="stories260K, stories15M, stories42M or stories110M")
    download.set_defaults(func=cmd_download)
    return parser


class _Terminated(BaseException):
    """SIGTERM, raised as Ctrl-C raises KeyboardInterrupt, so that every finally block and temporary file cleanup runs."""


class _Signals:
    """A handler for SIGINT and SIGTERM that raises and remembers the signal: numba wraps an exception raised inside
    its own code (in a SystemError, say), and the signal number still tells main() what happened."""

    def __init__(self) -> None:
        self.received = 0

    def __call__(self, signum: int, frame: object) -> None:
        self.received = signum
        raise KeyboardInterrupt if signum == signal.SIGINT else _Terminated


def main(argv: list[str] | None = None) -> int:
    if sys.stdout is None:  # started with stdout closed (`>&-`): Python gives us no stream to write to
        print("sectorllm: error: stdout is closed: redirect it to a file or to /dev/null", file=sys.stderr)
        return 2
    signals = _Signals()
    ours = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not signal.SIG_IGN]
    previous = {s: signal.signal(s, signals) for s in ours}
    try:
        args = build_parser().parse_args(argv)
        code = args.func(args)
        sys.stdout.flush()
        return code
    except SectorLLMError as e:
        print(f"sectorllm: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (e.g. `| head`): not an error worth a traceback
        _drop_stdout()
        return 0
    except OSError as e:
        if signals.received:
            _leave_on_signal(signals.received)
        if e.filename is None:  # every file we open names itself; this is stdout (a full disk, a closed terminal)
            _drop_stdout()
            print(f"sectorllm: error: cannot write the output: {e.strerror or e}", file=sys.stderr)
            return 2
        where = f" ({e.filename})" if e.filename else ""  # a path we were given cannot be read or written
        print(f"sectorllm: error: {e.strerror or e}{where}: check the path and its permissions", file=sys.stderr)
        return 2
    except BaseException:
        if signals.received:
            _leave_on_signal(signals.received)
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _leave_on_signal(signum: int) -> None:
    """Exit 128 + the signal number, as a shell reports it. Every temporary file is gone by now (their cleanup ran
    as the exception passed); the interpreter's shutdown is skipped, where numba's and ctypes' finalizers,
    interrupted mid-way, print tracebacks."""
    _drop_stdout()
    print(file=sys.stderr, flush=True)
    os._exit(128 + signum)


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so that the flush at exit cannot fail again on a closed pipe or a full disk."""
    try:
        sys.stdout.flush()
    except OSError:
        pass
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
