"""
Listening sockets made the way operators need them.

TCP listeners set C{SO_REUSEPORT}, so a replacement process can bind beside
the old one and take over without a gap. Unix socket listeners remove a
stale socket file left by a process that died (only a socket nobody answers
on) and remove their own when they stop. C{systemd:NAME} takes a socket
that systemd passed in (C{LISTEN_PID}, C{LISTEN_FDS}, C{LISTEN_FDNAMES}).

Every listener is a Twisted port adopted from a socket made here, so a
L{ghosttwist.limits.ConnectionLimit} can hold its accepts back.
"""

from __future__ import annotations

import os
import socket
import stat

from twisted.internet import defer, tcp, unix
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from ghosttwist.addresses import Address

log = Logger()


def inherited_sockets() -> dict[str, int]:
    """
    The descriptors systemd passed to this process, by name.

    Twisted reads C{LISTEN_PID}, C{LISTEN_FDS} and C{LISTEN_FDNAMES} once,
    when C{twisted.internet.endpoints} is imported, and removes them from
    the environment; its reading is the one used here. A socket unit that
    sets no C{FileDescriptorName=} names its sockets after the unit, as in
    C{ghosttwist.socket}.
    """
    from twisted.internet.endpoints import _SystemdParser

    return _SystemdParser._sddaemon.inheritedNamedDescriptors()


class _Gated:
    """
    A port that asks its C{gate} how many connections it may accept now,
    and stops reading while the answer is none.
    """

    gate = None

    def doRead(self):
        gate = self.gate
        if gate is not None:
            room = gate.room()
            if room <= 0:
                self.stopReading()
                return None
            self.numberAccepts = max(1, min(self.numberAccepts, room))
        return super().doRead()


class _TCPPort(_Gated, tcp.Port):
    """
    A TCP port adopted from a socket made here or by systemd.
    """


class _UNIXPort(_Gated, unix.Port):
    """
    A unix socket port; it removes its socket file on stopping only if
    this process made it.
    """

    owns_path = True

    def connectionLost(self, reason) -> None:
        if self.owns_path:
            return super().connectionLost(reason)
        return tcp.Port.connectionLost(self, reason)


def _adopt(reactor, fd: int, family: int, factory, owns_path: bool = True):
    if family == socket.AF_UNIX:
        port = _UNIXPort._fromListeningDescriptor(reactor, fd, factory)
        port.owns_path = owns_path
        path = port._bindPath
        if path[:1] not in (b"\0", "\0", b"", ""):
            # Keep the mode the socket was made with: by bind() under the
            # umask (twistd --umask), or by systemd (SocketMode=). Twisted
            # would otherwise open it to everyone.
            port.mode = stat.S_IMODE(os.stat(path).st_mode)
    else:
        port = _TCPPort._fromListeningDescriptor(reactor, fd, family, factory)
    port.startListening()
    return port


@implementer(IStreamServerEndpoint)
class ReusePortTCPEndpoint:
    """
    Listens on a TCP address with C{SO_REUSEADDR} and C{SO_REUSEPORT} set,
    so that two processes may listen on one port while one replaces the
    other; the kernel shares new connections between them.
    """

    def __init__(self, reactor, host: str, port: int, backlog: int = 1024) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.backlog = backlog

    def listen(self, factory) -> defer.Deferred:
        return defer.execute(self._listen, factory)

    def _listen(self, factory):
        try:
            infos = socket.getaddrinfo(
                self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except socket.gaierror as error:
            raise CannotListenError(self.host, self.port, error) from None
        family, _, _, _, address = infos[0]

        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if hasattr(socket, "SO_REUSEPORT"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
            sock.listen(self.backlog)
            sock.setblocking(False)
            return _adopt(self.reactor, sock.fileno(), family, factory)
        except OSError as error:
            raise CannotListenError(self.host, self.port, error) from None
        finally:
            sock.close()


@implementer(IStreamServerEndpoint)
class CleanUNIXEndpoint:
    """
    Listens on a unix socket path. A socket file already there that nobody
    answers on is what a crashed process leaves behind, and is removed; a
    live socket, or a file that is not a socket, is left alone and the
    listen fails.
    """

    def __init__(self, reactor, path: str, backlog: int = 1024) -> None:
        self.reactor = reactor
        self.path = path
        self.backlog = backlog

    def listen(self, factory) -> defer.Deferred:
        return defer.execute(self._listen, factory)

    def _listen(self, factory):
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            sock.listen(self.backlog)
            sock.setblocking(False)
            return _adopt(self.reactor, sock.fileno(), socket.AF_UNIX, factory)
        except OSError as error:
            raise CannotListenError(None, self.path, error.strerror) from None
        finally:
            sock.close()

    def _remove_stale(self) -> None:
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        except OSError as error:
            raise CannotListenError(None, self.path, error.strerror) from None

        if not stat.S_ISSOCK(mode):
            raise CannotListenError(
                None, self.path, "the path exists and is not a socket"
            )

        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(self.path)
        except ConnectionRefusedError:
            os.unlink(self.path)
            log.info("removed stale socket {path}", path=self.path)
            return
        except OSError:
            pass
        finally:
            probe.close()
        raise CannotListenError(None, self.path, "another process is listening on it")


@implementer(IStreamServerEndpoint)
class SystemdEndpoint:
    """
    Listens on the socket systemd passed in under C{name} (the socket
    unit's C{FileDescriptorName=}, or C{unknown} when it set none).
    A unix socket taken this way belongs to systemd and is not removed.
    """

    def __init__(self, reactor, name: str) -> None:
        self.reactor = reactor
        self.name = name

    def listen(self, factory) -> defer.Deferred:
        return defer.execute(self._listen, factory)

    def _listen(self, factory):
        sockets = inherited_sockets()
        fd = sockets.get(self.name)
        if fd is None:
            passed = ", ".join(sorted(sockets)) or "none"
            raise CannotListenError(
                None,
                f"systemd:{self.name}",
                f"systemd passed no socket named {self.name!r} (passed: {passed})",
            )

        try:
            probe = socket.socket(fileno=os.dup(fd))
        except OSError as error:
            raise CannotListenError(None, f"systemd:{self.name}", error) from None
        family, kind = probe.family, probe.type
        listening = probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        probe.close()
        if kind != socket.SOCK_STREAM or not listening:
            raise CannotListenError(
                None, f"systemd:{self.name}", "not a listening stream socket"
            )

        os.set_blocking(fd, False)
        port = _adopt(self.reactor, fd, family, factory, owns_path=False)
        os.close(fd)
        return port


def server_endpoint(
    address: Address, reactor, backlog: int = 1024
) -> IStreamServerEndpoint:
    """
    The endpoint that listens on C{address} as described above; for
    C{--listen} and C{--status} alike.
    """
    if address.kind == "systemd":
        return SystemdEndpoint(reactor, address.name)
    if address.kind == "unix":
        return CleanUNIXEndpoint(reactor, address.path, backlog)
    return ReusePortTCPEndpoint(reactor, address.host, address.port, backlog)
