#!/usr/bin/env bash
# A local Kafka-protocol broker for tests and demos: noida-db (see ../shared/notes/kafka-broker.md
# for why this one). Riffle itself only needs a bootstrap address; this script provides one on
# machines that have no Kafka of their own.
#
#   scripts/kafka-broker.sh install          # cargo install noida-db (idempotent)
#   scripts/kafka-broker.sh start [PORT]     # start on 127.0.0.1:PORT (default 29092), wait until ready
#   scripts/kafka-broker.sh stop [PORT]      # SIGTERM it and wait until it is gone
#   scripts/kafka-broker.sh reset [PORT]     # stop it and delete everything it holds
#
# The broker keeps its data and log under ${RIFFLE_BROKER_DIR:-$HOME/.cache/riffle-broker}/PORT,
# from one start to the next. noida-db holds all of its data in memory, so data that only grows
# (topics of benchmarks and soak runs) ends with the broker killed for memory: `start` warns
# when the data passes 2 GB, and `reset` empties it.
set -euo pipefail

version=0.2.3
port=${2:-29092}
base=${RIFFLE_BROKER_DIR:-$HOME/.cache/riffle-broker}/$port
bin=$(command -v noida-db || echo "$HOME/.cargo/bin/noida-db")

ready() { (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; }

case "${1:-}" in
install)
    if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "$version"; then
        exit 0
    fi
    echo "kafka broker: installing noida-db $version (a few minutes, once)" >&2
    # Its own target directory: never contend with the workspace build's lock.
    CARGO_TARGET_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/noida-target" \
        cargo install noida-db --version "$version" --locked --no-default-features --features kafka >&2
    ;;
start)
    "$0" install
    if ready; then
        echo "kafka broker: something already listens on 127.0.0.1:$port" >&2
        exit 0
    fi
    mkdir -p "$base"
    if [ -d "$base/data" ]; then
        mb=$(du -sm "$base/data" | cut -f1)
        if [ "$mb" -gt 2048 ]; then
            echo "kafka broker: warning: it holds $((mb / 1024)) GB of data in $base/data, all of" \
                "which noida-db keeps in memory; '$0 reset $port' deletes it" >&2
        fi
    fi
    nohup "$bin" start --only kafka --host 127.0.0.1 --kafka-port "$port" --data-dir "$base/data" \
        >"$base/broker.log" 2>&1 &
    echo $! >"$base/pid"
    for _ in $(seq 1 300); do
        if ready; then
            echo "kafka broker: ready on 127.0.0.1:$port (log $base/broker.log)" >&2
            exit 0
        fi
        if ! kill -0 "$(cat "$base/pid")" 2>/dev/null; then
            echo "kafka broker: exited during start-up; its log:" >&2
            tail -20 "$base/broker.log" >&2
            exit 1
        fi
        sleep 0.1
    done
    echo "kafka broker: not ready after 30 s" >&2
    exit 1
    ;;
stop)
    if [ -f "$base/pid" ]; then
        pid=$(cat "$base/pid")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        # Not gone in 10 s (a broker holding gigabytes may take longer to shut down): kill it,
        # and wait until it is gone, so that the port is free and `reset` deletes no data
        # from under it.
        kill -9 "$pid" 2>/dev/null || true
        while kill -0 "$pid" 2>/dev/null; do
            sleep 0.1
        done
        rm -f "$base/pid"
    fi
    ;;
reset)
    "$0" stop "$port"
    rm -rf "$base/data"
    echo "kafka broker: data deleted ($base/data)" >&2
    ;;
*)
    echo "usage: $0 install|start|stop|reset [PORT]" >&2
    exit 2
    ;;
esac
