"""The least a Python multicast receiver can do: the probe of :mod:`bench.files_floor`.

``python floor_client.py URL INTERFACE``: one join (a bare HTTP/1.0 GET on a socket), then
count distinct page indexes on the cast's group until every page was seen, and exit. No
CRC check, no file, no SHA-256, no leave, no imports beyond ``socket`` and ``sys``: what
any Python client must at least spend to start and take every datagram off its socket.
Not a client for anything but this measurement (it trusts the server's reply).
"""

import socket
import sys


def main() -> int:
    url, interface = sys.argv[1], sys.argv[2]
    hostport, _, path = url.removeprefix("http://").partition("/")
    host, _, port = hostport.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(f"GET /{path} HTTP/1.0\r\nHost: {hostport}\r\n\r\n".encode())
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n", 1)[0]:
        print(f"floor_client: join refused: {head[:80]!r}", file=sys.stderr)
        return 1
    fields = dict(line.split("=", 1) for line in body.decode().split() if "=" in line)
    group, _, gport = fields["CONNECT"].rpartition(":")
    pages = int(fields["PAGES"])
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.bind((group, int(gport)))
    membership = socket.inet_aton(group) + socket.inet_aton(interface)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
    seen = bytearray(pages + 1)
    held = 0
    buffer = bytearray(65536)
    view = memoryview(buffer)
    while held < pages:
        sock.recv_into(buffer)
        index = int.from_bytes(view[4:8], "big")  # header: size, index, cast id, CRC
        if 0 < index <= pages and not seen[index]:
            seen[index] = 1
            held += 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
