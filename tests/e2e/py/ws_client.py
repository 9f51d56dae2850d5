"""WebSocket client for duplex's interop test.

Connects to URL with permessage-deflate offered, checks that the server's 101 (relayed by
duplex) accepted it, and checks that echoes of a 100 KB compressible text come back
intact. Prints "OK ..." and exits 0 on success; prints the failure and exits 1 otherwise.
"""

import asyncio
import sys

from websockets.asyncio.client import connect

ROUNDS = 3
SIZE = 100_000


async def run(url: str) -> str:
    async with connect(
        url, compression="deflate", max_size=4 * 1024 * 1024, open_timeout=10
    ) as ws:
        extensions = ws.response.headers.get("Sec-WebSocket-Extensions", "")
        if "permessage-deflate" not in extensions:
            raise AssertionError(
                f"permessage-deflate not negotiated; Sec-WebSocket-Extensions={extensions!r}"
            )
        for i in range(ROUNDS):
            text = (f"round {i}: duplex interop, compressible text. " * (SIZE // 40))[:SIZE]
            await ws.send(text)
            echo = await asyncio.wait_for(ws.recv(), timeout=10)
            if echo != text:
                raise AssertionError(
                    f"round {i}: echo differs (sent {len(text)} chars, got {len(echo)})"
                )
        return f"OK extensions={extensions!r} rounds={ROUNDS} size={SIZE}"


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: ws_client.py ws://HOST:PORT/PATH", file=sys.stderr)
        return 2
    try:
        print(asyncio.run(asyncio.wait_for(run(sys.argv[1]), timeout=30)), flush=True)
        return 0
    except Exception as e:  # the test prints whatever went wrong
        print(f"FAIL {type(e).__name__}: {e}", flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
