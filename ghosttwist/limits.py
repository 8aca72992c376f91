"""
C{--max-concurrent-conns}: connections past the limit wait, they are not
refused.

While the limit is reached the listening ports stop accepting, so new
connections wait in the kernel's accept queue; each connection that ends
makes room for the next. Nothing here times out a waiting connection: a
client that gives up waiting closes its socket, and is accepted and found
closed when its turn comes.
"""

from __future__ import annotations

from twisted.logger import Logger

log = Logger()


class ConnectionLimit:
    """
    Holds back the accepts of its ports while C{limit} connections of
    C{tracker} (a L{ghosttwist.proxy.ConnectionTracker}) are open.
    """

    def __init__(self, limit: int, tracker) -> None:
        self.limit = limit
        self.tracker = tracker
        self.ports: list = []
        self.waiting = False
        tracker.observers.append(self._changed)

    def room(self) -> int:
        """
        How many more connections may be accepted right now.
        """
        return self.limit - len(self.tracker.open)

    def attach(self, port) -> None:
        """
        Gate C{port} (a port made by L{ghosttwist.listeners}).
        """
        port.gate = self
        self.ports.append(port)

    def _changed(self) -> None:
        full = self.room() <= 0
        if full and not self.waiting:
            log.info(
                "{limit} connections open: new connections wait until one closes",
                limit=self.limit,
            )
        self.waiting = full

        for port in self.ports:
            if not getattr(port, "connected", False) or port.disconnecting:
                continue
            if full:
                port.stopReading()
            else:
                port.startReading()
