"""asyncio client for the gateway: reconnects with backoff and full jitter,
resumes drained sessions with their token, queues while disconnected, and
offers request/reply with correlation ids; in reliable mode it numbers the
messages both ways and resumes after any drop without loss. See clients/python/README.md."""

from .backoff import Backoff
from .client import GatewayClient
from .errors import (AuthRefused, ClientClosed, GatewayClientError, HandshakeRefused, QueueFull,
                     TooManyRequests)
from .outbox import Message, Overflow
from .policy import Action
from .reliable import ProtocolError, Reliable, ReliableUnavailable
from .states import State

__all__ = ["Action", "AuthRefused", "Backoff", "ClientClosed", "GatewayClient", "GatewayClientError",
           "HandshakeRefused", "Message", "Overflow", "ProtocolError", "QueueFull", "Reliable",
           "ReliableUnavailable", "State", "TooManyRequests"]
