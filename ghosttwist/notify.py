"""
systemd's notification protocol: C{READY=1} once the tunnel listens with an
identity, C{STATUS=} lines as the identity changes, C{WATCHDOG=1} pings
while C{WATCHDOG_USEC} asks for them, C{STOPPING=1} on the way out.

Messages are datagrams to the unix socket named by C{NOTIFY_SOCKET} (a
leading C{@} names an abstract socket). Without that variable every call
does nothing, so the tunnel behaves the same outside systemd.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()


class SystemdNotifier:
    """
    Tells the service manager how the tunnel is doing.

    @ivar watchdog_interval: seconds between pings, or L{None} when the
        manager asked for none (half of C{WATCHDOG_USEC}, as systemd advises).
    """

    def __init__(self, reactor, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        self.reactor = reactor
        self.address = _socket_address(environ.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval = _watchdog_interval(environ)
        self._socket: socket.socket | None = None
        self._pinger: LoopingCall | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def start(self) -> None:
        """
        Open the socket and start the watchdog pings, if asked for.
        """
        if not self.enabled:
            return
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setblocking(False)
        if self.watchdog_interval:
            self._pinger = LoopingCall(self.send, WATCHDOG="1")
            self._pinger.clock = self.reactor
            self._pinger.start(self.watchdog_interval, now=True)

    def ready(self, status: str) -> None:
        """
        The tunnel is serving.
        """
        self.send(READY="1", STATUS=status)

    def status(self, status: str) -> None:
        """
        A one-line description of the tunnel's state, for C{systemctl status}.
        """
        self.send(STATUS=status)

    def stopping(self) -> None:
        """
        The tunnel is draining; stop the pings.
        """
        self.send(STOPPING="1", STATUS="stopping: draining connections")
        if self._pinger is not None and self._pinger.running:
            self._pinger.stop()
        self._pinger = None

    def stop(self) -> None:
        """
        Stop pinging and close the socket.
        """
        if self._pinger is not None and self._pinger.running:
            self._pinger.stop()
        self._pinger = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def send(self, **fields: str) -> None:
        """
        Send one datagram of C{KEY=VALUE} lines; a failure is logged once.
        """
        if self._socket is None:
            return
        message = "".join(
            f"{key}={value.replace(chr(10), ' ')}\n" for key, value in fields.items()
        )
        try:
            self._socket.sendto(message.encode(), self.address)
        except OSError as error:
            if not self._warned:
                self._warned = True
                log.warn(
                    "cannot notify systemd at NOTIFY_SOCKET ({error}); "
                    "is the service manager still there?",
                    error=error,
                )


def _socket_address(text: str) -> str | bytes | None:
    if not text:
        return None
    if text.startswith("@"):
        return b"\0" + text[1:].encode()
    return text


def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1e6 / 2
