"""Subscribe inside the process: the same order, seq and resume guarantees as a WebSocket client."""

import asyncio
from typing import Literal

from rtbroadcast import Broadcaster, Event, Received


class StockChanged(Event):
    type: Literal["stock_changed"] = "stock_changed"
    sku: str
    quantity: int


async def main() -> None:
    broadcaster = Broadcaster("memory://")
    async with broadcaster, broadcaster.subscribe("stock", model=StockChanged) as stock:
        await broadcaster.publish("stock", StockChanged(sku="A-7", quantity=12))
        await broadcaster.publish("stock", StockChanged(sku="B-2", quantity=0))
        for _ in range(2):
            item = await anext(stock)
            if isinstance(item, Received):  # otherwise a ResyncRequired: reload your state
                print(item.seq, item.event.sku, item.event.quantity)
        print("resume later from", stock.position)


if __name__ == "__main__":
    asyncio.run(main())
