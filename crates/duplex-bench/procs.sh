# Process helpers shared by cost.sh and instructions.sh (sourced, from the repository
# root). Each script adds the PIDs it starts to `pids`; `stop` ends them all, boundedly.

pids=()

# Waits for process $1 to end, at most $2 seconds, then kills it.
reap() {
    for _ in $(seq $(($2 * 10))); do
        kill -0 "$1" 2>/dev/null || break
        sleep 0.1
    done
    kill -9 "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

# Asks every started process to end, then reaps each within 10 s.
stop() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do reap "$p" 10; done
}

# A loopback port free right now.
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
