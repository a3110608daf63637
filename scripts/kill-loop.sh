#!/usr/bin/env bash
# Crash proof, the long way: runs the per-card features pipeline (OVER windows over one stream,
# an interval join with a second) in stream mode and kills it with SIGKILL at random moments,
# KILLS times, restarting it from its checkpoint each time; then lets it finish and checks that
# its output equals the batch run over the same rows, row for row (duplicates included).
#
#   scripts/kill-loop.sh [KILLS] [ROWS] [EPOCH_ROWS]
#       (default 50 kills, 2000000 transactions, epochs of at most 200 rows per source: many
#       small epochs, so that kills land in every step of the epoch protocol)
#
# Prints how many kills landed while the query was still working (a kill after the query
# finished is not counted) and exits non-zero if the outputs differ.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
kills=${1:-50}
rows=${2:-2000000}
epoch_rows=${3:-200}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"
dir="${RIFFLE_KILL_DIR:-$CARGO_TARGET_DIR/kill-loop}"

echo "==> building the UDFs and riffle" >&2
wasm_dir=$(scripts/build-udfs.sh --except fraud_model_tract)
cargo build -q -p riffle --bin riffle
riffle="$CARGO_TARGET_DIR/debug/riffle"

echo "==> generating $rows transactions and $((rows * 2 / 5)) logins" >&2
rm -rf "$dir"
mkdir -p "$dir"
cp "$wasm_dir/riffle_udfs_fraud.wasm" "$dir/"
"$riffle" generate fraud --rows "$rows" --events-per-second 2 --cards 2000 \
    --out "$dir/transactions-features.parquet" >/dev/null
"$riffle" generate fraud --seed 7 --rows $((rows * 2 / 5)) --events-per-second 0.8 \
    --cards 2000 --out "$dir/logins.parquet" >/dev/null
sed -e "s/rows = 100000/rows = $rows/" -e "s/rows = 40000/rows = $((rows * 2 / 5))/" \
    -e "s/max_rows_per_epoch = 20000/max_rows_per_epoch = $epoch_rows/" \
    scripts/demo/fraud_features.toml >"$dir/features.toml"

# `exec`: the background job is riffle itself, so `kill -9 $!` kills the query.
run() { exec "$riffle" run "$dir/features.toml" --mode stream --quiet 2>>"$dir/stderr.log"; }

landed=0
finished=0
for ((i = 1; i <= kills; i++)); do
    run &
    pid=$!
    # A random moment between 0.1 and 3 seconds after the start.
    sleep "$(awk -v r="$RANDOM" 'BEGIN { printf "%.2f", 0.1 + (r % 290) / 100 }')"
    if kill -0 "$pid" 2>/dev/null; then
        kill -9 "$pid"
        wait "$pid" 2>/dev/null || true
        landed=$((landed + 1))
        printf '\r    kills landed: %d/%d' "$landed" "$kills" >&2
    else
        wait "$pid"
        finished=1
        break
    fi
done
echo >&2
if [ "$finished" = 0 ]; then
    echo "==> letting the query finish" >&2
    (run)
fi

echo "==> batch run over the same rows" >&2
"$riffle" run "$dir/features.toml" --mode batch --quiet 2>>"$dir/stderr.log"
counts=$("$riffle" sql --table "stream=$dir/stream-features" \
    --table "batch=$dir/batch-features.parquet" \
    "SELECT (SELECT count(*) FROM stream) AS stream_rows,
            (SELECT count(*) FROM batch) AS batch_rows,
            (SELECT count(*) FROM (SELECT * FROM stream EXCEPT ALL SELECT * FROM batch)) AS only_stream,
            (SELECT count(*) FROM (SELECT * FROM batch EXCEPT ALL SELECT * FROM stream)) AS only_batch")
echo "$counts"
IFS=, read -r _ stream_rows batch_rows only_stream only_batch _ \
    < <(echo "$counts" | grep '^|' | sed -n 2p | tr -d ' ' | tr '|' ',')
echo "kills landed: $landed of $kills; stream rows $stream_rows, batch rows $batch_rows," \
    "only in stream $only_stream, only in batch $only_batch"
[ "$stream_rows" = "$batch_rows" ] && [ "$only_stream" = 0 ] && [ "$only_batch" = 0 ]
