"""
Writing to a TCP transport without waiting for the next reactor turn.

Twisted's C{transport.write} queues the bytes and asks the reactor to watch
the socket for writability; the bytes leave on a later turn, after two
extra C{epoll_ctl} calls and a trip through C{doWrite}. A tunnel writes
each chunk the moment it has read it from the other side, usually onto an
idle socket: L{send_now} sends it right away when nothing is queued ahead
of it, and hands Twisted only what the socket did not take.
"""

from __future__ import annotations

from twisted.internet import tcp

_PLAIN_TCP = (tcp.Server, tcp.Client)


def send_now(transport, data: bytes) -> None:
    """
    Write C{data} to C{transport}: at once if it is a plain TCP transport
    with nothing queued, through C{transport.write} otherwise (and for
    whatever the socket does not take, or an error, which Twisted then
    finds and reports as usual).
    """
    if (
        type(transport) in _PLAIN_TCP
        and data
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnecting
        and not transport._writeDisconnected
        and not transport._tempDataBuffer
        and transport.offset == len(transport.dataBuffer)
    ):
        sent = transport.writeSomeData(data)
        if type(sent) is int and sent > 0:
            if sent == len(data):
                return
            data = data[sent:]
    transport.write(data)
