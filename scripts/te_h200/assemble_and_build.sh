#!/usr/bin/env bash
# Transformer Engine on the lent H200 (issue 17 item 5), run there from the repository root.
# The pieces travel in ignored folders made by scripts/te_h200/split.sh (see scripts/te_h200/README.md):
#   .te0/      MANIFEST, SHA256SUMS, whl/ (TE meta wheel, pydantic & co, optionally a
#              transformer_engine_torch wheel prebuilt on the CPU host), sdist/ (transformer_engine_torch),
#              build/ (the `wheel` package, used only if the image's cannot build)
#   .te1 .. .teN  consecutive byte ranges of the TE core wheel (transformer_engine_cu13)
#
# Subcommands:
#   stash       copy the .te* folders this call carried to /tmp/te_chunks (every chunk call)
#   build-ext   build transformer_engine_torch from the sdist (needs only .te0 and the image's torch,
#               nvcc, ninja); writes /tmp/te_ext/{status,build.log,*.whl}. Meant to run in the
#               background from the first call (setsid), while the other chunks travel.
#   final       (default) check + join the chunks, install TE into /tmp/te, wait for build-ext
#               (see TE_BUILD), choose the extension (H200 build, else the prebuilt one), run
#               scripts/te_h200/te_check.py. Everything is logged under $OUT.
# Environment: OUT (default /tmp/te_out), PYTHON (python3), TE_TARGET (/tmp/te),
#   TE_BUILD_TIMEOUT (330 s: hard limit of the sdist build), TE_BUILD_WAIT (240 s: how long `final`
#   waits for a background build), TE_BUILD (bg: use the build that call 1 started in the
#   background, if any; now: build here, synchronously; 0: never build, use the prebuilt wheel), TE_CHECK_ARGS ("--layer --gpt fp8_cs,fp8_block --steps 10"),
#   TE_DEADLINE (epoch seconds by which te_check.py must have started its last pretrain run).
set -uo pipefail
MODE=${1:-final}
PY=${PYTHON:-python3}
TE=${TE_TARGET:-/tmp/te}
EXT=/tmp/te_ext
T0=$(date +%s)
say() { echo "[te-h200 +$(( $(date +%s) - T0 ))s] $*"; }

