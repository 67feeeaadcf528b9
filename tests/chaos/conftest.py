"""Fixtures shared by the chaos tests."""

from .. import httppeer

http_peer = httppeer.http_peer
