"""Publish inside the write's own transaction: the event exists if and only if the bid committed."""

from __future__ import annotations

from typing import Literal

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from rtbroadcast import Broadcaster, Event


class BidPlaced(Event):
    type: Literal["bid_placed"] = "bid_placed"
    auction_id: str
    amount: int


async def place_bid(
    sessions: async_sessionmaker[AsyncSession], broadcaster: Broadcaster, auction_id: str, amount: int
) -> int:
    """Store the bid and its event in one transaction; return the event's seq."""
    async with sessions.begin() as session:  # commits at the end of the block, rolls back on an error
        await session.execute(
            text("INSERT INTO bids (auction_id, amount) VALUES (:auction, :amount)"),
            {"auction": auction_id, "amount": amount},
        )
        # Stored and notified in this transaction: sent if and only if it commits, in commit order.
        return await broadcaster.publish(
            f"auction:{auction_id}", BidPlaced(auction_id=auction_id, amount=amount), transaction=session
        )
