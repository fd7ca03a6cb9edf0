#!/usr/bin/env bash
# Builds and runs the sparse MLA dev bench (see sparse_mla_dev.cu). From the
# repo root: dev/sparse_mla/run.sh [DEPS_DIR] [iters] [rounds]
# Extra nvcc flags in $DEV_FLAGS (e.g. -DDSA_DEV_CANDIDATE=\"path/to/candidate.cuh\").
set -euo pipefail
deps=${1:-.device-deps}
out=${OUT:-/tmp}/sparse_mla_dev
inc=(-Iinclude -Isrc -Idev/sparse_mla)
[[ -d "$deps/include" ]] && inc+=(-isystem "$deps/include" -DFMT_HEADER_ONLY)
nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -lineinfo --expt-relaxed-constexpr \
  -Xptxas=-v,-warn-spills,-warn-lmem-usage ${DEV_FLAGS:-} "${inc[@]}" \
  dev/sparse_mla/sparse_mla_dev.cu -o "$out" 2> "$out.ptxas.log" || { cat "$out.ptxas.log"; exit 1; }
grep -E "spill|Local|sparse_mla_fwd|Used" "$out.ptxas.log" | grep -B1 -E "spill|lmem|Local" | head -20 || true
"$out" "${2:-10}" "${3:-3}"
if [[ -n "${SASS_GREP:-}" ]]; then
  cuobjdump -sass "$out" > "$out.sass"
  python3 - "$out.sass" "$SASS_GREP" <<'PY'
import sys,re
lines=open(sys.argv[1]).read().split('\n')
cur=None; out=[]
for i,l in enumerate(lines):
    if 'Function :' in l: cur=l
    if cur and sys.argv[2] in cur and re.search(r'\b(STL|LDL)\b', l):
        ctx=[x.strip()[:70] for x in lines[max(0,i-8):i+2] if not x.strip().startswith("/* 0x")]
        out.append(cur.strip()[-60:]+'\n   '+'\n   '.join(ctx))
print('\n'.join(out[:6]))
PY
fi
