"""The socket between the server and its engine process: length-prefixed pickled messages.

Why not multiprocessing.Connection: its send blocks until the whole message is
written. The server writes commands on its event loop, and the loop is also
the only reader of the child's events; with both sides blocked in a write
(each socket buffer full, neither side reading) they would wait for each
other for ever. Here the server's side never blocks: what the socket does not
take at once waits in an outbox that the loop writes when the socket is
writable (add_writer), and reads take whatever has arrived (add_reader),
whole messages or not. The child's side blocks (it has nothing else to do),
which is safe because the server always reads.

    parent, child = socket.socketpair()            # child goes to the engine process
    pipe = ServerPipe(parent); pipe.attach(loop, on_message, on_closed)
    pipe.send(("open", ...), ("submit", ...))      # any thread, never blocks, in order
    ChildPipe(child).receive() / .send(message)    # in the child: blocking
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import select
import socket
import struct
import threading
import time
from typing import Any, Callable

logger = logging.getLogger("charstream.server")

HEADER = struct.Struct("!Q")  # the pickled message's length in bytes
READ_SIZE = 1 << 18


def encode(*messages: Any) -> bytes:
    """The frames of `messages`, in order (pickling errors are raised before anything is sent)."""
    frames = []
    for message in messages:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        frames += (HEADER.pack(len(data)), data)
    return b"".join(frames)


class FrameReader:
    """Bytes in, whole frames out: a frame may arrive over several reads, or several in one."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self._buffer
        buffer += data
        frames, start = [], 0
        while len(buffer) - start >= HEADER.size:
            (size,) = HEADER.unpack_from(buffer, start)
            end = start + HEADER.size + size
            if end > len(buffer):
                break
            frames.append(bytes(buffer[start + HEADER.size:end]))
            start = end
        del buffer[:start]
        return frames


