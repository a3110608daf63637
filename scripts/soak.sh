#!/usr/bin/env bash
# Soak test: MINUTES (default 60) at RATE events/s (default 100000) from Kafka through a
# windowed query with a Wasm UDF inside an aggregate into the exactly-once Kafka sink, against
# a local broker. Every minute it samples riffle's resident memory, open files, and the state
# rows and bytes of the latest epoch into soak.csv, then draws soak.png and prints the numbers.
# Memory must stay bounded: the script fails if the last 20 % of the run holds more than 1.5x
# the RSS of the first sample taken after the first five minutes.
#
#   scripts/soak.sh [MINUTES] [RATE]
#
# Event time advances with wall time (RATE events per second of event time), so windows close
# and state is freed as the run goes: what grows without bound is a leak.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
minutes=${1:-60}
rate=${2:-100000}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"
dir="${RIFFLE_SOAK_DIR:-$CARGO_TARGET_DIR/soak}"
port=${RIFFLE_SOAK_PORT:-29193}
bootstrap=127.0.0.1:$port

echo "==> building the UDFs and riffle; matplotlib for the plot" >&2
wasm_dir=$(scripts/build-udfs.sh --except fraud_model_tract)
cargo build -q -p riffle --bin riffle
riffle="$CARGO_TARGET_DIR/debug/riffle"
python3 -c "import matplotlib" 2>/dev/null || python3 -m pip install --quiet matplotlib >&2

rm -rf "$dir"
mkdir -p "$dir"
export RIFFLE_BROKER_DIR="$dir/broker"
scripts/kafka-broker.sh start "$port"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    scripts/kafka-broker.sh stop "$port" || true
}
trap cleanup EXIT

cp "$wasm_dir/riffle_udfs_fraud.wasm" "$dir/"
cat >"$dir/soak.toml" <<TOML
query = """
SELECT window(ts, '1 minute') AS window, country,
       count(*) AS transactions, sum(amount) AS total,
       max(risk_score(amount, country)) AS worst_risk
FROM transactions
GROUP BY window(ts, '1 minute'), country
"""
output_mode = "append"

[source]
name = "transactions"
event_time = "ts"
watermark = "10 seconds"

[source.stream]
kind = "kafka"
bootstrap = "$bootstrap"
topic = "soak-in"
schema = "tx_id BIGINT NOT NULL, ts TIMESTAMP NOT NULL, card_id BIGINT NOT NULL, merchant_id BIGINT NOT NULL, amount DOUBLE, country VARCHAR, channel VARCHAR NOT NULL, email VARCHAR, lat DOUBLE NOT NULL, lon DOUBLE NOT NULL, home_lat DOUBLE NOT NULL, home_lon DOUBLE NOT NULL, is_fraud BOOLEAN NOT NULL"

[[udfs]]
path = "riffle_udfs_fraud.wasm"

[sink.stream]
kind = "kafka"
bootstrap = "$bootstrap"
topic = "soak-out"

[stream]
checkpoint = "checkpoint"
trigger = "processing-time"
interval = "1 second"
max_rows_per_epoch = $((rate * 2))
progress = "progress.jsonl"
TOML

rows=$((minutes * 60 * rate + 30 * rate))
echo "==> producing $rows transactions at $rate/s, streaming them through soak.toml" >&2
# Records older than a minute go (the test broker keeps its log in memory); a query that fell
# that far behind would stop with a data-loss error.
"$riffle" produce --bootstrap "$bootstrap" --topic soak-in --rows "$rows" --rate "$rate" \
    --events-per-second "$rate" --retention "1 minute" >"$dir/produce.log" 2>&1 &
pids+=($!)
sleep 2
(cd "$dir" && exec "$riffle" run soak.toml --mode stream --quiet 2>"$dir/riffle.log") &
riffle_pid=$!
pids+=($riffle_pid)

echo "minute,rss_kib,open_files,state_rows,state_bytes,epoch,input_rows_per_second" >"$dir/soak.csv"
for ((m = 0; m <= minutes; m++)); do
    if ! kill -0 "$riffle_pid" 2>/dev/null; then
        echo "riffle exited early; its log:" >&2
        tail -20 "$dir/riffle.log" >&2
        exit 1
    fi
    rss=$(awk '/^VmRSS/ { print $2 }' "/proc/$riffle_pid/status")
    fds=$(ls "/proc/$riffle_pid/fd" | wc -l)
    last=$(tail -n 1 "$dir/progress.jsonl" 2>/dev/null || echo '{}')
    state=$(echo "$last" | python3 -c '
import json, sys
d = json.loads(sys.stdin.read() or "{}")
s = d.get("state", {})
print(s.get("rows", 0), s.get("bytes", 0), d.get("epoch", 0), round(d.get("input_rows_per_second", 0)), sep=",")')
    echo "$m,$rss,$fds,$state" >>"$dir/soak.csv"
    printf '    minute %d: RSS %d MiB, %d open files, state rows,bytes,epoch,rows/s %s\n' \
        "$m" $((rss / 1024)) "$fds" "$state" >&2
    [ "$m" -lt "$minutes" ] && sleep 60
done

python3 - "$dir/soak.csv" "$dir/soak.png" <<'PY'
import csv, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
rows = list(csv.DictReader(open(sys.argv[1])))
m = [int(r["minute"]) for r in rows]
fig, ax = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
ax[0].plot(m, [int(r["rss_kib"]) / 1024 for r in rows]); ax[0].set_ylabel("RSS (MiB)")
ax[1].plot(m, [int(r["open_files"]) for r in rows]); ax[1].set_ylabel("open files")
ax[2].plot(m, [int(r["state_bytes"]) / 1024 for r in rows]); ax[2].set_ylabel("state (KiB)")
ax[2].set_xlabel("minute")
fig.suptitle("riffle soak: windowed query + Wasm UDF + exactly-once Kafka sink")
fig.tight_layout(); fig.savefig(sys.argv[2], dpi=100)
PY
python3 - "$dir/soak.csv" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
rss = [int(r["rss_kib"]) for r in rows]
base = next((int(r["rss_kib"]) for r in rows if int(r["minute"]) >= 5), rss[-1])
tail = rss[int(len(rss) * 0.8):]
print(f"RSS MiB: first {rss[0]/1024:.0f}, after 5 min {base/1024:.0f}, max {max(rss)/1024:.0f}, "
      f"last {rss[-1]/1024:.0f}; open files max {max(int(r['open_files']) for r in rows)}; "
      f"state bytes max {max(int(r['state_bytes']) for r in rows)}; "
      f"epochs {rows[-1]['epoch']}")
if max(tail) > 1.5 * base:
    sys.exit(f"memory grew: {max(tail)/1024:.0f} MiB late in the run vs {base/1024:.0f} MiB")
PY
echo "soak: $dir/soak.csv, $dir/soak.png" >&2
