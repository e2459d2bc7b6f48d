"""A client that never misses an event: snapshot, then events in seq order, resuming after every drop.

rtbroadcast.client runs the algorithm (connect from the snapshot's position, apply events in seq order,
resume after a drop, reload on resync_required); the application gives it the snapshot loader. This one
follows a room of the tutorial app.
"""

from typing import Any

import httpx

from rtbroadcast.client import Client, ResyncInfo


class RoomFollower:
    """Keep a room's messages up to date."""

    def __init__(self, base_url: str, room: str) -> None:
        self.base_url = base_url  # "http://127.0.0.1:8000"
        self.room = room
        self.messages: list[dict[str, Any]] = []
        self.seq = 0
        self.snapshots = 0

    async def load_snapshot(self, info: ResyncInfo) -> tuple[str, int]:
        # 1. and 4. Load the state over HTTP, with the stream position (epoch, seq) it reflects: before
        #    the first connection, and whenever the server says the missed events are gone.
        async with httpx.AsyncClient(base_url=self.base_url) as http:
            response = await http.get(f"/rooms/{self.room}/messages")
        body = response.raise_for_status().json()
        self.messages = body["messages"]
        self.seq = body["seq"]
        self.snapshots += 1
        return body["epoch"], body["seq"]

    async def run(self) -> None:
        ws_base = self.base_url.replace("http", "ws", 1)
        # 2. The client connects from the snapshot's position; the server first replays what was missed.
        async with Client(f"{ws_base}/realtime?room={self.room}") as client:
            # 3. Events arrive in seq order, each once (those already in the snapshot are skipped), and
            #    after a drop the client reconnects with backoff and resumes from the last one.
            async for received in client.subscribe(resync=self.load_snapshot):
                self.messages.append(received.event)
                self.seq = received.seq
