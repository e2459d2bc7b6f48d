"""A client that never misses an event: snapshot, then events in seq order, resuming after every drop.

The same algorithm applies to any client (iOS, Android, web); this one follows a room of the tutorial app.
"""

import asyncio
import json
from typing import Any

import httpx
import websockets


class RoomFollower:
    """Keep a room's messages up to date."""

    def __init__(self, base_url: str, room: str) -> None:
        self.base_url = base_url  # "http://127.0.0.1:8000"
        self.room = room
        self.messages: list[dict[str, Any]] = []
        self.epoch = ""
        self.seq = 0
        self.snapshots = 0

    async def load_snapshot(self) -> None:
        # 1. Load the state over HTTP, with the stream position (epoch, seq) it reflects.
        async with httpx.AsyncClient(base_url=self.base_url) as http:
            response = await http.get(f"/rooms/{self.room}/messages")
        body = response.raise_for_status().json()
        self.messages = body["messages"]
        self.epoch, self.seq = body["epoch"], body["seq"]
        self.snapshots += 1

    def apply(self, event: dict[str, Any]) -> None:
        self.messages.append({name: value for name, value in event.items() if name != "seq"})
        self.seq = event["seq"]

    async def run(self) -> None:
        await self.load_snapshot()
        ws_base = self.base_url.replace("http", "ws", 1)
        while True:
            # 2. Connect from where the state stands: the server first replays what was missed.
            url = f"{ws_base}/realtime?room={self.room}&epoch={self.epoch}&last_seq={self.seq}"
            try:
                async with websockets.connect(url) as ws:
                    async for text in ws:
                        frame = json.loads(text)
                        if frame["type"] == "resync_required":
                            # 4. The missed events are gone: reload. Events at or below the snapshot's
                            #    seq are then skipped below, so nothing is applied twice.
                            await self.load_snapshot()
                        elif frame["type"] in ("welcome", "pong", "error"):
                            continue
                        elif frame["seq"] == self.seq + 1:
                            self.apply(frame)  # 3. Apply events in seq order, each exactly once.
                        elif frame["seq"] > self.seq + 1:
                            break  # a gap (a correct server never sends one): reconnect and resume
                if ws.close_code in (4003, 4004):
                    raise PermissionError(f"refused: {ws.close_code} {ws.close_reason}")
            except (OSError, websockets.ConnectionClosedError):
                pass
            await asyncio.sleep(0.5)  # then reconnect with resume (use backoff with jitter in an app)
