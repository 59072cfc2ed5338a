#!/usr/bin/env bash
# Prepare Transformer Engine for the lent H200 (issue 17 item 5), on the CPU host, in the checkout
# whose working tree the device tool sends (DEST, default: this script's repository root).
#
#   DEST=/work/main bash scripts/te_h200/split.sh
#
# 1. downloads (pip download, manylinux x86_64 / CPython 3.12) into $SCRATCH: the TE core wheel
#    transformer_engine_cu13 (the image's torch is 2.11.0+cu130), the transformer_engine meta wheel,
#    the Python deps the image lacks (pydantic 2 and its deps; typing_extensions >= 4.16 for
#    pydantic), the transformer_engine_torch sdist, and the `wheel` package (build fallback);
# 2. writes DEST/.te0 (small files) and DEST/.te1 .. .teN: consecutive byte ranges of the core wheel,
#    each sized so that the tree + what that call carries stays under LIMIT_MIB (default 58 of the
#    tool's 64 MiB): call 1 carries .te0+.te1, calls 2..N-1 .teK, the last call .whl+.teN;
# 3. writes .te0/MANIFEST and .te0/SHA256SUMS (every part and .te0 file; the whole wheel's sha256
#    is in MANIFEST) and adds /.te0/ .. /.teN/ to DEST's .git/info/exclude;
# 4. prints the per-call sizes and the call plan (scripts/te_h200/README.md).
# A transformer_engine_torch wheel built on a CPU host with the image's torch (TE_TORCH_WHL=path)
# goes into .te0/whl as the fallback if the H200 build fails.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
DEST=${DEST:-$(git -C "$HERE" rev-parse --show-toplevel)}
SCRATCH=${SCRATCH:-/tmp/te_h200_dl}
PIP_PY=${PIP_PY:-$DEST/.venv/bin/python}   # any Python 3.12 with pip and torch (sdist metadata)
TE_VERSION=${TE_VERSION:-2.18.0}
CUDA_MAJOR=${CUDA_MAJOR:-13}
LIMIT_MIB=${LIMIT_MIB:-58}
PLAT=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64)
DEPS=(pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
      typing-extensions==4.16.0)

mkdir -p "$SCRATCH"/{core,whl,sdist,build}
"$PIP_PY" -m pip download -q --progress-bar off --no-deps --only-binary=:all: "${PLAT[@]}" -d "$SCRATCH/core" \
  "transformer_engine_cu${CUDA_MAJOR}==$TE_VERSION"
"$PIP_PY" -m pip download -q --progress-bar off --no-deps --only-binary=:all: "${PLAT[@]}" -d "$SCRATCH/whl" \
  "transformer_engine==$TE_VERSION" "${DEPS[@]}"
"$PIP_PY" -m pip download -q --progress-bar off --no-deps --only-binary=:all: "${PLAT[@]}" -d "$SCRATCH/build" wheel==0.48.0
# the sdist: pip prepares its metadata with setup.py, which imports torch (hence PIP_PY with torch)
"$PIP_PY" -m pip download -q --progress-bar off --no-deps --no-build-isolation --no-binary=:all: -d "$SCRATCH/sdist" \
  "transformer_engine_torch==$TE_VERSION"

rm -rf "$DEST"/.te[0-9] "$DEST"/.te[0-9][0-9]
mkdir -p "$DEST/.te0"
cp -r "$SCRATCH/whl" "$SCRATCH/sdist" "$SCRATCH/build" "$DEST/.te0/"
if [ -n "${TE_TORCH_WHL:-}" ]; then cp "$TE_TORCH_WHL" "$DEST/.te0/whl/"; fi

TE_VERSION=$TE_VERSION LIMIT_MIB=$LIMIT_MIB CORE_DIR="$SCRATCH/core" DEST="$DEST" python3 - <<'EOF'
import glob, hashlib, os, subprocess
from pathlib import Path

dest = Path(os.environ["DEST"]); MiB = 1 << 20
limit = int(float(os.environ["LIMIT_MIB"]) * MiB)
wheel = Path(sorted(glob.glob(os.path.join(os.environ["CORE_DIR"], "*.whl")))[-1])
size = wheel.stat().st_size

