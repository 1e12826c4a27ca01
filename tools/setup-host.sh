#!/usr/bin/env bash
# Installs the host packages supermachine-kernel needs, if any are missing. Idempotent.
# On a non-Debian host it prints what to install instead and fails.
set -euo pipefail

PACKAGES=(qemu-system-x86 qemu-utils erofs-utils mmdebstrap e2fsprogs cpio busybox-static kmod
          python3-venv ca-certificates
          # OCI image tests: a local registry, pushing test images, htpasswd, test TLS certs.
          docker-registry skopeo apache2-utils openssl
          # The JupyterLab extension's browser tests (tests/lab).
          chromium)
# The JupyterLab extension's build: node and npm, from Debian unless a node that brings its own
# npm is installed already (NodeSource's nodejs package ships npm and conflicts with Debian's).

if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
    echo "setup: this host is not Debian-family (no dpkg/apt-get)." >&2
    echo "setup: install these yourself, then re-run: QEMU (qemu-system-x86_64 >= 7.2), erofs-utils (mkfs.erofs)," >&2
    echo "setup:   mmdebstrap, e2fsprogs, cpio, kmod, dpkg-deb, apt-get (the guest image is built from Debian packages)," >&2
    echo "setup:   a Rust toolchain (cargo) and Python >= 3.9 with venv." >&2
    exit 1
fi

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ! command -v npm >/dev/null 2>&1; then
    missing+=(nodejs npm)
fi
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
echo "setup: installing Debian packages: ${missing[*]}" >&2
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "setup: need root to install ${missing[*]}: run 'apt-get install ${missing[*]}' as root" >&2
        exit 1
    fi
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
