#!/usr/bin/env bash
# What one proxy costs per operation: CPU time, system calls and context switches per
# message, request or handshake, the share spent in user space, and what each CPU spent.
#
#   crates/duplex-bench/cost.sh duplex msgs64       # or: nginx | haproxy | direct
#   crates/duplex-bench/cost.sh nginx http 5        # repeat five times (default 3)
#   crates/duplex-bench/cost.sh haproxy msgs16k-pinned
#
# Scenarios msgs64, http and handshakes run the proxy, the echo backend and the load
# generator all on CPU 0, as in the benchmark's "one CPU" placement; msgs16k-pinned runs
# 16 KiB messages with the proxy alone on CPU 0 and the backend and load generator on
# CPU 1, as in the "pinned" placement, to show what the proxy costs the other CPU. After
# a 1.5 s warm-up, `perf stat` counts the proxy's task-clock, system calls and context
# switches for 3 s, /proc/PID/stat its user and system time, and /proc/stat how busy each
# CPU was; the load generator's rate turns those into figures per operation. `direct`
# (no proxy) gives the backend's and load generator's own cost. Needs perf (Debian's
# linux-perf), taskset, python3, nginx/haproxy for those targets and wrk for http.
# Loopback only; every process is bounded in time and stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."

usage="usage: cost.sh duplex|nginx|haproxy|direct msgs64|http|handshakes|msgs16k-pinned [repeats]"
proxy=${1:?$usage}
scenario=${2:?$usage}
repeats=${3:-3}
bin=target/release
cargo build --release -p duplex -p duplex-bench
ulimit -n "$(ulimit -Hn)"

