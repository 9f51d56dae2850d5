#!/usr/bin/env python3
"""A soak of duplex: WebSocket tunnels and keep-alive HTTP through the real binary while
its config is rewritten and reloaded, backends are stalled (SIGSTOP) or killed and
restarted, and junk is sent to the listener. Loopback only; bounded by DURATION.

    cargo build --release -p duplex -p duplex-bench
    python3 tests/soak/soak.py [DURATION_SECONDS]          # default 120
    FULL=1 python3 tests/soak/soak.py 60                     # every backend in every config
    NOKILL=1 python3 tests/soak/soak.py 60                   # stalls only: no tunnel may close

Uses 127.0.0.1 ports 18080 (listener), 19090 (admin) and 18101-18104 (echo backends),
a work directory under /tmp, and Python's `websockets` package. At the end it prints
what the clients saw and duplex's state, and exits 1 if a message came back wrong, a
gauge did not return to 0, a tunnel closed with no backend killed, a reload was refused,
connections stayed open to backends the last config took out, duplex logged a panic, or
did not exit 0 on SIGTERM. Tunnels
on a killed backend close, and a config whose only backend was killed gives 502s: both
are expected and counted, not failures. With FULL=1 an HTTP error is a failure too.
"""
import asyncio, json, os, random, signal, subprocess, sys, tempfile, time, urllib.request
import websockets

DUR = float(sys.argv[1]) if len(sys.argv) > 1 else 120
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DUPLEX = os.path.join(ROOT, "target/release/duplex")
BENCH = os.path.join(ROOT, "target/release/duplex-bench")
WORK = tempfile.mkdtemp(prefix="duplex-soak-")
PORTS = [18101, 18102, 18103, 18104]
CFG = os.path.join(WORK, "duplex.yaml")
stats = {"ws_msgs": 0, "ws_bad": 0, "ws_closed": 0, "http_ok": 0, "http_bad": 0,
         "reloads": 0, "reload_fail": 0, "junk": 0, "conn_fail": 0}

def config(backends, variant):
    routes = [("ws", "/ws"), ("api", "/api")]
    if variant % 3 == 1:
        routes.insert(0, (f"extra{variant}", f"/x{variant}"))
    lines = ["listeners:", "  - name: public", "    bind: 127.0.0.1:18080",
             "admin:", "  bind: 127.0.0.1:19090", "routes:"]
    for name, prefix in routes:
        lines += [f"  - name: {name}", f"    upstream: {'chat' if name != 'api' else 'api'}",
                  f"    match: {{path_prefix: {prefix}}}"]
    lines += ["upstreams:"]
    for up, bal in [("chat", ["least_conn", "round_robin", "p2c"][variant % 3]), ("api", "round_robin")]:
        lines += [f"  - name: {up}", f"    balancer: {bal}", "    drain_timeout: 600s",
                  "    health_check: {kind: websocket, path: /, interval: 500ms, timeout: 400ms}",
                  "    backends:"]
        lines += [f"      - addr: 127.0.0.1:{p}" for p in backends]
    return "\n".join(lines) + "\n"

def write_config(backends, variant):
    tmp = CFG + ".tmp"
    open(tmp, "w").write(config(backends, variant))
    os.rename(tmp, CFG)

def metrics():
    with urllib.request.urlopen("http://127.0.0.1:19090/metrics", timeout=5) as r:
        return r.read().decode()

def metric_sum(text, name):
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total

async def ws_client(i, stop):
    n = 0
    while not stop.is_set():
        try:
            async with websockets.connect("ws://127.0.0.1:18080/ws", open_timeout=10, ping_interval=None, max_size=2**20) as ws:
                while not stop.is_set():
                    msg = f"{i}:{n}:" + "x" * random.choice([1, 100, 5000])
                    await ws.send(msg)
                    got = await asyncio.wait_for(ws.recv(), 20)
                    if got != msg:
                        stats["ws_bad"] += 1
                    else:
                        stats["ws_msgs"] += 1
                    n += 1
                    await asyncio.sleep(random.uniform(0.05, 0.3))
                await ws.close()
                return
        except (websockets.ConnectionClosed, OSError, asyncio.TimeoutError, websockets.InvalidStatus, websockets.InvalidHandshake) as e:
            if stop.is_set():
                return
            stats["ws_closed"] += 1
            print(f"ws {i}: {type(e).__name__}: {e}", flush=True)
            await asyncio.sleep(0.5)

async def http_client(i, stop):
    while not stop.is_set():
        try:
            r, w = await asyncio.open_connection("127.0.0.1", 18080)
            for _ in range(200):
                if stop.is_set():
                    break
                w.write(b"GET /api/x HTTP/1.1\r\nHost: soak\r\n\r\n")
                await w.drain()
                head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 20)
                status = head.split(b" ", 2)[1]
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                if length:
                    await r.readexactly(length)
                if status == b"200":
                    stats["http_ok"] += 1
                else:
                    stats["http_bad"] += 1
                    print("http status", status, flush=True)
                await asyncio.sleep(random.uniform(0.01, 0.05))
            w.close()
        except Exception as e:
            if stop.is_set():
                return
            stats["http_bad"] += 1
            print(f"http {i}: {type(e).__name__}: {e}", flush=True)
            await asyncio.sleep(0.5)

