"""The AsyncAPI document of the chat service; print it with: rtbroadcast schema asyncapi_export:document"""

from typing import Any

from rtbroadcast.schema import ChannelSpec, asyncapi_document
from tutorial_app import MessagePosted


def document() -> dict[str, Any]:
    return asyncapi_document(
        ChannelSpec(
            "/realtime?room={room}",
            name="room",
            title="A chat room",
            parameters={"room": "The chat room to follow, e.g. `lobby`."},
        ),
        events=[MessagePosted],
        title="Chat events",
        version="1.0.0",
        servers={"local": "ws://127.0.0.1:8000"},
    )