work=$(mktemp -d)
fail() {
    echo "cost.sh: $1" >&2
    for f in "$work"/*.log; do echo "--- $f" >&2; tail -n 5 "$f" >&2; done
    exit 1
}
. crates/duplex-bench/procs.sh
trap 'stop; rm -rf "$work"' EXIT

# Where the proxy runs, and where the backend and the load generator run.
if [ "$scenario" = msgs16k-pinned ]; then peers=1; else peers=0; fi


for r in $(seq "$repeats"); do
    backend=$(port); listen=$(port); admin=$(port)
    taskset -c "$peers" "$bin/duplex-bench" echo --listen "127.0.0.1:$backend" >"$work/echo.log" 2>&1 &
    pids+=($!)
    case $proxy in
    duplex)
        "$bin/duplex-bench" config duplex "127.0.0.1:$listen" "127.0.0.1:$backend" \
            --admin "127.0.0.1:$admin" >"$work/duplex.yaml"
        taskset -c 0 "$bin/duplex" run --threads 1 --no-watch -c "$work/duplex.yaml" \
            >"$work/proxy.log" 2>&1 &
        ;;
    nginx)
        "$bin/duplex-bench" config nginx "127.0.0.1:$listen" "127.0.0.1:$backend" \
            --dir "$work" >"$work/nginx.conf"
        taskset -c 0 nginx -p "$work" -c "$work/nginx.conf" >"$work/proxy.log" 2>&1 &
        ;;
    haproxy)
        "$bin/duplex-bench" config haproxy "127.0.0.1:$listen" "127.0.0.1:$backend" \
            >"$work/haproxy.cfg"
        taskset -c 0 haproxy -db -f "$work/haproxy.cfg" >"$work/proxy.log" 2>&1 &
        ;;
    direct) ;;
    *) echo "unknown proxy $proxy" >&2; exit 2 ;;
    esac
    target="127.0.0.1:$listen"
    pid=
    if [ "$proxy" = direct ]; then
        target="127.0.0.1:$backend"
    else
        pids+=($!)
        pid=${pids[-1]}
    fi
    sleep 1
    # nginx serves from its worker; its master only supervises.
    if [ "$proxy" = nginx ]; then
        pid=$(pgrep -P "$pid" | head -n 1 || true)
        [ -n "$pid" ] || fail "nginx has no worker"
    fi
    [ -z "$pid" ] || kill -0 "$pid" 2>/dev/null || fail "$proxy did not start"
    case $scenario in
    msgs16k-pinned) taskset -c 1 timeout 20 "$bin/duplex-bench" throughput --target "$target" \
        --size 16384 --duration 5s >"$work/load.log" 2>&1 & ;;
    msgs64) taskset -c 0 timeout 20 "$bin/duplex-bench" throughput --target "$target" \
        --size 64 --duration 5s >"$work/load.log" 2>&1 & ;;
    http) taskset -c 0 timeout 20 wrk -t1 -c50 -d5s "http://$target/" >"$work/load.log" 2>&1 & ;;
    handshakes) taskset -c 0 timeout 20 "$bin/duplex-bench" handshakes --target "$target" \
        --duration 5s >"$work/load.log" 2>&1 & ;;
    *) echo "unknown scenario $scenario" >&2; exit 2 ;;
    esac
    load=$!
    sleep 1.5
    cpus0=$(grep -E '^cpu[01] ' /proc/stat)
    if [ -n "$pid" ]; then
        read -r u0 s0 < <(awk '{print $14, $15}' "/proc/$pid/stat")
        perf stat -e task-clock,raw_syscalls:sys_enter,context-switches -p "$pid" -- sleep 3 \
            >"$work/stat.log" 2>&1 || fail "perf stat failed (is linux-perf installed and allowed?)"
        read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$pid/stat")
    else
        sleep 3
        u0=0 s0=0 u1=0 s1=0
        printf '0 task-clock\n0 raw_syscalls\n0 context-switches\n' >"$work/stat.log"
    fi
    cpus1=$(grep -E '^cpu[01] ' /proc/stat)
    reap "$load" 60
    case $scenario in
    msgs64 | msgs16k-pinned) rate=$(grep -o '"msgs_per_s":[0-9.]*' "$work/load.log" | cut -d: -f2 || true) ;;
    http) rate=$(awk '/Requests\/sec/{print $2}' "$work/load.log") ;;
    handshakes) rate=$(grep -o '"per_s":[0-9.]*' "$work/load.log" | cut -d: -f2 || true) ;;
    esac
    [ -n "$rate" ] || fail "the load generator gave no rate"
    ms=$(awk '/task-clock/{gsub(",","",$1); print $1}' "$work/stat.log")
    calls=$(awk '/raw_syscalls/{gsub(",","",$1); print $1}' "$work/stat.log")
    switches=$(awk '/context-switches/{gsub(",","",$1); print $1}' "$work/stat.log")
    python3 - "$proxy" "$scenario" "$r" "$rate" "$ms" "$calls" "$switches" \
        "$((u1 - u0))" "$((s1 - s0))" "$cpus0" "$cpus1" <<'EOF'
import sys
proxy, scenario, r, rate, ms, calls, switches, du, ds, cpus0, cpus1 = sys.argv[1:]
ops = float(rate) * 3
user = int(du) / max(int(du) + int(ds), 1)
# /proc/stat: user nice system idle iowait irq softirq steal ... in clock ticks.
busy = []
for a, b in zip(cpus0.splitlines(), cpus1.splitlines()):
    d = [int(y) - int(x) for x, y in zip(a.split()[1:], b.split()[1:])]
    total = sum(d[:8])
    busy.append(1 - (d[3] + d[4]) / max(total, 1))
per_cpu = "  ".join(f"cpu{i} {b:4.0%} {b * 3e6 / ops:6.2f} µs/op" for i, b in enumerate(busy))
own = (f"CPU {float(ms) * 1000 / ops:7.2f} µs/op  user {user:4.0%}  "
       f"syscalls {int(calls) / ops:5.2f}/op  switches {int(switches) / ops:4.2f}/op"
       if proxy != "direct" else "no proxy")
print(f"{proxy:8} {scenario:14} #{r}  {float(rate):>9,.0f}/s  {own}  {per_cpu}")
EOF
    stop
    pids=()
done
