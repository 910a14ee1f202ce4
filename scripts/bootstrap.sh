#!/usr/bin/env bash
# Shared set-up for scripts/test.sh and scripts/demo.sh: system packages (Mosquitto,
# and Chromium and the device boot-test tools when asked) and a virtualenv in .venv with edgefl and the pinned
# versions of its dependencies. Safe to run again: it only does what is missing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${EDGEFL_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${EDGEFL_EXTRAS:-dev}"

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

apt_install() {
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  if ! command -v apt-get >/dev/null; then
    echo "edgefl: please install these packages with your package manager: $*" >&2
    exit 1
  fi
  say "installing system packages: $*"
  if [ ! -f /tmp/.edgefl-apt-updated ]; then
    $sudo apt-get update -qq && touch /tmp/.edgefl-apt-updated
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

need_pkgs=()
if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ]; then
  need_pkgs+=(mosquitto)
fi
# The registry tests also run on a real PostgreSQL server (initdb + postgres in a
# temporary directory, started by the test fixture).
if [ "${EDGEFL_WITH_POSTGRES:-0}" = "1" ] && ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null \
  && ! command -v initdb >/dev/null; then
  need_pkgs+=(postgresql)
fi
# The cloud's fleet port runs through nginx (cloud/proxy.py); like Mosquitto, edgefl
# starts its own instance with a generated configuration, not the distribution's service.
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
  need_pkgs+=(nginx)
fi
if [ "${EDGEFL_WITH_BROWSER:-0}" = "1" ] && [ ! -x /usr/bin/chromium ]; then
  need_pkgs+=(chromium)
fi
# The device boot tests (tests/e2e/test_boot_device.py, arm64 under qemu-user) build
# Debian root filesystems and boot them; scripts/test.sh asks for these.
if [ "${EDGEFL_WITH_DEVICES:-0}" = "1" ]; then
  command -v debootstrap >/dev/null || need_pkgs+=(debootstrap)
  command -v systemd-nspawn >/dev/null || need_pkgs+=(systemd-container)
  command -v qemu-aarch64-static >/dev/null || need_pkgs+=(qemu-user-static)
  command -v cloud-init >/dev/null || need_pkgs+=(cloud-init)
  command -v cloud-localds >/dev/null || need_pkgs+=(cloud-image-utils)
fi
if ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  need_pkgs+=(python3-venv)
fi
if [ "${#need_pkgs[@]}" -gt 0 ]; then
  apt_install "${need_pkgs[@]}"
fi
# The distribution's mosquitto and postgresql services are not what edgefl uses: it
# starts its own brokers (and the tests their own PostgreSQL) on free ports.

if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
  echo "edgefl needs Python 3.11 or newer (found $("$PYTHON" --version 2>&1))" >&2
  exit 1
fi

stamp="$VENV/.edgefl-installed"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/requirements/constraints.txt" | sha256sum | cut -c1-16)-$EXTRAS"
if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  say "installing edgefl-fleet[$EXTRAS] into $VENV (first run downloads TensorFlow; a few minutes)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # Before the rename our distribution was called "edgefl", which is an unrelated
  # project on PyPI: drop either from an older venv so nothing shadows our packages.
  if "$VENV/bin/python" -m pip show -q edgefl >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip uninstall -q -y edgefl
  fi
  "$VENV/bin/python" -m pip install -q -c "$ROOT/requirements/constraints.txt" -e "$ROOT[$EXTRAS]"
  echo "$want" > "$stamp"
fi
