"""The servers under test, one module per stack: ``python -m bench.servers STACK --port N``.

Every stack exposes the same two endpoints so the load generator treats them alike:

* ``GET /ws?channel=NAME`` upgrades to a WebSocket subscribed to ``NAME``;
* ``POST /publish/NAME`` with a JSON object body publishes that text to ``NAME`` (one request per
  event).

The raw ``websockets`` reference serves the POST on a second port (``--http-port``), see
:mod:`bench.servers.raw_websockets`.
"""
