#!/usr/bin/env bash
# Creates .venv/ at the repository root with the pinned stack (requirements.txt)
# and dit_mm installed in editable mode. Idempotent: a second run with an
# unchanged requirements.txt/setup.py returns in about a second.
#
# mmcv 2.1.0 has no wheel for torch 2.14, so it is built from source once
# (about 16 minutes on 2 cores) into a wheel cache outside the repository:
#   $DIT_MM_WHEEL_CACHE (default: ~/.cache/dit_mm/wheels)
# A prebuilt wheel in $DIT_MM_EXTRA_WHEELS (default: ../shared/wheels when it
# exists) is copied into that cache instead of building.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
cache="${DIT_MM_WHEEL_CACHE:-$HOME/.cache/dit_mm/wheels}"
extra="${DIT_MM_EXTRA_WHEELS:-$root/../shared/wheels}"
python="${PYTHON:-python3}"
stamp="$venv/.dit_mm_installed"
want="$(cat requirements.txt setup.py tools/install.sh | sha256sum | cut -d' ' -f1)"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[install] .venv is up to date ($venv)"
  exit 0
fi

pin() { grep -E "^$1([=<>!~ ]|$)" requirements.txt | sed 's/#.*//; s/ *$//' | head -1; }

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
echo "[install] base: torch, torchvision, setuptools"
"${pip[@]}" install -q "$(pin torch)" "$(pin torchvision)" "$(pin setuptools)" ninja wheel

mmcv_pin="$(pin mmcv)"; mmcv_ver="${mmcv_pin#mmcv==}"
mkdir -p "$cache"
if ! ls "$cache"/mmcv-"$mmcv_ver"-*.whl >/dev/null 2>&1; then
  if ls "$extra"/mmcv-"$mmcv_ver"-*.whl >/dev/null 2>&1; then
    echo "[install] mmcv: using prebuilt wheel from $extra"
    cp "$extra"/mmcv-"$mmcv_ver"-*.whl "$cache"/
  else
    echo "[install] mmcv: building $mmcv_ver from source (~16 min on 2 cores, once)"
    tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
    "${pip[@]}" download -q --no-deps --no-binary mmcv "mmcv==$mmcv_ver" -d "$tmp"
    tar xzf "$tmp"/mmcv-"$mmcv_ver".tar.gz -C "$tmp"
    # torch 2.14's headers need C++20; mmcv 2.1.0 asks for C++14/17.
    sed -i 's/-std=c++14/-std=c++20/g; s/-std=c++17/-std=c++20/g' "$tmp/mmcv-$mmcv_ver/setup.py"
    MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" "${pip[@]}" wheel --no-deps \
      --no-build-isolation "$tmp/mmcv-$mmcv_ver" -w "$cache"
  fi
fi

echo "[install] stack from requirements.txt and dit_mm (editable)"
"${pip[@]}" install -q --find-links "$cache" -r requirements.txt
"${pip[@]}" install -q --no-deps --no-build-isolation -e "$root"
"$venv/bin/python" -c "import dit_mm, mmcv.ops, mmdet, mmseg, mmpretrain; print('[install] ok: mmcv', mmcv.__version__)"
echo "$want" > "$stamp"
