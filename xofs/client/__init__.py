"""The only way xofs talks to XO: REST v0 (`RestClient`, with `ExportResponse` streams) and the JSON-RPC
event feed (`EventFeed`, driving an `EventSink`). Failures come out as `xofs.errors` classes."""

from xofs.client.events import EventFeed
from xofs.client.export import ExportResponse
from xofs.client.reconnect import EventSink
from xofs.client.rest import RestClient

__all__ = ["EventFeed", "EventSink", "ExportResponse", "RestClient"]
