"""A TCP proxy between the gateway and a backend, to make trouble on that hop.

Each accepted connection is piped to `target` (a port on 127.0.0.1). `mode`:
"pass" forwards as it comes; "delay" holds each chunk `delay_s` before writing it
(in order: one queue per direction); "stall" stops forwarding on every connection
(what arrives is read and dropped) and closes nothing (both ends think it lives); "reset" forwards the first 3 bytes of
the next chunk from the backend (a frame cut in its middle) and then aborts both sockets.
Connections made after a reset pass normally unless `mode` says otherwise.
"""

from __future__ import annotations

import asyncio


class ChaosProxy:
    def __init__(self, target: int):
        self.target = target
        self.mode = "pass"
        self.delay_s = 0.05
        self.server: asyncio.Server | None = None
        self.port = 0
        self.conns: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self.resets = 0
        self.tasks: set[asyncio.Task] = set()

    def url(self, path: str = "/ws") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.server.close()
        for a, b in self.conns:
            a.transport.abort()
            b.transport.abort()
        for t in list(self.tasks):
            t.cancel()

    async def _conn(self, reader, writer) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        self.conns.append(pair)
        for r, w, from_backend in ((reader, up_writer, False), (up_reader, writer, True)):
            t = asyncio.ensure_future(self._pump(pair, r, w, from_backend))
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)

    async def _pump(self, pair, reader, writer, from_backend: bool) -> None:
        queue: asyncio.Queue = asyncio.Queue()
        delayed = asyncio.ensure_future(self._delayed(queue, writer))
        try:
            while data := await reader.read(65536):
                mode = self.mode
                if mode == "stall":
                    continue
                if mode == "reset" and from_backend:
                    # The backend's frames here are small and each written whole, so a read
                    # starts at a frame: 3 bytes are its 2-byte header and 1 payload byte.
                    writer.write(data[:3])
                    self.resets += 1
                    for w in pair:
                        w.transport.abort()
                    return
                if mode == "delay":
                    queue.put_nowait((asyncio.get_running_loop().time() + self.delay_s, data))
                else:
                    await queue.join()        # what was delayed goes first
                    writer.write(data)
        except (ConnectionError, OSError):
            pass
        finally:
            await queue.join() if not writer.is_closing() else None
            delayed.cancel()
        if self.mode != "stall":
            writer.transport.abort()

    async def _delayed(self, queue: asyncio.Queue, writer) -> None:
        loop = asyncio.get_running_loop()
        while True:
            at, data = await queue.get()
            if at > loop.time():
                await asyncio.sleep(at - loop.time())
            if not writer.is_closing():
                writer.write(data)
            queue.task_done()
