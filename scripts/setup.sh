#!/usr/bin/env bash
# One idempotent setup for a fresh Debian 12 machine (also the install step of docker/ images):
#   1. apt packages: EGL/Mesa for offscreen MuJoCo rendering, libusb for pyrealsense2;
#   2. .venv with the pinned Python dependencies (requirements.txt + constraints.txt);
#   3. the qvgm distribution itself, editable.
# Re-running is cheap: each step is skipped when its stamp matches.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${QVGM_VENV:-$ROOT/.venv}
APT_PACKAGES=(libegl1 libegl-mesa0 libgl1 libusb-1.0-0)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] apt-get install ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
PY_WANT=${QVGM_PYTHON_VERSION:-3.11}
"$PYTHON" -c "import sys; v='%d.%d' % sys.version_info[:2]; assert v == '$PY_WANT', f'qvgm needs Python $PY_WANT, found {v}'"
# QVGM_REQUIREMENTS_EXCLUDE / QVGM_CONSTRAINTS_EXCLUDE: extended regexes of lines to leave out (docker images:
# the robot PC takes rclpy from /opt/ros, the trainer takes CUDA torch and no ROS). Unset: everything installs.
REQ=$(mktemp); CON=$(mktemp); trap 'rm -f "$REQ" "$CON"' EXIT
grep -Ev "${QVGM_REQUIREMENTS_EXCLUDE:-a^}" requirements.txt > "$REQ" || true
grep -Ev "${QVGM_CONSTRAINTS_EXCLUDE:-a^}" constraints.txt > "$CON" || true
stamp_want=$(cat "$REQ" "$CON" pyproject.toml setup.py | sha256sum | cut -c1-16)
stamp_file=$VENV/.qvgm-setup
if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp_want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# torch==2.13.0 is pinned: an unpinned torch would pull a multi-GB CUDA build.
pip_quiet() {  # pip, minus the warnings about file:// indexes that do not carry a package
  "$VENV/bin/pip" "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
pip_quiet install -q -r "$REQ" -c "$CON"
pip_quiet install -q --no-deps --no-build-isolation -e .
echo "$stamp_want" > "$stamp_file"
echo "[setup] done: $VENV"
