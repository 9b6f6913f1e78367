#!/usr/bin/env bash
# Put back into .compile_cache/ (git-ignored) the torch.compile cache artifacts a device call of
# benchmarks/gpu_compile.sh handed back in its $OUT (compile-*.bin.gz.partNN), so that the next
# call, carrying .compile_cache, resumes the compile where the last one stopped:
#   bash benchmarks/gpu_compile_cache.sh /work/.device/N      (the call's files_at)
set -euo pipefail
cd "$(dirname "$0")/.."
src="${1:?usage: gpu_compile_cache.sh FILES_AT}"
mkdir -p .compile_cache
for first in "$src"/*.bin.gz.part00; do
  [ -e "$first" ] || { echo "no compile-*.bin.gz.part00 in $src"; exit 1; }
  name=$(basename "$first" .part00)
  cat "$src/$name".part?? > ".compile_cache/$name"
  gzip -t ".compile_cache/$name"
  echo ".compile_cache/$name ($(du -h ".compile_cache/$name" | cut -f1))"
done
du -sh .compile_cache
# `run` carries 64 MiB at most: .whl/ (~44 MB, av the most of it) and this together
total=$(du -scm .whl .compile_cache 2>/dev/null | tail -1 | cut -f1)
if [ "$total" -gt 60 ]; then
  echo "warning: .whl + .compile_cache = ${total} MiB: over what a call carries; for a" \
    "compile-only call (PLAN=compile) move .whl/av-*.whl aside (the compile does not decode)"
fi
