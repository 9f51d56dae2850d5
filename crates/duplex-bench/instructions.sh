#!/usr/bin/env bash
# Instructions a proxy's own process executes per plain HTTP request, or per WebSocket
# handshake cycle, in user space, counted by valgrind's callgrind (Debian's valgrind).
#
#   crates/duplex-bench/instructions.sh                  # target/release/duplex, built first
#   crates/duplex-bench/instructions.sh /tmp/duplex-old  # any duplex binary
#   crates/duplex-bench/instructions.sh nginx            # nginx, one process (no master)
#   crates/duplex-bench/instructions.sh nginx handshakes # connect, upgrade, echo, close
#
# With PROFILE=FILE set, the larger run's callgrind profile is kept there, to read with
# `callgrind_annotate --inclusive=yes FILE`.
#
# Timings on this machine move by 10-20% from run to run, so a change to the HTTP path
# worth a few percent of duplex's own work cannot be seen in requests per second. An
# instruction count can: it does not depend on what else the machine does. The proxy
# runs under callgrind (one thread), the echo backend beside it, and a Python client
# sends N1 and then, in a second run, N2 requests over 10 keep-alive connections (or
# handshake cycles from 10 loops, as the benchmark's `handshakes` makes them); the
# difference between the two totals, divided by N2 - N1, is the cost of one operation
# without start-up and shutdown. Kernel work and the backend are not counted. Loopback
# only; every process is stopped at the end; a run takes about a minute.
set -euo pipefail
cd "$(dirname "$0")/../.."

proxy=${1:-}
mode=${2:-http}
case "$mode" in
    http) N1=2000 N2=8000 ;;
    handshakes) N1=500 N2=2000 ;;
    *) echo "instructions.sh: the mode is http or handshakes, not $mode" >&2; exit 2 ;;
esac
if [ -z "$proxy" ]; then
    cargo build --release -p duplex
    proxy=target/release/duplex
fi
cargo build --release -p duplex-bench
command -v valgrind >/dev/null || { echo "instructions.sh: needs valgrind" >&2; exit 1; }
CONNS=10

work=$(mktemp -d)
. crates/duplex-bench/procs.sh
trap 'stop; rm -rf "$work"' EXIT

cat >"$work/client.py" <<'EOF'
import http.client, os, socket, sys, threading
port, n, conns, mode = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
failed = []
def frame(opcode, payload):
    # A masked client frame (mask 0, so the payload goes as it is).
    return bytes([0x80 | opcode, 0x80 | len(payload), 0, 0, 0, 0]) + payload
def read_exact(s, n):
    b = b""
    while len(b) < n:
        got = s.recv(n - len(b))
        if not got:
            raise EOFError("closed early")
        b += got
    return b
def cycle():
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        got = s.recv(4096)
        if not got:
            raise EOFError("closed during the handshake")
        head += got
    if not head.startswith(b"HTTP/1.1 101"):
        raise ValueError(head[:40])
    rest = head.split(b"\r\n\r\n", 1)[1]
    msg = b"handshake cycle!"
    s.sendall(frame(2, msg))
    echo = rest + read_exact(s, 2 + len(msg) - len(rest))
    if echo[2:] != msg:
        raise ValueError("wrong echo")
    s.sendall(frame(8, (1000).to_bytes(2, "big")))
    read_exact(s, 4)
    while s.recv(256):
        pass
    s.close()
def run():
    if mode == "handshakes":
        for _ in range(n // conns):
            try:
                cycle()
            except Exception as e:
                failed.append(repr(e))
        return
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for _ in range(n // conns):
        c.request("GET", "/")
        r = c.getresponse()
        r.read()
        if r.status != 200:
            failed.append(r.status)
ts = [threading.Thread(target=run) for _ in range(conns)]
for t in ts: t.start()
for t in ts: t.join()
sys.exit(f"{len(failed)} requests failed: {failed[:5]}" if failed else 0)
EOF

# Runs the proxy under callgrind for `n` requests; prints the instructions counted.
count() {
    local n=$1 backend listen admin
    backend=$(port); listen=$(port); admin=$(port)
    target/release/duplex-bench echo --listen "127.0.0.1:$backend" >"$work/echo.log" 2>&1 &
    pids+=($!)
    local run
    if [ "$proxy" = nginx ]; then
        target/release/duplex-bench config nginx "127.0.0.1:$listen" "127.0.0.1:$backend" \
            --dir "$work" | sed 's/^master_process on;/master_process off;/' >"$work/nginx.conf"
        run=(nginx -p "$work" -c "$work/nginx.conf")
    else
        target/release/duplex-bench config duplex "127.0.0.1:$listen" "127.0.0.1:$backend" \
            --admin "127.0.0.1:$admin" >"$work/duplex.yaml"
        run=("$proxy" run --threads 1 --no-watch -c "$work/duplex.yaml")
    fi
    valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" "${run[@]}" \
        >"$work/proxy.log" 2>&1 &
    local proxy_pid=$!
    pids+=("$proxy_pid")
    local up=
    for _ in $(seq 150); do
        if python3 -c "import socket; socket.create_connection(('127.0.0.1', $listen), 1)" 2>/dev/null; then
            up=1
            break
        fi
        sleep 0.2
    done
    [ -n "$up" ] || { echo "instructions.sh: the proxy did not start:" >&2; tail -n 5 "$work/proxy.log" >&2; exit 1; }
    timeout 300 python3 "$work/client.py" "$listen" "$n" "$CONNS" "$mode"
    kill -TERM "$proxy_pid"
    reap "$proxy_pid" 120  # callgrind writes its profile as the proxy exits
    stop
    pids=()
    awk '/^summary:/{print $2}' "$work/cg.out"
}

# In this shell, not a $(...) subshell: so that a failure stops the script and the
# EXIT trap sees every process started.
count $N1 >"$work/i1"
count $N2 >"$work/i2"
if [ -n "${PROFILE:-}" ]; then cp "$work/cg.out" "$PROFILE"; fi
i1=$(cat "$work/i1")
i2=$(cat "$work/i2")
python3 - "$i1" "$i2" "$N1" "$N2" "$proxy" "$mode" <<'EOF'
import sys
i1, i2, n1, n2 = (int(x) for x in sys.argv[1:5])
what = {"http": "HTTP request", "handshakes": "handshake cycle"}[sys.argv[6]]
print(f"{sys.argv[5]}: {(i2 - i1) / (n2 - n1):,.0f} instructions per {what} in its user space"
      f" ({n1}: {i1:,}; {n2}: {i2:,})")
EOF
