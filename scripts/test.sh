#!/usr/bin/env bash
# The whole test suite on a machine that may have nothing: installs nasm, QEMU, OVMF, Bochs, the FAT tools and sfdisk
# (apt) and sectorllm with its test extras (pip, into .venv unless a virtualenv is active), then runs pytest. Extra
# arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
can_install() { [ "$(id -u)" -eq 0 ] || command -v sudo >/dev/null; }
missing=()
command -v nasm >/dev/null || missing+=(nasm)
command -v qemu-system-i386 >/dev/null || missing+=(qemu-system-x86)
command -v bochs >/dev/null && [ -f /usr/share/bochs/BIOS-bochs-latest ] && [ -f /usr/share/vgabios/vgabios.bin ] \
  || missing+=(bochs bochsbios vgabios)
[ -f /usr/share/OVMF/OVMF_CODE_4M.fd ] || missing+=(ovmf)
command -v mcopy >/dev/null || missing+=(mtools)
PATH="$PATH:/usr/sbin:/sbin" command -v mkfs.fat >/dev/null || missing+=(dosfstools)
PATH="$PATH:/usr/sbin:/sbin" command -v sfdisk >/dev/null || missing+=(fdisk)
python3 -c "import ensurepip, venv" 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ] && command -v apt-get >/dev/null && can_install; then
  echo "installing ${missing[*]} (apt)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
elif [ ${#missing[@]} -gt 0 ]; then
  echo "missing ${missing[*]} and no way to install them here (apt as root or sudo): the tests needing them skip"
fi

if [ -n "${VIRTUAL_ENV:-}" ]; then
  python=python
else
  [ -x .venv/bin/python ] || python3 -m venv .venv
  python=.venv/bin/python
fi
"$python" -m pip install -q --disable-pip-version-check -e '.[test]'

export SECTORLLM_MODELS="${SECTORLLM_MODELS:-$(cd .. && pwd)/shared/models}"
[ -d "$SECTORLLM_MODELS" ] || echo "no model files at $SECTORLLM_MODELS: the tests that need them skip (set" \
  "SECTORLLM_MODELS to a folder with stories260K.bin, tok512.bin, tokenizer.bin, stories260K_q80.bin)"
"$python" -m pytest "$@"