# ----------------------------------------------------------------------------- build-ext
build_ext() {
  mkdir -p "$EXT"
  rm -f "$EXT"/status "$EXT"/*.whl
  local sdist
  sdist=$(ls .te0/sdist/transformer_engine_torch-*.tar.gz 2>/dev/null | head -1)
  if [ -z "$sdist" ]; then echo "rc=missing-sdist secs=0" > "$EXT/status"; return 1; fi
  # nccl.h: ep.cpp needs it with NVTE_WITH_NCCL_EP (TE's default); the image has it in
  # the nvidia-nccl wheel, not in /usr/local/cuda/include, which TE's build uses when nvcc exists
  local nccl_inc
  nccl_inc=$("$PY" -c "import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], 'include'))" 2>/dev/null)
  # headers the toolkit folder lacks (cudnn.h is never in it; cusparse.h may not be): the image's
  # nvidia-* wheels, which torch was built with (CPATH is searched after every -I folder). On the
  # CPU host the build stopped at cudnn.h (from torch's ATen/cudnn) without these.
  local wheel_inc
  wheel_inc=$("$PY" -c "import nvidia, glob, os; print(':'.join(sorted(glob.glob(os.path.join(list(nvidia.__path__)[0], '*', 'include')))))" 2>/dev/null)
  nccl_inc=${nccl_inc}${wheel_inc:+:$wheel_inc}
  local extra_pp=""
  if ! "$PY" -c "from wheel.bdist_wheel import bdist_wheel" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --upgrade --target /tmp/te_buildtools .te0/build/*.whl
    extra_pp=/tmp/te_buildtools
  fi
  # TE's build takes the CUDA headers from $CUDA_HOME/include, else from nvcc's folder: name the
  # toolkit when nvcc is a wrapper outside it
  if [ -z "${CUDA_HOME:-}" ] && [ -f /usr/local/cuda/include/cuda_runtime_api.h ]; then
    export CUDA_HOME=/usr/local/cuda
  fi
  local t0 rc
  t0=$(date +%s)
  ( export NVTE_FRAMEWORK=pytorch NVTE_CUDA_ARCHS=90 MAX_JOBS=${MAX_JOBS:-16} \
      NVTE_PYTORCH_FORCE_BUILD=TRUE CPATH=${nccl_inc}${CPATH:+:$CPATH} \
      PYTHONPATH=${extra_pp}${PYTHONPATH:+:$PYTHONPATH}
    echo "build env: NVTE_FRAMEWORK=$NVTE_FRAMEWORK NVTE_CUDA_ARCHS=$NVTE_CUDA_ARCHS MAX_JOBS=$MAX_JOBS CPATH=$CPATH PYTHONPATH=$PYTHONPATH CUDA_HOME=${CUDA_HOME:-} nvcc=$(command -v nvcc) ninja=$(command -v ninja)"
    exec timeout -k 10 "${TE_BUILD_TIMEOUT:-330}" "$PY" -m pip wheel -v --no-build-isolation \
      --no-deps --no-index -w "$EXT" "$sdist" ) > "$EXT/build.log" 2>&1
  rc=$?
  echo "rc=$rc secs=$(( $(date +%s) - t0 )) compiled=$(grep -cE '^\s*\[[0-9]+/[0-9]+\]' "$EXT/build.log")" > "$EXT/status"
  return $rc
}

# The device tool does not keep a folder carried by an earlier call (seen on 2026-12-03: .te0 and
# .te1, carried by call 1, were gone in call 2), so every call stashes what it carried outside the
# working tree and `final` puts the stash back.
STASH=/tmp/te_chunks
stash() {
  mkdir -p "$STASH"
  local d
  for d in .te*; do [ -d "$d" ] && cp -r "$d" "$STASH"/; done
  ls -d "$STASH"/.te* 2>/dev/null | tr '\n' ' '; echo
}
if [ "$MODE" = stash ]; then
  stash
  exit 0
fi
if [ "$MODE" = build-ext ]; then
  stash
  build_ext
  exit $?
fi
[ "$MODE" = final ] || { echo "usage: $0 [stash|build-ext|final]"; exit 64; }
stash >/dev/null
for d in "$STASH"/.te*; do [ -e "$(basename "$d")" ] || cp -r "$d" .; done

# cuDNN: torch loads the image's pip cuDNN (nvidia/cudnn, 9.19); TE's loader prefers a system
# libcudnn (ldconfig: /lib/x86_64-linux-gnu, another 9.x), and the two mixed in one process fail
# (seen 2026-12-03: libcudnn_heuristic.so.9: undefined symbol ... version libcudnn_graph.so.9).
# CUDNN_HOME points TE's loader at torch's cuDNN; LD_LIBRARY_PATH makes its sub-libraries resolve
# there too.
CUDNN_PIP=$("$PY" -c "import nvidia.cudnn as m; print(list(m.__path__)[0])" 2>/dev/null)
if [ -n "$CUDNN_PIP" ]; then
  export CUDNN_HOME=$CUDNN_PIP LD_LIBRARY_PATH=$CUDNN_PIP/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi

# ---------------------------------------------------------------------------------- final
OUT=${OUT:-/tmp/te_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/te_h200.log") 2>&1
fail() {  # stage, message: the exact failure, also as one line in $OUT/te_h200_failure.txt
  say "FAILED at '$1': $2"
  echo "$1: $2" > "$OUT/te_h200_failure.txt"
  cp -f "$EXT/build.log" "$OUT/te_build.log" 2>/dev/null
  exit 1
}

say "cuDNN for TE: CUDNN_HOME=${CUDNN_HOME:-unset}"
say "env: $(nvidia-smi -L 2>&1 | head -1) | $("$PY" -V 2>&1) | nproc $(nproc) | $(nvcc --version 2>/dev/null | tail -1)"
"$PY" -c "import torch; print('[te-h200] torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"

# 1. the chunks: all there, each intact, joined = the wheel PyPI served
[ -f .te0/MANIFEST ] || fail chunks ".te0/MANIFEST missing: .te0 was not carried (first call) or the machine was given back since"
# shellcheck disable=SC1091
. .te0/MANIFEST   # WHEEL, NPARTS, WHEEL_SHA256
missing=""
for i in $(seq 1 "$NPARTS"); do ls .te"$i"/*.part"$i" >/dev/null 2>&1 || missing="$missing .te$i"; done
[ -z "$missing" ] && [ -d .te0/whl ] || fail chunks "missing:$missing (NPARTS=$NPARTS). The machine was not kept warm between the calls (a reply with warm=false), so earlier chunks are gone; ls: $(ls -d .te* 2>&1 | tr '\n' ' ')"
sha256sum --quiet -c .te0/SHA256SUMS || fail chunks "sha256 mismatch (lines above): a chunk or a .te0 file differs from what split.sh wrote"
mkdir -p /tmp/te_dl
cat $(for i in $(seq 1 "$NPARTS"); do echo .te"$i"/*.part"$i"; done) > "/tmp/te_dl/$WHEEL"
echo "$WHEEL_SHA256  /tmp/te_dl/$WHEEL" | sha256sum --quiet -c || fail assemble "joined wheel's sha256 differs from $WHEEL_SHA256"
say "chunks: $NPARTS parts joined into $WHEEL ($(stat -c %s "/tmp/te_dl/$WHEEL") bytes, sha256 ok)"

# 2. install: TE core + meta + their Python deps into $TE; the project's wheels (.whl) into /tmp/site
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$TE" \
  "/tmp/te_dl/$WHEEL" $(ls .te0/whl/*.whl | grep -v transformer_engine_torch) \
  || fail install "pip install of the TE core/meta wheels and deps into $TE failed (output above)"
if [ -d .whl ] && ! "$PY" -c "import megatron.core, hydra" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || fail install "pip install of .whl (megatron-core, hydra) failed"
fi
export PYTHONPATH=$TE:/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
say "installed: $(ls "$TE" | grep -i dist-info | tr '\n' ' ')"

# 3. the PyTorch extension: the H200 build (background from the first call, else now), else prebuilt
building() { pgrep -f "pip wheel -v --no-build-isolation" >/dev/null; }
case "${TE_BUILD:-bg}" in
  0)   say "TE_BUILD=0: no H200 build of transformer_engine_torch; the prebuilt wheel only"
       mkdir -p "$EXT"; [ -f "$EXT/status" ] || echo "rc=not-built(TE_BUILD=0)" > "$EXT/status" ;;
  now) say "TE_BUILD=now: building transformer_engine_torch now (timeout ${TE_BUILD_TIMEOUT:-330} s)"
       build_ext ;;
  *)   if [ ! -f "$EXT/status" ] && ! building; then
         say "no background build (call 1 did not start 'build-ext', or the machine was restarted)"
         mkdir -p "$EXT"; echo "rc=no-background-build" > "$EXT/status"
       fi ;;
esac
waited=0
while [ ! -f "$EXT/status" ] && building && [ "$waited" -lt "${TE_BUILD_WAIT:-240}" ]; do
  sleep 5; waited=$((waited + 5))
done
cp -f "$EXT/build.log" "$OUT/te_build.log" 2>/dev/null
BUILD_STATUS=$(cat "$EXT/status" 2>/dev/null || echo "rc=still-running-after-wait-${waited}s compiled=$(grep -cE '^\s*\[[0-9]+/[0-9]+\]' "$EXT/build.log" 2>/dev/null)")
say "H200 build of transformer_engine_torch: $BUILD_STATUS (waited ${waited}s); log: te_build.log"
grep -iE "error|fatal" "$EXT/build.log" 2>/dev/null | head -20
H200_WHL=$(ls "$EXT"/transformer_engine_torch-*.whl 2>/dev/null | head -1)
PRE_WHL=$(ls .te0/whl/transformer_engine_torch-*.whl 2>/dev/null | head -1)
try_ext() {  # wheel, label
  # the wheel holds transformer_engine/wheel_lib/transformer_engine_torch*.so + its dist-info.
  # Not `pip install --target --upgrade`: that replaces the whole transformer_engine/ folder of
  # the core wheel (seen on the CPU host). Unzipped into it instead.
  rm -rf "$TE"/transformer_engine/wheel_lib/transformer_engine_torch* "$TE"/transformer_engine_torch-*.dist-info
  "$PY" -m zipfile -e "$1" "$TE" || return 1
  # torch first, as in every real use: libtorch_cuda brings libnccl.so.2 (the image's nvidia-nccl
  # wheel), which libtransformer_engine.so needs and TE itself does not preload
  "$PY" -c "import torch, transformer_engine.pytorch as te, transformer_engine as t; print('[te-h200] import ok:', t.__version__)" \
    > "$OUT/te_import_$2.log" 2>&1
  local rc=$?
  cat "$OUT/te_import_$2.log" | tail -25
  return $rc
}
USED=""
if [ -n "$H200_WHL" ] && try_ext "$H200_WHL" h200; then USED="built on the H200 ($BUILD_STATUS)"
elif [ -n "$PRE_WHL" ] && try_ext "$PRE_WHL" prebuilt; then USED="prebuilt on the CPU host ($(basename "$PRE_WHL")); H200 build: $BUILD_STATUS"
fi
[ -n "$USED" ] || fail import "transformer_engine.pytorch does not import with any extension (H200 build: $BUILD_STATUS; prebuilt: ${PRE_WHL:-none}); see te_import_*.log / te_build.log"
say "transformer_engine_torch: $USED"
echo "$USED" > "$OUT/te_extension_used.txt"

# 4. the checks (te_check.py writes te_check.json and gpt_*.log into $OUT as it goes)
# shellcheck disable=SC2086
"$PY" scripts/te_h200/te_check.py --out "$OUT" ${TE_CHECK_ARGS:---layer --gpt fp8_cs,fp8_block --steps 10} \
  ${TE_DEADLINE:+--deadline $TE_DEADLINE}
rc=$?
say "te_check.py exit $rc (0 all passed, 1 a stage failed, 2 TE does not import)"
exit $rc
