#!/usr/bin/env bash
# The `pixels` tier of bench/learning.py on a CUDA machine without ROS and without network (the lent device machine:
# python3 3.12 + torch + pyarrow/pyyaml/safetensors/tqdm/tokenizers/transformers, no MuJoCo, PyAV or Gymnasium).
# docs/pixels_tier.md says how to size a run. Two halves:
#   bash bench/pixels_gpu.sh fetch
#       here, with network: cp312 wheels of what that image lacks -> .wheels/, the EGL/GLVND debs -> .gl/ (both put
#       into .git/info/exclude); prints their size (the working tree + carried paths travel within 64 MiB).
#   bash bench/pixels_gpu.sh run DIR [bench/learning.py ARGS...]
#       there (carry .wheels and .gl): unpack the GL libraries, pip-install the missing wheels, check that MuJoCo
#       renders a non-blank frame through EGL and that pi05-tiny acts on the device, then run
#       bench/learning.py --tier pixels --device $DEVICE --threads $THREADS ARGS under `timeout $LIMIT`, with --work in
#       $WORK (outside DIR: the returned folder takes at most 8 files). DIR gets env.txt, learning_pixels.json/.log/.err.
#       Environment: PY (python3), DEVICE (cuda), THREADS (4), LIMIT (seconds, 540), WORK (/tmp/learning_pixels_work).
#   bash bench/pixels_gpu.sh exec DIR CMD [ARGS...]
#       there: the same environment and check, then CMD ARGS (e.g. bench/sft_success_gpu.sh) under `timeout $LIMIT`,
#       its output into DIR/exec.log.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(mujoco==4.0.0 mujoco-core==4.0.0 glfw==2.11.0 PyOpenGL==3.1.10 av==18.1.0 gymnasium==1.4.0
        Farama-Notifications==0.0.6)  # pins of constraints.txt; mujoco-studio (viewer, 13 MB) is not needed offscreen
GL_DEBS=(libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
mode=${1:?usage: bench/pixels_gpu.sh fetch | run DIR [ARGS...]}
shift

if [[ $mode == fetch ]]; then
  exclude=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")" .wheels .gl /tmp/amd64/partial
  for p in /.wheels/ /.gl/; do grep -qxF "$p" "$exclude" 2>/dev/null || echo "$p" >>"$exclude"; done
  pip=${PIP:-.venv/bin/pip}
  "$pip" download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 \
    --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .wheels "${WHEELS[@]}"
  o=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64)
  apt-get "${o[@]}" update >/dev/null
  (cd .gl && apt-get "${o[@]}" download "${GL_DEBS[@]}")
  du -sh .wheels .gl
  echo "carry: [\".wheels\", \".gl\"]"
  exit 0
fi
[[ $mode == run || $mode == exec ]] || { echo "unknown mode $mode (fetch | run | exec)" >&2; exit 2; }
out=${1:?usage: bench/pixels_gpu.sh run DIR [ARGS...] | exec DIR CMD [ARGS...]}
shift
mkdir -p "$out"
py=${PY:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MUJOCO_GL=egl PYOPENGL_PLATFORM=egl
if compgen -G ".gl/*.deb" >/dev/null; then
  # into a private prefix, never over the system's own libraries (this also runs on a workstation by mistake)
  for f in .gl/*.deb; do dpkg -x "$f" .gl/root; done
  export LD_LIBRARY_PATH="$PWD/.gl/root/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
vendor=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
[[ -z ${__EGL_VENDOR_LIBRARY_FILENAMES:-} && -f $vendor ]] && export __EGL_VENDOR_LIBRARY_FILENAMES=$vendor
check_env() {
  set -e
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  # install only what is missing or at another version (no index: the machine has no network)
  missing=$("$py" - "${WHEELS[@]}" <<'EOF'
import importlib.metadata as md
import sys
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    try:
        ok = md.version(name) == want
    except md.PackageNotFoundError:
        ok = False
    if not ok:
        print(pin)
EOF
)
  if [[ -n $missing ]]; then
    echo "installing from .wheels: $missing"
    # shellcheck disable=SC2086
    "$py" -m pip install -q --no-index --no-deps --find-links .wheels $missing
  fi
  "$py" - "${DEVICE:-cuda}" <<'EOF'
import sys
import time

import numpy as np
import torch
import transformers

from qvgm.policy import NormStats, make_policy
from qvgm.sim import TabletopEnv

print("python", sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__)
t0 = time.perf_counter()
env = TabletopEnv(task="pick_place", cameras=("front", "wrist"), image_size=(64, 64), render=True)
obs, _ = env.reset(seed=0)
for c, im in obs["images"].items():
    assert im.shape == (64, 64, 3) and int(im.max()) > int(im.min()), f"camera {c}: blank or wrong frame {im.shape}"
print("render ok", {c: round(float(im.mean()), 1) for c, im in obs["images"].items()}, f"{time.perf_counter() - t0:.1f}s")
d = len(obs["state"])  # joint targets: action dim = state dim
pol = make_policy("pi05-tiny", NormStats.identity(d, d), tasks=[obs["prompt"]], camera_names=["front", "wrist"],
                  state_dim=d, real_action_dim=d)
pol = pol.to(torch.device(sys.argv[1])).eval()
chunk = pol.act([{"images": obs["images"], "state": obs["state"], "prompt": obs["prompt"]}])
assert np.isfinite(chunk).all()
print("pi05-tiny acts on", pol.device, chunk.shape)
env.close()
EOF
}
set +e
(check_env) 2>&1 | tee "$out/env.txt"
ok=${PIPESTATUS[0]}
if [[ $ok != 0 && -n ${OUT:-} && $EUID == 0 ]] && compgen -G ".gl/*.deb" >/dev/null; then
  # the lent device machine only ($OUT set, root): its README's way, the GL libraries unpacked over /
  echo "retrying with .gl unpacked into / (device README)" | tee -a "$out/env.txt"
  for f in .gl/*.deb; do dpkg -x "$f" /; done
  ldconfig
  export LD_LIBRARY_PATH=${LD_LIBRARY_PATH#"$PWD/.gl/root/usr/lib/x86_64-linux-gnu"}
  LD_LIBRARY_PATH=${LD_LIBRARY_PATH#:}
  (check_env) 2>&1 | tee -a "$out/env.txt"
  ok=${PIPESTATUS[0]}
fi
[[ $ok == 0 ]] || { echo "environment check failed: $out/env.txt" >&2; exit 1; }
t0=$SECONDS
if [[ $mode == exec ]]; then
  timeout "${LIMIT:-540}" "$@" >"$out/exec.log" 2>&1
  rc=$?
  echo "[exec $1] rc=$rc $((SECONDS - t0)) s" | tee -a "$out/env.txt"
  exit $rc
fi
timeout "${LIMIT:-540}" "$py" bench/learning.py --tier pixels --device "${DEVICE:-cuda}" --threads "${THREADS:-4}" "$@" \
  --work "${WORK:-/tmp/learning_pixels_work}" --out "$out/learning_pixels.json" \
  >"$out/learning_pixels.log" 2>"$out/learning_pixels.err"
rc=$?
echo "[learning_pixels] rc=$rc $((SECONDS - t0)) s" | tee -a "$out/env.txt"
exit $rc
