"""A reference client of the example restaurant service: the algorithm an iOS (or any) app follows.

It keeps a restaurant's guests and tables up to date: load the snapshots, connect from their position,
apply events in seq order, resume after every drop, reload on resync_required.
"""

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import websockets

Entity = dict[str, Any]


class RestaurantClient:
    def __init__(
        self,
        base_url: str,
        restaurant_id: str,
        token: str,
        renew_token: Callable[[], Awaitable[str]] | None = None,
    ) -> None:
        self.base_url = base_url  # "http://127.0.0.1:8000"
        self.restaurant_id = restaurant_id
        self.token = token  # the device token for this restaurant
        self.renew_token = renew_token  # gets a fresh token when this one expires
        self.guests: dict[str, Entity] = {}
        self.tables: dict[str, Entity] = {}
        self.epoch = ""
        self.seq = 0  # the last event applied (or reflected by the snapshot)
        self.snapshots = 0

    # -- 1. the snapshot ----------------------------------------------------------------------------

    async def load_snapshot(self, http: httpx.AsyncClient) -> None:
        rid = self.restaurant_id
        while True:
            guests = (await http.get(f"/restaurants/{rid}/guests")).raise_for_status().json()
            tables = (await http.get(f"/restaurants/{rid}/tables")).raise_for_status().json()
            # epoch/seq are null while the service cannot reach its broadcast backend, and the two lists
            # must come from the same stream: otherwise try again shortly.
            if guests["epoch"] is not None and guests["epoch"] == tables["epoch"]:
                break
            await asyncio.sleep(1)
        self.guests = {guest["id"]: guest for guest in guests["guests"]}
        self.tables = {table["id"]: table for table in tables["tables"]}
        # Each list reflects every event up to its seq (and maybe later ones): resume from the lower seq.
        self.epoch, self.seq = guests["epoch"], min(guests["seq"], tables["seq"])
        self.snapshots += 1

    # -- 3. applying events -------------------------------------------------------------------------

    async def apply(self, http: httpx.AsyncClient, event: Entity) -> None:
        # A snapshot may already reflect events after its seq, so every change is applied idempotently:
        # upsert or delete by id, never "append".
        kind = event["type"]
        if kind in ("guest_created", "guest_updated"):
            self.guests.setdefault(event["guest_id"], {}).update(event["data"])
        elif kind == "guest_deleted":
            self.guests.pop(event["guest_id"], None)
        elif kind in ("table_created", "table_updated"):
            self.tables.setdefault(event["table_id"], {}).update(event["data"])
        elif kind == "atomic_transaction_complete":
            for entity_id in event["affected_entities"]:  # no details in the event: fetch each entity
                await self.reload_entity(http, entity_id)
        self.seq = event["seq"]

    async def reload_entity(self, http: httpx.AsyncClient, entity_id: str) -> None:
        store, path = (self.guests, "guests") if entity_id.startswith("guest-") else (self.tables, "tables")
        response = await http.get(f"/restaurants/{self.restaurant_id}/{path}/{entity_id}")
        if response.status_code == 404:
            store.pop(entity_id, None)
        else:
            store[entity_id] = response.raise_for_status().json()

    # -- 2. and 4. connecting, resuming, resyncing ------------------------------------------------------

    def _auth(self, request: httpx.Request) -> httpx.Request:
        request.headers["Authorization"] = f"Bearer {self.token}"
        return request

    async def run(self) -> None:
        ws_base = self.base_url.replace("http", "ws", 1)
        delay = 0.5
        async with httpx.AsyncClient(base_url=self.base_url, timeout=10, auth=self._auth) as http:
            await self.load_snapshot(http)
            while True:
                url = (
                    f"{ws_base}/realtime?restaurant_id={self.restaurant_id}"
                    f"&epoch={self.epoch}&last_seq={self.seq}"
                )
                headers = {"Authorization": f"Bearer {self.token}"}  # or &token=... in the URL
                try:
                    async with websockets.connect(url, additional_headers=headers) as ws:
                        async for text in ws:
                            frame = json.loads(text)
                            kind = frame["type"]
                            if kind == "welcome":
                                delay = 0.5
                            elif kind == "resync_required":
                                await self.load_snapshot(http)  # missed events are gone: reload
                            elif kind in ("pong", "error"):
                                continue
                            elif frame["seq"] <= self.seq:
                                continue  # already applied, or reflected by the snapshot
                            elif frame["seq"] == self.seq + 1:
                                await self.apply(http, frame)
                            else:
                                break  # a gap (a correct server never sends one): reconnect and resume
                    if ws.close_code == 4003 and ws.close_reason == "token expired" and self.renew_token:
                        self.token = await self.renew_token()  # then reconnect and resume: nothing is lost
                        continue
                    if ws.close_code in (4003, 4004):
                        raise PermissionError(f"refused: {ws.close_code} {ws.close_reason}")
                except (OSError, websockets.ConnectionClosedError):
                    pass
                await asyncio.sleep(delay)  # reconnect with resume, backing off up to 10 s
                delay = min(delay * 2, 10)
