"""Echo WebSocket server for duplex's interop test, with permessage-deflate enabled.

Prints "PORT <n>" on stdout once listening on 127.0.0.1; echoes every message. Exits by
itself after --lifetime seconds so that a crashed test run leaves nothing behind.
"""

import argparse
import asyncio
import sys

from websockets.asyncio.server import serve


async def echo(ws):
    async for message in ws:
        await ws.send(message)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lifetime", type=float, default=60.0)
    args = parser.parse_args()
    async with serve(
        echo, "127.0.0.1", 0, compression="deflate", max_size=4 * 1024 * 1024
    ) as server:
        port = server.sockets[0].getsockname()[1]
        print(f"PORT {port}", flush=True)
        try:
            await asyncio.wait_for(server.serve_forever(), timeout=args.lifetime)
        except asyncio.TimeoutError:
            print("lifetime over, exiting", file=sys.stderr, flush=True)


if __name__ == "__main__":
    asyncio.run(main())
