"""Boot an image under Bochs, a second emulator with a BIOS of its own: headless, COM1 into a file, the run over
when the CPU halts with interrupts off (the engine's end, or a failure's)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import BootError
from .image import DISK_HEADS, DISK_SECTORS_PER_TRACK, SECTOR

BOCHS = "bochs"
BOCHS_INSTALL = "apt-get install bochs bochsbios vgabios"
BIOS = Path("/usr/share/bochs/BIOS-bochs-latest")
VGA_BIOS = Path("/usr/share/vgabios/vgabios.bin")
HALTED = "HLT instruction with IF=0"  # what Bochs logs when the guest stops for good
POLL_SECONDS = 0.2


@dataclass(frozen=True)
class BochsRun:
    """What COM1 carried (the plain-text story, "\\n" as CR LF) and how long the boot took."""

    serial: bytes
    seconds: float

    @property
    def text(self) -> str:
        return self.serial.replace(b"\r\n", b"\n").decode("utf-8", errors="replace")


def bochs_config(image: Path, floppy: bool, memory_mib: int, serial: Path, log: Path) -> str:
    """A bochsrc: the image as the first IDE disk (its geometry from its size) or as a 1.44 MB floppy, a display
    that needs no screen (VNC, not waiting for a client), no sound, and the log that tells when the CPU halts."""
    if floppy:
        drive = f"floppya: 1_44={image}, status=inserted\nboot: floppy"
    else:
        cylinders = image.stat().st_size // (SECTOR * DISK_HEADS * DISK_SECTORS_PER_TRACK)
        drive = (f"ata0-master: type=disk, path={image}, mode=flat, cylinders={cylinders}, heads={DISK_HEADS}, "
                 f"spt={DISK_SECTORS_PER_TRACK}\nboot: disk")
    return f"""megs: {memory_mib}
romimage: file={BIOS}
vgaromimage: file={VGA_BIOS}
{drive}
com1: enabled=1, mode=file, dev={serial}
display_library: rfb, options="timeout=0"
speaker: enabled=0
sound: waveoutdrv=dummy, waveindrv=dummy, midioutdrv=dummy
log: {log}
panic: action=fatal
error: action=report
info: action=report
debug: action=ignore
"""


def boot_bochs(image: Path, *, floppy: bool, memory_mib: int, timeout: float = 120.0) -> BochsRun:
    """Boot image under Bochs until the CPU halts; BootError if Bochs is missing, fails, or the run times out."""
    binary = shutil.which(BOCHS)
    if binary is None or not BIOS.is_file() or not VGA_BIOS.is_file():
        raise BootError(f"Bochs and its BIOSes are not installed: {BOCHS_INSTALL}")
    image = Path(image).resolve()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sectorllm-bochs-") as scratch:
        folder = Path(scratch)
        disk = folder / "boot.img"  # Bochs locks the image with a file beside it: keep that in here
        disk.symlink_to(image)
        serial, log = folder / "com1.txt", folder / "bochs.log"
        config = folder / "bochsrc"
        config.write_text(bochs_config(disk, floppy, memory_mib, serial, log))
        commands = folder / "debugger.rc"
        commands.write_text("continue\n")  # Debian's Bochs starts in its debugger
        process = subprocess.Popen([binary, "-q", "-f", str(config), "-rc", str(commands)], cwd=folder,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while HALTED not in (log.read_text(errors="replace") if log.exists() else ""):
                if process.poll() is not None:
                    raise BootError(f"Bochs exited (status {process.returncode}) before the run ended: "
                                    f"{log.read_text(errors='replace')[-300:] if log.exists() else 'no log'}")
                if time.monotonic() - started > timeout:
                    raise BootError(f"the boot under Bochs did not finish within {timeout:g} s (Bochs killed)")
                time.sleep(POLL_SECONDS)
        finally:
            process.kill()
            process.wait()
        data = serial.read_bytes() if serial.exists() else b""
    return BochsRun(data, time.monotonic() - started)