async def junk(stop):
    payloads = [b"\x00\xff" * 100, b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
                b"POST /api HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", b""]
    while not stop.is_set():
        try:
            r, w = await asyncio.open_connection("127.0.0.1", 18080)
            w.write(random.choice(payloads))
            await w.drain()
            try:
                await asyncio.wait_for(r.read(4096), 2)
            except asyncio.TimeoutError:
                pass
            w.close()
            stats["junk"] += 1
        except Exception:
            stats["junk"] += 1
        await asyncio.sleep(0.1)

# Backends kept by the last config: the others must be left with no connection.
FINAL = PORTS[:2]

async def chaos(procs, duplex, stop):
    variant = 0
    t_end = time.time() + DUR
    while time.time() < t_end:
        await asyncio.sleep(2)
        variant += 1
        subset = PORTS if os.environ.get("FULL") else sorted(random.sample(PORTS, random.randint(1, len(PORTS))))
        write_config(subset, variant)
        if variant % 2:
            duplex.send_signal(signal.SIGHUP)
        stats["reloads"] += 1
        if variant % 7 == 0 and not os.environ.get("NOKILL"):
            k = random.randrange(len(procs))
            procs[k].kill()
            procs[k].wait()
            stats["kills"] = stats.get("kills", 0) + 1
            await asyncio.sleep(1)
            procs[k] = subprocess.Popen([BENCH, "echo", "--listen", f"127.0.0.1:{PORTS[k]}", "--max-time", "30m"])
        if variant % 5 == 0:
            victim = random.choice(procs)
            victim.send_signal(signal.SIGSTOP)
            try:
                await asyncio.sleep(1.5)
            finally:
                victim.send_signal(signal.SIGCONT)
    # Everything back, then the last config keeps two backends (tunnels on the others
    # stay, draining, until the clients close them).
    write_config(PORTS, variant + 1)
    duplex.send_signal(signal.SIGHUP)
    await asyncio.sleep(3)
    write_config(FINAL, variant + 2)
    duplex.send_signal(signal.SIGHUP)
    await asyncio.sleep(3)
    stop.set()

def connections_to(pid, ports):
    out = subprocess.run(["ss", "-tanp"], capture_output=True, text=True, timeout=30).stdout
    return [l for l in out.splitlines()
            if f"pid={pid}," in l and l.split()[0] == "ESTAB" and l.split()[4].rsplit(":", 1)[1] in {str(p) for p in ports}]

async def main():
    procs = [subprocess.Popen([BENCH, "echo", "--listen", f"127.0.0.1:{p}", "--max-time", "30m"]) for p in PORTS]
    try:
        await run(procs)
    finally:
        for p in procs:
            p.send_signal(signal.SIGCONT)
            p.kill()

async def run(procs):
    write_config(PORTS, 0)
    log_path = os.path.join(WORK, "duplex.log")
    log = open(log_path, "w")
    duplex = subprocess.Popen([DUPLEX, "run", "--config", CFG], stdout=log, stderr=subprocess.STDOUT)
    try:
        await asyncio.sleep(1.5)
        fd_base = len(os.listdir(f"/proc/{duplex.pid}/fd"))
        stop = asyncio.Event()
        tasks = [asyncio.create_task(ws_client(i, stop)) for i in range(400)]
        tasks += [asyncio.create_task(http_client(i, stop)) for i in range(20)]
        tasks.append(asyncio.create_task(junk(stop)))
        await chaos(procs, duplex, stop)
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        await asyncio.sleep(2)
        m = metrics()
        fd_end = len(os.listdir(f"/proc/{duplex.pid}/fd"))
        rss = int(open(f"/proc/{duplex.pid}/status").read().split("VmRSS:")[1].split()[0])
        removed = [p for p in PORTS if p not in FINAL]
        lingering = connections_to(duplex.pid, removed)
        print(json.dumps(stats))
        print("tunnels_active", metric_sum(m, "duplex_websocket_tunnels_active"),
              "connections_active", metric_sum(m, "duplex_connections_active"),
              "fds", fd_base, "->", fd_end, "rss_kb", rss,
              "connections to removed backends", len(lingering))
        duplex.send_signal(signal.SIGTERM)
        rc = duplex.wait(timeout=60)
    finally:
        if duplex.poll() is None:
            duplex.kill()
            duplex.wait()
    print("duplex exit", rc)
    log.close()
    panics = [l for l in open(log_path) if "panic" in l.lower()]
    refused = [l for l in m.splitlines() if l.startswith('duplex_config_reloads_total{result="error"}')]
    failures = []
    if stats["ws_bad"]:
        failures.append(f"{stats['ws_bad']} echoes came back wrong")
    if stats["ws_closed"] and not stats.get("kills"):
        failures.append(f"{stats['ws_closed']} tunnels closed with no backend killed")
    if metric_sum(m, "duplex_websocket_tunnels_active") or metric_sum(m, "duplex_connections_active"):
        failures.append("gauges did not return to 0")
    if lingering:
        failures.append(f"{len(lingering)} connections left open to backends taken out")
    if any(float(l.rsplit(" ", 1)[1]) for l in refused):
        failures.append("a reload was refused")
    if panics:
        failures.append(f"duplex logged a panic: {panics[0].strip()}")
    if rc != 0:
        failures.append(f"duplex exited {rc}")
    if os.environ.get("FULL") and stats["http_bad"]:
        failures.append(f"{stats['http_bad']} HTTP errors with every backend configured")
    print("log:", log_path)
    if failures:
        print("FAILED:", "; ".join(failures))
        sys.exit(1)
    print("ok")

asyncio.run(main())