def du(paths):
    return sum(p.stat().st_size for q in paths for p in ([q] if q.is_file() else q.rglob("*"))
               if p.is_file())

git = ["git", "-C", str(dest)]
tracked = subprocess.run(git + ["ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True).stdout.split(b"\0")
files = [dest / f.decode() for f in tracked if f]
files = [p for p in files if not p.relative_to(dest).parts[0].startswith(".te")]  # ours
tree = sum(p.stat().st_size for p in files if p.is_file() and not p.is_symlink())
te0 = du([dest / ".te0"]) + 65536   # + MANIFEST and SHA256SUMS, written below
whl = du([dest / ".whl"]) if (dest / ".whl").exists() else 0
# room for chunk bytes in each of n calls: call 1 also carries .te0, the last one also .whl
def room(n):
    if n == 1:
        return [limit - tree - te0 - whl]
    return [limit - tree - te0] + [limit - tree] * (n - 2) + [limit - tree - whl]

n = 1
while sum(room(n)) < size:
    n += 1
    if n > 64 or room(n)[0] <= 0:
        raise SystemExit(f"LIMIT_MIB={limit / MiB} leaves no room for chunks (tree "
                         f"{tree / MiB:.1f} MiB, .te0 {te0 / MiB:.1f} MiB)")
even = -(-size // n)
if all(even <= r for r in room(n)):      # equal parts where they fit
    caps = [even] * (n - 1) + [size - even * (n - 1)]
else:                                    # else fill the calls in order (the last takes the rest)
    caps, left = [], size
    for r in room(n):
        caps.append(min(r, left)); left -= caps[-1]
sums, off = [], 0
with open(wheel, "rb") as f:
    for i, cap in enumerate(caps, 1):
        data = f.read(cap)
        d = dest / f".te{i}"; d.mkdir()
        part = d / f"{wheel.name}.part{i}"
        part.write_bytes(data)
        sums.append((hashlib.sha256(data).hexdigest(), f".te{i}/{part.name}"))
        off += len(data)
assert off == size
for p in sorted((dest / ".te0").rglob("*")):
    if p.is_file():
        sums.append((hashlib.sha256(p.read_bytes()).hexdigest(), str(p.relative_to(dest))))
whole = hashlib.sha256(wheel.read_bytes()).hexdigest()
(dest / ".te0" / "MANIFEST").write_text(f"WHEEL={wheel.name}\nNPARTS={n}\nWHEEL_SHA256={whole}\n")
(dest / ".te0" / "SHA256SUMS").write_text("".join(f"{h}  {p}\n" for h, p in sums))

gitdir = Path(subprocess.run(git + ["rev-parse", "--absolute-git-dir"], capture_output=True,
                             text=True, check=True).stdout.strip())
excl = gitdir / "info" / "exclude"
lines = excl.read_text().splitlines() if excl.exists() else []
for i in range(0, n + 1):
    if f"/.te{i}/" not in lines:
        lines.append(f"/.te{i}/")
excl.write_text("\n".join(lines) + "\n")
te0 = du([dest / ".te0"])

print(f"core wheel {wheel.name}: {size:,} bytes ({size / MiB:.1f} MiB), sha256 {whole}")
print(f"tree that travels with every call: {tree / MiB:.2f} MiB; .te0 {te0 / MiB:.2f} MiB; "
      f".whl {whl / MiB:.2f} MiB; limit used {limit / MiB:.0f} MiB (tool: 64)")
for i in range(1, n + 1):
    carry = ([".te0"] if i == 1 else []) + ([".whl"] if i == n else []) + [f".te{i}"]
    total = tree + du([dest / c for c in carry])
    print(f"call {i}/{n}: carry {carry}  travels {total / MiB:.1f} MiB")
    assert total <= limit, (i, total)
names = [f".te{i}" for i in range(n + 1)]
ignored = subprocess.run(git + ["check-ignore"] + names, capture_output=True, text=True).stdout.split()
print("ignored by git: " + ("all" if sorted(ignored) == sorted(names) else
                            f"NOT {sorted(set(names) - set(ignored))} (check .git/info/exclude)"))
EOF
