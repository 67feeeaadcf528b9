from __future__ import annotations

import pytest

from .. import httppeer
from .support import ADMIN_TOKEN, JWT_ENV, SECRET, RawRecorder

http_peer = httppeer.http_peer   # the fixture, for the HTTP-backend tests


@pytest.fixture(autouse=True)
def secrets_env(monkeypatch):
    monkeypatch.setenv(JWT_ENV, SECRET)
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)


@pytest.fixture
async def recorder():
    r = RawRecorder()
    await r.start()
    yield r
    await r.stop()
