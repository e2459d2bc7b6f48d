"""A FastAPI service that broadcasts every new order to the shop's devices. Run: uvicorn fastapi_app:app"""

import itertools
from typing import Literal

from fastapi import FastAPI
from pydantic import BaseModel

from rtbroadcast import Broadcaster, Event
from rtbroadcast.asgi import channel_from_query
from rtbroadcast.starlette import broadcast_routes, lifespan


class OrderPlaced(Event):
    """A customer placed an order."""

    type: Literal["order_placed"] = "order_placed"
    shop_id: str
    order_id: int
    items: list[str]


class NewOrder(BaseModel):
    items: list[str]


broadcaster = Broadcaster("memory://")  # "redis://localhost:6379/0" for several processes
app = FastAPI(lifespan=lifespan(broadcaster))  # connects at startup, closes connections at shutdown

# WebSocket at /realtime?shop_id=..., Server-Sent Events at /realtime/sse?shop_id=...
app.router.routes.extend(
    broadcast_routes(
        "/realtime",
        broadcaster,
        channel=channel_from_query("shop_id", prefix="shop:", pattern=r"[A-Za-z0-9_-]{1,64}"),
    )
)

order_ids = itertools.count(1)  # stands in for your database


@app.post("/shops/{shop_id}/orders", status_code=201)
async def place_order(shop_id: str, order: NewOrder) -> dict[str, int]:
    order_id = next(order_ids)  # write to the database and commit first...
    event = OrderPlaced(shop_id=shop_id, order_id=order_id, items=order.items)
    seq = await broadcaster.publish(f"shop:{shop_id}", event)  # ...then broadcast
    return {"order_id": order_id, "seq": seq}


@app.get("/health")
async def health() -> dict[str, object]:
    return broadcaster.stats().as_dict()
