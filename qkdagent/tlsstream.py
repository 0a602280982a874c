"""TLS over a trio TCP stream for the agent's own HTTP connections (the peer API, both ends,
and `HttpClient`'s servers): OpenSSL does the protocol (`ssl.SSLObject` over memory BIOs),
this module only moves its bytes to and from the socket.

Why not `trio.SSLStream`: it is general (renegotiation while sending, `unwrap`, an
`https_compatible` mode, two locks and a conflict detector per direction, a retry loop around
every call), and it reaches the socket through trio's socket wrapper, which tries each call,
catches `BlockingIOError`, then waits and tries again. A rotation makes eight to twelve TLS
sends and receives on its path; there that generality cost about 19 us per call warm (two to
three times that in place) against about 8 us here: 0.17 ms of a one-link rotation's 3.4 ms
(interleaved runs of `bench_core.py latency`: docs/design-deviations.md). The handshake, every
record, every alert and every certificate check stay OpenSSL's; what is ours is short and
follows trio's own semantics, but for one thing: each call is a cancel point, and a schedule
point too except a send the socket takes at once (below); a send or handshake cancelled midway
leaves the stream broken (`trio.BrokenResourceError`), as do a TLS error, a reset and an EOF
without close_notify; a clean close_notify reads as b""; a socket closed under the stream (an
eviction) raises `trio.ClosedResourceError` in a waiting call, and every later call fails
without touching the descriptor; every socket read is a checkpoint, so a peer that keeps the
socket full cannot hold the loop; one sender and one receiver at a time
(`trio.BusyResourceError`; a receive that writes an answer to the peer, a KeyUpdate's, counts
as the sender meanwhile).

A send the socket takes without waiting does not let the other tasks run before it returns
(trio's streams do): every caller here waits for the peer next (a reply, the next request),
which is a pass of the loop anyway, so the pass after the send was a second one on each of a
rotation's four messages. A loop of sends still yields whenever the socket's buffer fills. A
caller that may go on without reading checkpoints itself: the peer server before a request
that came with the previous one (pipelined), the batch answers' writer to gather answers.
"""

from __future__ import annotations

import enum
import os
import ssl
from typing import Any

import trio

READ_SIZE = 65536
"""Bytes read from the socket at once (and the default `receive_some` size)."""


class _State(enum.Enum):
    NEW = "new"
    OK = "ok"
    BROKEN = "broken"
    CLOSED = "closed"


