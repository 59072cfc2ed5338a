#!/usr/bin/env bash
# Issue 19, item 3: the renames, as one mechanical step that can be re-run after merging other
# branches (idempotent: a second run changes nothing). Run from anywhere inside the repository:
#   bash scripts/dev/rename_19.sh && git add -A && git commit -m "issue 19: renames (scripts/dev/rename_19.sh)"
#
#   nvfp4_megatron.megatron  -> nvfp4_megatron.mcore    (next to megatron.core, one name each)
#   nvfp4_megatron.platform  -> nvfp4_megatron.runtime  (not the standard library's `platform`)
#   NVFP4Tensor / MXTensor / FP8Tensor / FP8BlockTensor / AbsmaxE2M1Tensor
#     -> NVFP4Quantized / MXQuantized / FP8Quantized / FP8BlockQuantized / AbsmaxE2M1Quantized
#     (frozen dataclasses of codes + scales, not tensor subclasses like TE's / torchao's)
#   "backend" keeps one meaning, the recipe backend (precision.backend: te | emulated | auto):
#     the GEMM level says "kernel" (quant.gemm.select_backend -> select_gemm_kernel, the
#     precision table's per-GEMM column), the process group says "comm library"
#     (DistInfo.backend -> DistInfo.comm_library: nccl | gloo).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"

move() {  # git mv SRC DST unless already moved; a SRC left by a merge is merged into DST
  local src=$1 dst=$2
  if [ -d "$src" ] && [ ! -d "$dst" ]; then
    git mv "$src" "$dst"
  elif [ -d "$src" ] && [ -d "$dst" ]; then
    for f in $(git ls-files "$src"); do
      local rel=${f#"$src"/}
      mkdir -p "$(dirname "$dst/$rel")"
      git mv -f "$f" "$dst/$rel"
    done
    find "$src" -depth -type d -empty -delete 2>/dev/null || true
  fi
}
move nvfp4_megatron/megatron nvfp4_megatron/mcore
move nvfp4_megatron/platform nvfp4_megatron/runtime
move tests/platform tests/runtime

# every tracked text file that can name a module, type or path
mapfile -t FILES < <(git ls-files -- '*.py' '*.md' '*.yaml' '*.yml' '*.sh' '*.toml' '*.cfg' \
  '*.txt' '*.sbatch' '*.slurm' 'slurm/*' 'configs/*' 'recipes/*' \
  | grep -v '^scripts/dev/rename_19.sh$' | while read -r f; do [ -f "$f" ] && echo "$f"; done)
[ ${#FILES[@]} -gt 0 ] || exit 0

# lines that name other projects' types (torchao's NVFP4Tensor / MXTensor) or say what a name
# was are left alone
KEEP='torchao|\(was |\(were '
sed -i -E \
  -e "/$KEEP/!"'s/nvfp4_megatron([./])megatron\b/nvfp4_megatron\1mcore/g' \
  -e "/$KEEP/!"'s/nvfp4_megatron([./])platform\b/nvfp4_megatron\1runtime/g' \
  -e 's#tests/platform\b#tests/runtime#g' \
  -e 's#(^|[^A-Za-z0-9_./])megatron/(spec_provider|attention|norm|backend|context_parallel|te_adapter|hybrid_spec|mamba_mixer|policy|layers)\b#\1mcore/\2#g' \
  -e 's#(^|[^A-Za-z0-9_./])platform/(cpu_adapter|distributed|gpu_fastpaths|warnings_filter)\b#\1runtime/\2#g' \
  -e 's#^(  )megatron/( +)#\1mcore/   \2#' \
  -e 's#^(  )platform/( +)#\1runtime/    #' \
  -e "/$KEEP/!"'s/\bNVFP4Tensor\b/NVFP4Quantized/g' \
  -e "/$KEEP/!"'s/\bFP8BlockTensor\b/FP8BlockQuantized/g' \
  -e "/$KEEP/!"'s/\bFP8Tensor\b/FP8Quantized/g' \
  -e "/$KEEP/!"'s/\bAbsmaxE2M1Tensor\b/AbsmaxE2M1Quantized/g' \
  -e "/$KEEP/!"'s/\bMXTensor\b/MXQuantized/g' \
  -e 's/\bselect_backend\b/select_gemm_kernel/g' \
  -e 's/\b_gemm_backend\b/_gemm_kernel/g' \
  -e 's/\bgemm_backends\b/gemm_kernels/g' \
  "${FILES[@]}"

# prose in the architecture map
sed -i -E -e 's/`megatron\/`/`mcore\/`/g' -e 's/`platform\/`/`runtime\/`/g' \
  -e 's/^## megatron$/## mcore/' -e 's/^## platform$/## runtime/' \
  -e 's/ssm < megatron < parallel < platform </ssm < mcore < parallel < runtime </' docs/ARCHITECTURE.md

sed -i -E -e 's/``megatron`` \(layer specs/``mcore`` (layer specs/' \
  -e 's/``platform`` \(distributed/``runtime`` (distributed/' nvfp4_megatron/__init__.py

# the process-group meaning: DistInfo.backend -> DistInfo.comm_library
sed -i -E \
  -e 's/^(    )backend: str$/\1comm_library: str  # "nccl" | "gloo"/' \
  -e 's/^(        )backend=dist\.get_backend\(\),$/\1comm_library=dist.get_backend(),/' \
  nvfp4_megatron/runtime/distributed.py
{ grep -rl --include='*.py' 'info\.backend\b' nvfp4_megatron scripts tests 2>/dev/null || true; } \
  | xargs -r sed -i -E 's/\binfo\.backend\b/info.comm_library/g'

# the layering test names the subpackages
sed -i -E 's/"ssm", "megatron", "parallel", "platform"/"ssm", "mcore", "parallel", "runtime"/' \
  tests/test_layering.py
echo "rename_19: done ($(git status --porcelain | wc -l) paths changed)"