class ServerPipe:
    """The server's end: non-blocking, read and written on the event loop it is attached to."""

    def __init__(self, sock: socket.socket):
        sock.setblocking(False)
        self._sock = sock
        self._fd = sock.fileno()  # kept: the loop's callbacks are removed by it after close
        self._lock = threading.Lock()  # senders on any thread; the outbox and its writer callback
        self._outbox = bytearray()  # bytes the socket has not taken yet, in order
        self._reader = FrameReader()
        self._early: list[Any] = []  # messages read before attach, not yet handed over
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writing = False  # a writer callback is (about to be) registered
        self._closed = False
        self._on_message: Callable[[Any], None] = lambda message: None
        self._on_closed: Callable[[], None] = lambda: None

    @property
    def pending_bytes(self) -> int:
        """Bytes sent but not yet taken by the socket."""
        return len(self._outbox)

    def receive_first(self, timeout: float) -> Any:
        """Before attach: wait up to `timeout` s for the peer's first message (TimeoutError; EOFError
        when the peer closed first). Messages that came with it are handed over on attach."""
        deadline = time.monotonic() + timeout
        while not self._early:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._fd], [], [], remaining)[0]:
                raise TimeoutError(f"no message within {timeout:.0f} s")
            try:
                data = self._sock.recv(READ_SIZE)
            except BlockingIOError:
                continue
            if not data:
                raise EOFError("the peer closed the pipe")
            self._early += [m for m in map(_loads, self._reader.feed(data)) if m is not None]
        return self._early.pop(0)

    def attach(self, loop: asyncio.AbstractEventLoop, on_message: Callable[[Any], None],
               on_closed: Callable[[], None]) -> None:
        """Deliver each message to `on_message` and the end of the stream to `on_closed`, on `loop`
        (call from its thread)."""
        self._loop, self._on_message, self._on_closed = loop, on_message, on_closed
        for message in self._early:
            loop.call_soon(on_message, message)
        self._early = []
        loop.add_reader(self._fd, self._on_readable)
        with self._lock:
            if self._outbox and not self._writing:
                self._writing = True
                loop.add_writer(self._fd, self._on_writable)

    def send(self, *messages: Any) -> None:
        """Queue `messages` (in order, after everything sent before); never blocks. After the pipe
        broke or closed they are dropped: the reader reports the end to whoever waits."""
        data = encode(*messages)
        with self._lock:
            if self._closed:
                return
            if not self._outbox:
                try:
                    sent = self._sock.send(data)
                except BlockingIOError:
                    sent = 0
                except OSError:  # the child is gone: the reader sees the end
                    return
                if sent == len(data):
                    return
                data = data[sent:]
            self._outbox += data
            if not self._writing and self._loop is not None:
                self._writing = True
                self._watch_writable()

    def _watch_writable(self) -> None:
        """Register the writer callback on the loop's thread (the lock is held)."""
        loop = self._loop
        assert loop is not None
        try:
            if _on_thread_of(loop):
                loop.add_writer(self._fd, self._on_writable)
            else:
                loop.call_soon_threadsafe(self._add_writer)
        except RuntimeError:  # the loop is closed: nothing will be written any more
            self._writing = False

    def _add_writer(self) -> None:
        with self._lock:
            if not self._closed and self._loop is not None:
                self._loop.add_writer(self._fd, self._on_writable)

    def _on_writable(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                sent = self._sock.send(self._outbox)
            except BlockingIOError:
                return
            except OSError:  # the child is gone: the reader reports it
                sent = len(self._outbox)
            del self._outbox[:sent]
            if not self._outbox:
                self._writing = False
                assert self._loop is not None
                self._loop.remove_writer(self._fd)

    def _on_readable(self) -> None:
        try:
            data = self._sock.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            self._on_closed()
            return
        for frame in self._reader.feed(data):
            message = _loads(frame)
            if message is not None:
                self._on_message(message)

    def close(self) -> None:
        """Stop reading and writing and close the socket; on the loop's thread once attached
        (or after its loop has stopped). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._outbox.clear()
            loop = self._loop
            if loop is not None and not loop.is_closed():
                loop.remove_reader(self._fd)
                loop.remove_writer(self._fd)
            self._sock.close()


class ChildPipe:
    """The engine process's end: blocking, whole messages."""

    def __init__(self, sock: socket.socket):
        sock.setblocking(True)
        self._sock = sock
        self._reader = FrameReader()

    def fileno(self) -> int:
        return self._sock.fileno()

    def send(self, *messages: Any) -> None:
        self._sock.sendall(encode(*messages))

    def receive(self) -> list[Any]:
        """Every message that has arrived, in order; waits until one whole message has. EOFError
        once the server has closed its end. A message that does not unpickle is logged and skipped."""
        while True:
            data = self._sock.recv(READ_SIZE)
            if not data:
                raise EOFError("the server closed the engine pipe")
            frames = self._reader.feed(data)
            if frames:
                return [message for message in map(_loads, frames) if message is not None]

    def close(self) -> None:
        self._sock.close()


def _loads(frame: bytes) -> Any:
    try:
        return pickle.loads(frame)
    except Exception:  # noqa: BLE001 - one unreadable message must not end the engine
        logger.exception("engine pipe message unreadable")
        return None


def _on_thread_of(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def run_on_loop(loop: asyncio.AbstractEventLoop | None, action: Callable[[], None], timeout: float) -> bool:
    """Run `action` on `loop`'s thread and wait for it (here, when the loop is not running; never
    call it from the loop's thread while the loop runs). False if it did not finish in `timeout`."""
    if loop is None or loop.is_closed() or not loop.is_running():
        action()
        return True
    done = threading.Event()

    def run() -> None:
        try:
            action()
        finally:
            done.set()

    try:
        loop.call_soon_threadsafe(run)
    except RuntimeError:  # closed meanwhile
        action()
        return True
    return done.wait(timeout)
