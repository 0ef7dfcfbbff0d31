"""Just enough of the Kafka protocol, over a plain socket, to know a broker serves clients: ApiVersions v0,
then Metadata v1 listing the broker itself (kafka_broker.py waits on `probe` after a start)."""

from __future__ import annotations

import socket
import struct

_CLIENT_ID = b"popbridge-kafka-broker"
_API_METADATA = 3
_API_VERSIONS = 18


def probe(host: str, port: int, timeout: float = 2.0) -> str | None:
    """None when the broker answers ApiVersions and lists itself in Metadata; otherwise why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            versions = _api_versions(sock)
            low, high = versions.get(_API_METADATA, (1, 0))
            if not low <= 1 <= high:
                return f"broker serves no Metadata v1 (only v{low}-v{high})"
            brokers = _metadata_brokers(sock)
    except (OSError, ValueError, struct.error) as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return None if (host, port) in brokers else f"Metadata lists {sorted(brokers)}, not {host}:{port}"


def _exchange(sock: socket.socket, api_key: int, version: int, correlation: int, body: bytes) -> bytes:
    """Send one request with header v1 (non-flexible versions) and return the response body."""
    header = struct.pack(">hhih", api_key, version, correlation, len(_CLIENT_ID)) + _CLIENT_ID
    sock.sendall(struct.pack(">i", len(header) + len(body)) + header + body)
    (size,) = struct.unpack(">i", _receive(sock, 4))
    response = _receive(sock, size)
    (echoed,) = struct.unpack_from(">i", response)
    if echoed != correlation:
        raise ValueError(f"correlation id {echoed} in the reply to request {correlation}")
    return response[4:]


def _receive(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the broker closed the connection")
        data += chunk
    return bytes(data)


def _api_versions(sock: socket.socket) -> dict[int, tuple[int, int]]:
    """ApiVersions v0: error_code int16, then [api_key int16, min int16, max int16]."""
    body = _exchange(sock, _API_VERSIONS, 0, 1, b"")
    error, count = struct.unpack_from(">hi", body)
    if error:
        raise ValueError(f"ApiVersions answered error code {error}")
    return {key: (low, high) for key, low, high in struct.iter_unpack(">hhh", body[6 : 6 + 6 * count])}


def _metadata_brokers(sock: socket.socket) -> set[tuple[str, int]]:
    """Metadata v1 for no topics: brokers [node_id int32, host string, port int32, rack nullable string]."""
    body = _exchange(sock, _API_METADATA, 1, 2, struct.pack(">i", 0))
    (count,) = struct.unpack_from(">i", body)
    offset, brokers = 4, set[tuple[str, int]]()
    for _ in range(count):
        _node_id, host_length = struct.unpack_from(">ih", body, offset)
        host = body[offset + 6 : offset + 6 + host_length].decode()
        port, rack_length = struct.unpack_from(">ih", body, offset + 6 + host_length)
        offset += 6 + host_length + 6 + max(rack_length, 0)
        brokers.add((host, port))
    return brokers
