"""Subscribe inside the process: the same order, seq and resume guarantees as a WebSocket client."""

import asyncio
from typing import Literal

from rtbroadcast import Broadcaster, Event, Received


class PriceChanged(Event):
    type: Literal["price_changed"] = "price_changed"
    sku: str
    cents: int


async def main() -> None:
    broadcaster = Broadcaster("memory://")
    async with broadcaster, broadcaster.subscribe("prices", model=PriceChanged) as prices:
        await broadcaster.publish("prices", PriceChanged(sku="A-7", cents=1999))
        await broadcaster.publish("prices", PriceChanged(sku="B-2", cents=450))
        for _ in range(2):
            item = await anext(prices)
            if isinstance(item, Received):  # otherwise a ResyncRequired: reload your state
                print(item.seq, item.event.sku, item.event.cents)
        print("resume later from", prices.position)


if __name__ == "__main__":
    asyncio.run(main())
