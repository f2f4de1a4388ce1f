"""The real node's cluster DNS: ``clusterdns.py LISTEN_IP NAME=IP...`` (UDP port 53).

A cluster's pods resolve ``kubernetes.default.svc`` through cluster DNS (CoreDNS); kopf's
in-cluster login uses exactly that name, not ``KUBERNETES_SERVICE_HOST``. The dev cluster
has no DNS, so the kubelet's ``clusterDNS`` points here: A records for the names given (the
``kubernetes`` Service under its cluster domain), an empty answer for other record types of
those names, NXDOMAIN for everything else (pods need no other name: the kubelet's /etc/hosts
carries the pod's own, which is what the PyTorchJob's MASTER_ADDR names). Runs until SIGTERM.
"""

from __future__ import annotations

import socket
import struct
import sys

TYPE_A = 1
CLASS_IN = 1


def parse_question(msg: bytes) -> tuple[int, int, str, int, int]:
    """(id, flags, name, qtype, end offset of the question) of a one-question query."""
    qid, flags, qdcount = struct.unpack("!HHH", msg[:6])
    if qdcount != 1:
        raise ValueError("one question expected")
    labels, i = [], 12
    while msg[i]:
        n = msg[i]
        labels.append(msg[i + 1 : i + 1 + n].decode("ascii").lower())
        i += 1 + n
    qtype, _qclass = struct.unpack("!HH", msg[i + 1 : i + 5])
    return qid, flags, ".".join(labels), qtype, i + 5


def answer(msg: bytes, records: dict[str, str]) -> bytes:
    qid, flags, name, qtype, end = parse_question(msg)
    question = msg[12:end]
    rd = flags & 0x0100
    known = name.rstrip(".") in records
    rcode = 0 if known else 3  # NXDOMAIN
    answers = b""
    if known and qtype == TYPE_A:
        ip = socket.inet_aton(records[name.rstrip(".")])
        # name as a pointer to the question (offset 12), TTL 30 s
        answers = struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, 30, 4) + ip
    header = struct.pack("!HHHHHH", qid, 0x8000 | 0x0400 | rd | rcode, 1, 1 if answers else 0, 0, 0)
    return header + question + answers


def serve(listen: str, records: dict[str, str]) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((listen, 53))
    while True:
        msg, peer = sock.recvfrom(512)
        try:
            sock.sendto(answer(msg, records), peer)
        except (ValueError, IndexError, struct.error, UnicodeDecodeError):
            continue  # not a query we understand: no answer, the client times out


if __name__ == "__main__":
    serve(sys.argv[1], dict(arg.split("=", 1) for arg in sys.argv[2:]))
