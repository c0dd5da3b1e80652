#!/usr/bin/env bash
# Runs the fuzz targets (fuzz/fuzz_targets) with cargo-fuzz on the nightly toolchain.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# SECONDS per target (default 60); every target unless named. Each target first replays
# its regression inputs (fuzz/regressions/TARGET: every crash found so far), then fuzzes
# from the committed seeds (fuzz/seeds/TARGET) and the corpus it grew before
# (fuzz/corpus/TARGET, not committed; kept between runs on this machine). A crash stops the
# run with a failure and leaves its input in fuzz/artifacts/TARGET: minimise it
# (cargo +nightly fuzz tmin), add it to fuzz/regressions/TARGET with the fix.
# The run's totals (runs, seconds) go to fuzz/runs.log, for docs/fuzzing.md.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(pipeline connection params access)
fi

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo +nightly install cargo-fuzz --locked --version 0.13.2
fi
cargo +nightly fuzz build

for target in "${targets[@]}"; do
    mkdir -p "corpus/$target" "regressions/$target"
    if ls "regressions/$target"/* >/dev/null 2>&1; then
        cargo +nightly fuzz run "$target" "regressions/$target" -- -runs=0
    fi
    log=$(mktemp)
    # -rss_limit_mb: the targets' inputs are small; a leak shows as a failure.
    seeds=()
    if [ -d "seeds/$target" ]; then
        seeds=("seeds/$target")
    fi
    set +e
    cargo +nightly fuzz run "$target" "corpus/$target" "${seeds[@]}" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 > "$log" 2>&1
    status=$?
    set -e
    grep -E '^(#[0-9]+ +DONE|==[0-9]+==|SUMMARY|.*panicked)|^stat::' "$log" || true
    [ "$status" -ne 0 ] && tail -40 "$log"
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    echo "$(date -u +%FT%TZ) $target seconds=$seconds runs=${runs:-?} exit=$status" >> runs.log
    rm -f "$log"
    if [ "$status" -ne 0 ]; then
        echo "fuzz target $target failed: see fuzz/artifacts/$target" >&2
        exit "$status"
    fi
done
