"""RPC devices: a model's layers on other machines, through llama.cpp's own RPC backend (ggml-rpc).

Each machine runs `ggml-rpc-server -H ADDR -p PORT` (build/upstream/bin), which
serves its devices over TCP; Model(rpc_servers="host:port,...") hands them to
llama.cpp beside the local ones.  llama.cpp aborts the whole process when an
endpoint is malformed, unreachable or not an RPC server, so each endpoint is
checked here first: parsed as llama.cpp parses it, then connected to and
greeted with the protocol's HELLO, both under a timeout.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections import Counter
from collections.abc import Sequence

from .bindings import ffi, lib
from .errors import RpcError

TIMEOUT_S = 5.0    # per endpoint, for connecting and for the HELLO answer
_CMD_HELLO = 14    # RPC_CMD_HELLO: fixed in every protocol version
_CAPS_SIZE = 24    # RPC_CONN_CAPS_SIZE: transport capabilities, all zero for plain TCP
_HELLO_REPLY = struct.Struct("=BBBx24x")  # major, minor, patch, padding, caps

# Endpoints that open models of this process are connected to.  An rpc-server
# serves one client at a time, so a second greeting would wait behind our own
# connection: such endpoints are known good and are not probed again.
_connected: Counter[str] = Counter()
_lock = threading.Lock()


def parse(servers: str | Sequence[str]) -> list[str]:
    """'host:port,host:port' (llama-cpp-python's form) or a list of 'host:port' -> the endpoints."""
    if isinstance(servers, str):
        items: list = servers.split(",")
    elif isinstance(servers, (list, tuple)):
        items = list(servers)
    else:
        raise TypeError(f"rpc_servers: expected 'host:port,...' or a list of 'host:port', "
                        f"got {type(servers).__name__}")
    endpoints: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"rpc_servers: {item!r} is not a 'host:port' string")
        endpoint = item.strip()
        host, sep, port = endpoint.partition(":")  # llama.cpp splits at the first ':' and wants IPv4 or a name
        if not (host and sep and port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"rpc_servers: {endpoint!r} is not host:port (an IPv4 address or a name, "
                             f"then a port in 1..65535)")
        if endpoint in endpoints:
            raise ValueError(f"rpc_servers: {endpoint} is listed twice")
        endpoints.append(endpoint)
    if not endpoints:
        raise ValueError("rpc_servers: no endpoint given")
    return endpoints


def probe(endpoint: str, timeout: float) -> None:
    """Connect and exchange HELLO as llama.cpp will; RpcError naming the endpoint if that would fail."""
    host, _, port = endpoint.partition(":")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # IPv4, as llama.cpp connects
        sock.settimeout(timeout)
        try:
            sock.connect((socket.gethostbyname(host), int(port)))
        except OSError as e:
            raise RpcError(f"rpc_servers: cannot reach {endpoint}: {e.strerror or e}") from None
        try:
            sock.sendall(struct.pack("=BQ", _CMD_HELLO, _CAPS_SIZE) + bytes(_CAPS_SIZE))
            (size,) = struct.unpack("=Q", _receive(sock, 8))
            reply = _receive(sock, size) if size == _HELLO_REPLY.size else None
        except socket.timeout:
            raise RpcError(f"rpc_servers: {endpoint} did not answer within {timeout:g}s (is ggml-rpc-server "
                           f"running there? it serves one client at a time)") from None
        except ConnectionResetError:  # a clean close or a reset: which one depends on timing
            raise RpcError(f"rpc_servers: {endpoint} broke off the HELLO handshake: it closed the connection") from None
        except OSError as e:
            raise RpcError(f"rpc_servers: {endpoint} broke off the HELLO handshake: {e.strerror or e}") from None
    if reply is None:
        raise RpcError(f"rpc_servers: {endpoint} answered HELLO with {size} bytes, not {_HELLO_REPLY.size}: "
                       f"not a ggml-rpc-server of this protocol")
    major, minor, patch = _HELLO_REPLY.unpack(reply)
    if major != lib.RPC_PROTO_MAJOR_VERSION or minor > lib.RPC_PROTO_MINOR_VERSION:
        raise RpcError(f"rpc_servers: {endpoint} speaks RPC protocol {major}.{minor}.{patch}, this build "
                       f"{lib.RPC_PROTO_MAJOR_VERSION}.{lib.RPC_PROTO_MINOR_VERSION}: use the same llama.cpp on both")


def _receive(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        part = sock.recv(n - len(data))
        if not part:
            raise ConnectionResetError(0, "it closed the connection")
        data += part
    return data


def connect(endpoints: list[str]) -> list:
    """The devices (ggml_backend_dev_t) of these endpoints, in order; the caller must call release() later."""
    devices = []
    with _lock:
        for endpoint in endpoints:
            if not _connected[endpoint]:
                probe(endpoint, TIMEOUT_S)
        for endpoint in endpoints:
            reg = lib.ggml_backend_rpc_add_server(endpoint.encode())
            if reg == ffi.NULL:
                raise RpcError(f"rpc_servers: {endpoint} offers no device")
            devices += [lib.ggml_backend_reg_dev_get(reg, i) for i in range(lib.ggml_backend_reg_dev_count(reg))]
        _connected.update(endpoints)
    return devices


def release(endpoints: list[str]) -> None:
    """A model that used these endpoints is closed (its connections with it)."""
    with _lock:
        _connected.subtract(endpoints)


def local_devices() -> list:
    """The local accelerators llama.cpp would pick by default: the GPUs, else the integrated GPUs."""
    found = [lib.ggml_backend_dev_get(i) for i in range(lib.ggml_backend_dev_count())]
    gpus = [d for d in found if lib.ggml_backend_dev_type(d) == lib.GGML_BACKEND_DEVICE_TYPE_GPU]
    return gpus or [d for d in found if lib.ggml_backend_dev_type(d) == lib.GGML_BACKEND_DEVICE_TYPE_IGPU]