class TlsStream(trio.abc.Stream):
    """One TLS connection over `transport_stream`, which it owns (closed by `aclose`)."""

    def __init__(
        self,
        transport_stream: trio.SocketStream,
        context: ssl.SSLContext,
        *,
        server_side: bool = False,
        server_hostname: str | None = None,
    ) -> None:
        self.transport_stream = transport_stream
        self._socket = transport_stream.socket
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(
            self._incoming, self._outgoing, server_side=server_side, server_hostname=server_hostname
        )
        self._state = _State.NEW
        self._held = b""
        """A TLS 1.3 server's post-handshake records (session tickets), sent with its first
        reply as trio does: sent at once, a client that closes without reading them would
        see its close turned into a reset."""
        self._sending = False
        self._receiving = False

    def __repr__(self) -> str:
        return f"<TlsStream {self._state.value} fd={self._socket.fileno()}>"

    # -- what callers read about the connection ------------------------------------------------

    def getpeercert(self, binary_form: bool = False) -> Any:
        return self._tls.getpeercert(binary_form)

    def buffered(self) -> bool:
        """Whether bytes the peer sent have been received and not yet read (records decrypted
        or not): not visible on the socket, where a kept connection is checked for them."""
        return bool(self._tls.pending() or self._incoming.pending)

    # -- the handshake ---------------------------------------------------------------------

    async def do_handshake(self) -> None:
        """Complete the handshake (once; later calls are checkpoints). A failure raises
        `trio.BrokenResourceError` from the `ssl.SSLError` that says why."""
        if self._state is _State.OK:
            await trio.lowlevel.checkpoint()
            return
        self._check()
        self._enter(send=True, receive=True)
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            waited = False
            while True:
                try:
                    self._tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    waited |= await self._flush()
                    waited |= await self._fill()
                except (ssl.SSLError, ssl.CertificateError) as exc:
                    self._send_now()  # the alert saying why, if the socket takes it at once
                    raise self._broken() from exc
            if self._tls.server_side and self._tls.version() == "TLSv1.3":
                self._held = self._outgoing.read()
            waited |= await self._flush(held=False)
            self._state = _State.OK
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
        except BaseException:
            if self._state is _State.NEW:
                self._state = _State.BROKEN
            raise
        finally:
            self._leave(send=True, receive=True)

    # -- data --------------------------------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._enter(send=True)
        try:
            self._check(ready=True)
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                if data:
                    self._tls.write(data)
            except ssl.SSLWantReadError:
                # only a renegotiation wants to read while writing: not supported
                raise self._broken() from None
            except ssl.SSLError as exc:
                raise self._broken() from exc
            await self._flush()  # a schedule point only if the socket made it wait
        finally:
            self._leave(send=True)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        size = READ_SIZE if max_bytes is None else int(max_bytes)
        if size < 1:
            raise ValueError("max_bytes must be at least 1")
        self._enter(receive=True)
        try:
            self._check(ready=True)
            await trio.lowlevel.checkpoint_if_cancelled()
            waited = False
            while True:
                try:
                    data = self._tls.read(size)
                    break
                except ssl.SSLWantReadError:
                    if self._outgoing.pending and not self._sending:
                        # a KeyUpdate to answer, say: written as a send is, so that no
                        # send_all can put its records into the middle of it meanwhile
                        self._sending = True
                        try:
                            waited |= await self._flush()
                        finally:
                            self._sending = False
                    waited |= await self._fill()
                except ssl.SSLZeroReturnError:
                    data = b""  # close_notify
                    break
                except (ssl.SSLError, ssl.CertificateError) as exc:
                    raise self._broken() from exc  # an EOF without close_notify among them
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data
        finally:
            self._leave(receive=True)

    async def wait_send_all_might_not_block(self) -> None:
        self._check(ready=True)
        await trio.lowlevel.wait_writable(self._fd())

    async def aclose(self) -> None:
        """Send close_notify if that can be done without waiting, then close the socket."""
        if self._state is _State.CLOSED:
            await trio.lowlevel.checkpoint()
            return
        try:
            if self._state is _State.OK and not self._sending:
                try:
                    self._tls.unwrap()
                except (ssl.SSLWantReadError, ssl.SSLError):
                    pass  # close_notify is written either way; the peer's is not awaited
                self._send_now()
        finally:
            self._state = _State.CLOSED
            await self.transport_stream.aclose()

    # -- moving bytes --------------------------------------------------------------------------

    def _send_now(self) -> None:
        """Write what OpenSSL produced (an alert, a close_notify) if the socket takes it
        without waiting, after the held tickets: they took the first record numbers, so what
        follows them is unreadable without them."""
        data = self._held + self._outgoing.read()
        self._held = b""
        fd = self._socket.fileno()
        if data and fd >= 0:
            try:
                os.write(fd, data)
            except OSError:
                pass  # a full buffer or a reset: the close is all that is left

    def _fd(self) -> int:
        """The socket's descriptor, checked before every call on it: one closed under the
        stream (its number free for reuse) is never read or written."""
        fd = self._socket.fileno()
        if fd < 0:
            if self._state is not _State.CLOSED:
                self._state = _State.BROKEN
            raise trio.ClosedResourceError("the connection's socket was closed")
        return fd

    async def _flush(self, *, held: bool = True) -> bool:
        """Write everything OpenSSL has produced (after the held tickets, with `held`);
        returns whether it had to wait. Interrupted, the stream is broken (records were
        sealed that the peer will never see whole)."""
        data = self._outgoing.read()
        if held and self._held:
            data, self._held = self._held + data, b""
        if not data:
            return False
        waited = False
        view = memoryview(data)
        try:
            while view:
                fd = self._fd()
                try:
                    view = view[os.write(fd, view) :]
                except BlockingIOError:
                    waited = True
                    await trio.lowlevel.wait_writable(fd)
        except OSError as exc:
            raise self._broken() from exc
        except BaseException:
            if self._state is not _State.CLOSED:  # closed meanwhile by `aclose`: stays so
                self._state = _State.BROKEN
            raise
        return waited

    async def _fill(self) -> bool:
        """Read once from the socket into OpenSSL (EOF as EOF); a checkpoint (returns True)."""
        if self._incoming.eof:
            raise self._broken()  # OpenSSL wants more after the EOF: never comes
        waited = False
        while True:
            fd = self._fd()
            try:
                data = os.read(fd, READ_SIZE)
                break
            except BlockingIOError:
                waited = True
                await trio.lowlevel.wait_readable(fd)
            except OSError as exc:
                raise self._broken() from exc
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()
        if not waited:
            # As trio's socket does after each read: a peer that keeps the socket full of
            # records carrying no data (session tickets, key updates: OpenSSL takes any
            # number) would otherwise hold the loop, every deadline included. The bytes are
            # in the BIO already: a cancellation here loses nothing.
            await trio.lowlevel.checkpoint()
        return True

    # -- state ---------------------------------------------------------------------------------

    def _broken(self) -> trio.BrokenResourceError:
        self._state = _State.BROKEN
        return trio.BrokenResourceError("TLS connection broken")

    def _check(self, *, ready: bool = False) -> None:
        if self._state is _State.BROKEN:
            raise trio.BrokenResourceError("TLS connection broken")
        if self._state is _State.CLOSED:
            raise trio.ClosedResourceError("TLS connection closed")
        if ready and self._state is _State.NEW:
            raise trio.BrokenResourceError("TLS handshake not done")

    def _enter(self, *, send: bool = False, receive: bool = False) -> None:
        if (send and self._sending) or (receive and self._receiving):
            raise trio.BusyResourceError("another task is using this direction of the stream")
        self._sending |= send
        self._receiving |= receive

    def _leave(self, *, send: bool = False, receive: bool = False) -> None:
        if send:
            self._sending = False
        if receive:
            self._receiving = False
