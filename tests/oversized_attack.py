"""``python -m tests.oversized_attack PORT SIZE COUNT``: COUNT connections each send a SIZE-byte frame.

Run in a process of its own, so that writing the frames does not slow the test's own readers. Prints
the close codes the server answered with, as a JSON list (``null``: the connection was reset first).
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import sys

MiB = 1024 * 1024


async def _oversized_frame(port: int, size: int) -> int | None:
    """Send one masked text frame of ``size`` bytes; return the close code the server answers with."""
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    writer.write(
        f"GET /ws?room=attack HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    await reader.readuntil(b"\r\n\r\n")
    writer.write(bytes((0x81, 0x80 | 127)) + struct.pack("!Q", size) + os.urandom(4))
    chunk = bytes(MiB)
    sent = 0
    code: int | None = None

    async def read_close() -> int | None:
        while True:
            head = await reader.readexactly(2)
            length = head[1] & 0x7F
            if length == 126:
                length = struct.unpack("!H", await reader.readexactly(2))[0]
            elif length == 127:
                length = struct.unpack("!Q", await reader.readexactly(8))[0]
            payload = await reader.readexactly(length)
            if head[0] & 0x0F == 0x8:
                return int(struct.unpack("!H", payload[:2])[0])

    closer = loop.create_task(read_close())
    try:
        while sent < size and not closer.done():
            writer.write(chunk[: min(MiB, size - sent)])
            sent += MiB
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    try:
        code = await asyncio.wait_for(closer, 10)
    except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
        code = None
    writer.close()
    return code


async def main(port: int, size: int, count: int) -> None:
    codes = await asyncio.gather(*(_oversized_frame(port, size) for _ in range(count)))
    print(json.dumps(codes))  # noqa: T201


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
