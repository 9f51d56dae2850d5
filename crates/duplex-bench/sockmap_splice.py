#!/usr/bin/env python3
"""An experiment, not part of duplex: a TCP relay whose bytes never reach user space.

    python3 crates/duplex-bench/sockmap_splice.py LISTEN_ADDR BACKEND_ADDR

For each accepted connection it connects to the backend and puts both sockets in a BPF
sockhash, keyed by the other socket's cookie, with an SK_SKB verdict program (eleven
hand-assembled instructions) that redirects every arriving segment to the peer socket's
send side. The kernel then relays the WebSocket handshake and every frame; this process
only waits for the ends to close. Needs root (CAP_BPF and CAP_NET_ADMIN) and a kernel with
CONFIG_BPF_STREAM_PARSER. docs/benchmarks.md ("What the missed budgets would take") says
what it measured. It stops at Ctrl-C; bytes that reach it (none were seen) are relayed.
"""
import ctypes, os, selectors, socket, struct, sys

libc = ctypes.CDLL(None, use_errno=True)
NR_bpf = 321  # x86-64
def bpf(cmd, attr: bytes):
    buf = ctypes.create_string_buffer(attr, len(attr))
    r = libc.syscall(NR_bpf, cmd, buf, len(attr))
    if r < 0:
        raise OSError(ctypes.get_errno(), f"bpf cmd {cmd}: " + os.strerror(ctypes.get_errno()))
    return r
def ins(code, dst=0, src=0, off=0, imm=0):
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)
# map: SOCKHASH, key = u64 cookie of the source socket, value = the peer socket
mapfd = bpf(0, struct.pack("<IIII", 18, 8, 4, 65536) + b"\0" * 56)
prog = b"".join([
    ins(0xbf, 6, 1),            # r6 = r1 (skb)
    ins(0x85, imm=46),          # r0 = get_socket_cookie(skb)
    ins(0x7b, 10, 0, -8),       # *(u64*)(fp-8) = r0
    ins(0xbf, 1, 6),            # r1 = skb
    ins(0x18, 2, 1, imm=mapfd), ins(0),  # r2 = map
    ins(0xbf, 3, 10),           # r3 = fp
    ins(0x07, 3, imm=-8),       # r3 -= 8
    ins(0xb7, 4, imm=0),        # r4 = 0 (egress)
    ins(0x85, imm=72),          # sk_redirect_hash
    ins(0xb7, 0, imm=1),        # r0 = SK_PASS
    ins(0x95),
])
insns = ctypes.create_string_buffer(prog, len(prog))
lic = ctypes.create_string_buffer(b"GPL")
log = ctypes.create_string_buffer(65536)
attr = struct.pack("<IIQQIIQII16sII", 14, len(prog) // 8, ctypes.addressof(insns), ctypes.addressof(lic),
                   1, len(log), ctypes.addressof(log), 0, 0, b"splice", 0, 38)
attr += b"\0" * (128 - len(attr))
try:
    progfd = bpf(5, attr)
except OSError as e:
    print(e, log.value.decode(errors="replace"), file=sys.stderr); raise
bpf(8, struct.pack("<IIII", mapfd, progfd, 38, 0) + b"\0" * 8)
def cookie(s):
    return struct.unpack("<Q", s.getsockopt(socket.SOL_SOCKET, 57, 8))[0]
def put(key_sock, val_sock):
    k = ctypes.create_string_buffer(struct.pack("<Q", cookie(key_sock)))
    v = ctypes.create_string_buffer(struct.pack("<I", val_sock.fileno()))
    bpf(2, struct.pack("<IIQQQ", mapfd, 0, ctypes.addressof(k), ctypes.addressof(v), 0))
listen, backend = sys.argv[1], sys.argv[2]
h, p = listen.rsplit(":", 1); bh, bp = backend.rsplit(":", 1)
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((h, int(p))); ls.listen(1024); ls.setblocking(False)
sel = selectors.DefaultSelector(); sel.register(ls, selectors.EVENT_READ, None)
stray = 0
while True:
    for key, _ in sel.select():
        if key.data is None:
            c, _ = ls.accept()
            b = socket.create_connection((bh, int(bp)))
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1); b.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            put(c, b); put(b, c)
            c.setblocking(False); b.setblocking(False)
            sel.register(c, selectors.EVENT_READ, b); sel.register(b, selectors.EVENT_READ, c)
        else:
            s, peer = key.fileobj, key.data
            try:
                d = s.recv(65536)
            except BlockingIOError:
                continue
            if d:
                stray += len(d); peer.sendall(d)
                print("stray bytes", stray, file=sys.stderr)
            else:
                sel.unregister(s); s.close()
                try: sel.unregister(peer)
                except Exception: pass
                peer.close()
