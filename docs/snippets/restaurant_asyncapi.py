"""The AsyncAPI document of the example restaurant service (served by it at /asyncapi.json)."""

from examples.restaurant_app.asyncapi import EVENTS, document

__all__ = ["EVENTS", "document"]
