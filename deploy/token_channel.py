"""The token channel: how a ModelServer replica's outputs reach a gateway replica, once per step for all of that
gateway's requests (one framed message on one TCP connection), never one Ray streaming item per token.

Gateway side, ChannelListener: a listener on the gateway's node address, a Mailbox per request; what arrives while
the request's writer is busy coalesces (the next take gets all of it). ModelServer side, ChannelSender: one
connection per gateway address, `add` during a step batch, `flush` once after it. A connection proves itself with
the listener's random token (sent only inside Ray calls) before anything it sends is read. Knows nothing of Ray.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import pickle
import secrets
import socket
import struct
import threading
from collections.abc import Callable

from engine.token_output import TokenOutput

logger = logging.getLogger(__name__)
_LENGTH = struct.Struct("!I")
TOKEN_BYTES = 32                # hex characters of the listener's token


class Mailbox:
    """One request's outputs as they arrive, taken all at once."""

    def __init__(self):
        self._items: list[TokenOutput] = []
        self._ready = asyncio.Event()

    def put(self, item: TokenOutput) -> None:
        self._items.append(item)
        self._ready.set()

    def wake(self) -> None:
        """Make the pending `take` return (with whatever is there, possibly nothing): its call ended."""
        self._ready.set()

    async def take(self) -> list[TokenOutput]:
        await self._ready.wait()
        self._ready.clear()
        items, self._items = self._items, []
        return items


class ChannelListener:
    """Gateway side. `address` = (host, port, token) goes with every request to the ModelServer."""

    def __init__(self):
        self.token = secrets.token_hex(TOKEN_BYTES // 2)
        self.address: tuple[str, int, str] | None = None
        self._mailboxes: dict[str, Mailbox] = {}
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.StreamWriter] = set()

    async def start(self, host: str) -> None:
        self._server = await asyncio.start_server(self._serve, host, 0)
        self.address = (host, self._server.sockets[0].getsockname()[1], self.token)
        logger.info("token channel listening on %s:%d", host, self.address[1])

    def open(self, request_id: str) -> Mailbox:
        mailbox = self._mailboxes[request_id] = Mailbox()
        return mailbox

    def close(self, request_id: str) -> None:
        self._mailboxes.pop(request_id, None)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._connections):
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        try:
            token = await reader.readexactly(TOKEN_BYTES)
            if not hmac.compare_digest(token, self.token.encode()):
                logger.warning("token channel: refused a connection with a wrong token")
                return
            while True:
                (size,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
                for out in pickle.loads(await reader.readexactly(size)):
                    mailbox = self._mailboxes.get(out.request_id)
                    if mailbox is not None:          # gone: the client left and the request was cancelled
                        mailbox.put(out)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass                                     # the ModelServer closed it (or died: its calls fail too)
        finally:
            self._connections.discard(writer)
            writer.close()


class ChannelSender:
    """ModelServer side, one per gateway address; used from the replica's reader thread (blocking sends: a slow
    gateway slows this replica's reader, and the ranks' outputs coalesce upstream instead of piling up)."""

    def __init__(self, address: tuple[str, int, str], on_broken: Callable[[BaseException], None],
                 timeout_s: float = 30.0):
        self.address, self.on_broken, self.timeout_s = address, on_broken, timeout_s
        self._sock: socket.socket | None = None
        self._batch: list[TokenOutput] = []
        self._after: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self.broken: BaseException | None = None

    def add(self, outputs: list[TokenOutput]) -> None:
        self._batch.extend(outputs)

    def after_flush(self, callback: Callable[[], None]) -> None:
        """Run `callback` once what was added so far has been sent (a request's call returns after its last
        outputs are on their way)."""
        self._after.append(callback)

    def flush(self) -> None:
        batch, self._batch = self._batch, []
        after, self._after = self._after, []
        if batch and self.broken is None:
            payload = pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)
            try:
                with self._lock:
                    self._connect().sendall(_LENGTH.pack(len(payload)) + payload)
            except OSError as e:
                logger.error("token channel to %s:%d broke: %s", self.address[0], self.address[1], e)
                self.broken = e
                self.close()
                self.on_broken(e)
        for callback in after:
            callback()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _connect(self) -> socket.socket:
        if self._sock is None:
            host, port, token = self.address
            self._sock = socket.create_connection((host, port), timeout=self.timeout_s)
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock.sendall(token.encode())
        return self._sock
