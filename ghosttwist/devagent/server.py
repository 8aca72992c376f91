"""
The SPIFFE Workload API over gRPC, one unix socket per workload.

The socket a call arrives on decides which SVID it gets: each socket has its
own gRPC server and its own L{WorkloadApiServicer}, bound to one path. The
handlers run on gRPC's threads and read only L{Snapshot}s from the board.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
from spiffe._proto import workload_pb2, workload_pb2_grpc

from ghosttwist.devagent.state import Snapshot, SnapshotBoard

#: The metadata every Workload API client must send, so that a browser or a
#: server-side request forgery cannot reach the API by accident.
SECURITY_HEADER = ("workload.spiffe.io", "true")

#: Worker threads per socket; every open stream holds one for its lifetime.
MAX_WORKERS = 64


class WorkloadApiServicer(workload_pb2_grpc.SpiffeWorkloadAPIServicer):
    """
    The Workload API for the workload whose socket is C{socket_path}.

    X.509 only: the JWT methods answer UNIMPLEMENTED.
    """

    def __init__(self, board: SnapshotBoard, socket_path: str) -> None:
        self._board = board
        self._socket_path = socket_path

    def FetchX509SVID(self, request, context) -> Iterator:
        _require_security_header(context)
        return self._stream(context, self._svid_response)

    def FetchX509Bundles(self, request, context) -> Iterator:
        _require_security_header(context)
        return self._stream(context, _bundles_response)

    def FetchJWTSVID(self, request, context):
        _require_security_header(context)
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "the dev agent has no JWT-SVIDs")

    def FetchJWTBundles(self, request, context):
        _require_security_header(context)
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "the dev agent has no JWT-SVIDs")

    def ValidateJWTSVID(self, request, context):
        _require_security_header(context)
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "the dev agent has no JWT-SVIDs")

    def _svid_response(self, snapshot: Snapshot):
        svid = snapshot.svids.get(self._socket_path)
        if svid is None:
            return None
        message = workload_pb2.X509SVID(
            spiffe_id=svid.spiffe_id,
            x509_svid=svid.chain_der,
            x509_svid_key=svid.key_der,
            bundle=snapshot.own_bundle,
        )
        return workload_pb2.X509SVIDResponse(
            svids=[message], federated_bundles=snapshot.federated_bundles
        )

    def _stream(self, context, build: Callable[[Snapshot], object]) -> Iterator:
        """
        Send the current answer at once, then again whenever it changes.

        Ends when the client goes away or the board closes (the agent stops).
        """
        context.add_callback(self._board.wake)
        generation = -1
        last = None
        while True:
            snapshot = self._board.wait_newer(generation, context.is_active)
            if snapshot is None:
                return
            generation = snapshot.generation

            message = build(snapshot)
            if message is not None and message != last:
                last = message
                yield message


def _bundles_response(snapshot: Snapshot):
    return workload_pb2.X509BundlesResponse(bundles=snapshot.bundles)


def _require_security_header(context) -> None:
    if SECURITY_HEADER not in tuple(context.invocation_metadata()):
        context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request"
        )


def remove_socket_file(path: str) -> None:
    """
    Remove C{path} if it is a unix socket; leave anything else alone.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISSOCK(mode):
        os.unlink(path)


def start_workload_server(board: SnapshotBoard, socket_path: str) -> grpc.Server:
    """
    Listen on C{socket_path} and serve its workload's Workload API.

    @raise RuntimeError: when gRPC cannot bind the socket.
    """
    os.makedirs(os.path.dirname(socket_path), exist_ok=True)
    remove_socket_file(socket_path)

    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=MAX_WORKERS, thread_name_prefix="dev-agent-grpc"
        )
    )
    workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(
        WorkloadApiServicer(board, socket_path), server
    )
    if server.add_insecure_port(f"unix:{socket_path}") == 0:
        raise RuntimeError(f"could not listen on unix:{socket_path}")
    server.start()
    return server
