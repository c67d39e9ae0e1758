"""The engine process's connections to the server processes it serves (links).

Link 0 is the socket the engine was spawned with: the server that started it.
With front-ends (server/frontends/), more server processes connect to a Unix
socket the engine listens on; each gets the next index (never reused) in its
first message, and numbers its requests from `index << ID_SHIFT`, so that a
request id alone says which link its events go to, with no table to keep.

A link that breaks (its process exited or was killed) is dropped: the loop
ends its requests as the server would on a disconnect, keeping what was
delivered (process_child.py), and the others go on. A broken link 0 means the
whole server is gone.

    links = Links(first_pipe, listener)       # listener: None without front-ends
    for index, pipe in links.readable(block): ...
    links.send(index, message)                # False: that link just broke
    links.split(events)                       # {index: its events}
"""

from __future__ import annotations

import logging
import select
import socket
from typing import Any, Iterator

import numpy as np

from server.engine.generation import BLOCK
from server.engine.runtime.process_pipe import ChildPipe
from server.structured_log import log_event

logger = logging.getLogger("charstream.server")

ID_SHIFT = 40  # request id >> ID_SHIFT = the link it came from (2**40 requests per link)


def link_of(request_id: int) -> int:
    return request_id >> ID_SHIFT


class Links:
    def __init__(self, first: ChildPipe, listener: socket.socket | None = None):
        self.pipes: dict[int, ChildPipe] = {0: first}
        self._by_fd: dict[int, int] = {first.fileno(): 0}
        self._listener = listener
        self._next = 1
        self.lost: list[int] = []  # links that broke since the loop last looked (it ends their requests)
        self.accepted: list[int] = []  # links that connected since the loop last looked (it greets them)
        self._mute: set[int] = set()  # links a write found gone: read to their end, never written
        self._poller = select.poll()  # one poll object: building a selector per call costs an iteration
        self._poller.register(first.fileno(), select.POLLIN)
        if listener is not None:
            listener.setblocking(False)
            self._poller.register(listener.fileno(), select.POLLIN)

    def __len__(self) -> int:
        return len(self.pipes)

    def readable(self, block: bool, timeout: float | None = None) -> Iterator[tuple[int, ChildPipe]]:
        """Links with a command (or their end) waiting; new connections are accepted on the way.
        `block`: wait until something arrives (at most `timeout` s)."""
        wait = None if timeout is None else int(timeout * 1000)
        for fd, _ in self._poller.poll(wait if block else 0):
            if self._listener is not None and fd == self._listener.fileno():
                self._accept()
                continue
            index = self._by_fd.get(fd)
            if index is not None:
                yield index, self.pipes[index]

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()  # type: ignore[union-attr]
        except (BlockingIOError, InterruptedError):
            return
        index, self._next = self._next, self._next + 1
        pipe = ChildPipe(sock)
        self.pipes[index] = pipe
        self._by_fd[pipe.fileno()] = index
        self._poller.register(pipe.fileno(), select.POLLIN)
        self.accepted.append(index)
        log_event(logger, "engine_link_opened", link=index)

    def drop(self, index: int) -> None:
        """Forget a broken link (idempotent); the loop learns of it from `lost`."""
        pipe = self.pipes.pop(index, None)
        self._mute.discard(index)
        if pipe is None:
            return
        fd = pipe.fileno()
        self._by_fd.pop(fd, None)
        try:
            self._poller.unregister(fd)
        except (KeyError, ValueError):
            pass
        pipe.close()
        self.lost.append(index)
        log_event(logger, "engine_link_closed", link=index)

    def send(self, index: int, *messages: Any) -> bool:
        """Send to one link (blocking: a server process always reads); False if it is gone."""
        pipe = self.pipes.get(index)
        if pipe is None or index in self._mute:
            return False
        try:
            pipe.send(*messages)
        except OSError:  # the process is gone (EPIPE, reset): its requests end, the rest go on
            # Not dropped yet: what it sent before it died (its last acknowledgements) is still
            # to be read, and the read that reaches the end drops it.
            self._mute.add(index)
            return False
        return True

    def observer(self, hosted: bool) -> int | None:
        """The link that gets the engine's observations and cache stats (the metrics of the whole
        engine, counted once): the oldest live front-end; link 0 when it serves streams itself."""
        first = 1 if hosted else 0
        return min((index for index in self.pipes if index >= first), default=None)

    def split(self, events: list[tuple[int, Any]]) -> dict[int, list[tuple[int, Any]]]:
        """Events by link; a block of characters (ids [R], tokens [R], as wire_events sends it)
        is cut into one block per link holding rows of it."""
        if len(self.pipes) == 1:
            return {next(iter(self.pipes)): events}
        out: dict[int, list[tuple[int, Any]]] = {}
        for request_id, payload in events:
            if request_id != BLOCK:
                out.setdefault(link_of(request_id), []).append((request_id, payload))
                continue
            ids, tokens = payload  # [R] request ids, [R] token ids
            owners = ids >> ID_SHIFT  # [R]
            for index in np.unique(owners).tolist():
                mask = owners == index
                out.setdefault(index, []).append((BLOCK, (ids[mask], tokens[mask])))
        return out

    def close(self) -> None:
        for index in list(self.pipes):
            pipe = self.pipes.pop(index)
            pipe.close()
        if self._listener is not None:
            self._listener.close()
