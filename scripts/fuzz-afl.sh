#!/usr/bin/env bash
# Coverage-guided fuzzing of every target with AFL++ (cargo-afl, on the stable
# toolchain), for a given time split over the targets:
#   scripts/fuzz-afl.sh [--seconds N] [--target T]...     (./dev fuzz --afl ...)
# Builds feedgraph-fuzz-afl with AFL's instrumentation in a target directory of its own
# (the instrumented code must not mix with the release build's), linking the release
# build's RocksDB archive instead of compiling RocksDB a second time; starts each
# target from its committed corpus (fuzz/corpus/T); writes AFL's output under
# fuzz/afl-out/T. Exits non-zero if any target found a crash (a panic, or an input past
# the time or memory bound: feedgraph_fuzz::check) or a hang.
# Needs a release build of the workspace first (./dev fuzz --afl does it).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=600
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds="$2"; shift 2 ;;
    --target) targets+=("$2"); shift 2 ;;
    *) echo "usage: scripts/fuzz-afl.sh [--seconds N] [--target T]..." >&2; exit 2 ;;
  esac
done

target_dir="${CARGO_TARGET_DIR:-target}"
afl_target_dir="${target_dir%/}-afl"
out_root="fuzz/afl-out"

# cargo-afl, at the version of the `afl` crate in Cargo.lock, and its AFL++ runtime.
afl_version=$(awk '/^name = "afl"$/ { getline; gsub(/[^0-9.]/, ""); print }' Cargo.lock)
if [ "$(cargo afl --version 2>/dev/null | awk '{ print $2 }')" != "$afl_version" ]; then
  echo "fuzz-afl: installing cargo-afl $afl_version" >&2
  cargo install --locked --quiet cargo-afl --version "$afl_version"
fi
if ! out=$(cargo afl config --build 2>&1); then
  # Built before for this toolchain: that is the one error to pass over.
  grep -q "already built" <<<"$out" || { echo "$out" >&2; exit 1; }
fi

# The release build's RocksDB (the newest, if the profile was built more than once).
rocksdb_lib=$(ls -t "$target_dir"/release/build/librocksdb-sys-*/out/librocksdb.a 2>/dev/null | head -1 || true)
if [ -z "$rocksdb_lib" ]; then
  echo "fuzz-afl: no release build of RocksDB under $target_dir; run cargo build --release --workspace first" >&2
  exit 1
fi
echo "fuzz-afl: building the instrumented harness in $afl_target_dir" >&2
CARGO_TARGET_DIR="$afl_target_dir" ROCKSDB_LIB_DIR="$(dirname "$rocksdb_lib")" ROCKSDB_STATIC=1 \
  cargo afl build --release --locked -p feedgraph-fuzz --features afl --bin feedgraph-fuzz-afl
harness="$afl_target_dir/release/feedgraph-fuzz-afl"

if [ ${#targets[@]} -eq 0 ]; then
  listed=$("$target_dir/release/feedgraph-fuzz" list) || { echo "fuzz-afl: feedgraph-fuzz list failed" >&2; exit 1; }
  mapfile -t targets < <(awk '{ print $1 }' <<<"$listed")
fi
[ ${#targets[@]} -gt 0 ] || { echo "fuzz-afl: no targets" >&2; exit 1; }
per_target=$(( seconds / ${#targets[@]} ))
[ "$per_target" -lt 10 ] && per_target=10

# No screen, no CPU frequency check (a VM has none to check), no core-dump setup demand.
export AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_AFFINITY=1
failed=0
printf '%-20s %10s %8s %8s %7s %6s %s\n' target execs "exec/s" corpus edges crash hang >&2
for t in "${targets[@]}"; do
  rm -rf "${out_root:?}/$t"
  mkdir -p "$out_root/$t"
  # -t: AFL's own hang bound, above check's 1 s, so a slow input is reported by check
  # (with its time) and only a true hang by AFL.
  cargo afl fuzz -i "fuzz/corpus/$t" -o "$out_root/$t" -V "$per_target" -t 3000 -- "$harness" "$t" \
    >"$out_root/$t/afl.log" 2>&1 || { echo "fuzz-afl: afl-fuzz failed on $t:" >&2; tail -20 "$out_root/$t/afl.log" >&2; exit 1; }
  stats="$out_root/$t/default/fuzzer_stats"
  [ -f "$stats" ] || { echo "fuzz-afl: afl-fuzz wrote no statistics for $t:" >&2; tail -20 "$out_root/$t/afl.log" >&2; exit 1; }
  field() { awk -F' *: *' -v k="$1" '$1 == k { print $2 }' "$stats"; }
  crashes=$(field saved_crashes); hangs=$(field saved_hangs)
  printf '%-20s %10s %8s %8s %7s %6s %s\n' "$t" "$(field execs_done)" "$(field execs_per_sec)" \
    "$(field corpus_count)" "$(field edges_found)" "$crashes" "$hangs" >&2
  if [ "$crashes" != 0 ] || [ "$hangs" != 0 ]; then failed=1; fi
done
if [ "$failed" -ne 0 ]; then
  echo "fuzz-afl: findings under $out_root/*/default/{crashes,hangs}; reproduce one with" >&2
  echo "  $target_dir/release/feedgraph-fuzz run TARGET FILE" >&2
  exit 1
fi
