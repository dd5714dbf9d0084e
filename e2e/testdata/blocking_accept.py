#!/usr/bin/env python3
"""A server written the way many C servers are, for the end-to-end tests.

It takes its listening socket from systemd-style socket activation (fd 3,
LISTEN_FDS, LISTEN_PID), leaves its file flags as it got them, and accepts
with plain blocking accept(2) calls, one connection at a time: a socket
that some other process switched to O_NONBLOCK makes accept fail with
EAGAIN, and this server exits on that, as such servers do. It answers
every request with 200, "Connection: close" and X-Generation from
BATON_GENERATION, sends READY=1 over NOTIFY_SOCKET, and exits on SIGTERM,
even while blocked in accept. Standard library only.
"""
import os
import signal
import socket
import sys


def notify(msg):
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(path)
        s.send(msg.encode())


def main():
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or int(os.environ.get("LISTEN_FDS", "0")) < 1:
        print("blocking_accept: no activated socket", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ln = socket.socket(fileno=3)
    gen = os.environ.get("BATON_GENERATION", "")
    notify("READY=1")
    while True:
        try:
            conn, _ = ln.accept()
        except BlockingIOError as e:
            print(f"blocking_accept: accept: {e}", file=sys.stderr)
            return 1
        with conn:
            conn.setblocking(True)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            if not data:
                continue
            body = f"pid={os.getpid()} generation={gen}\n".encode()
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: text/plain\r\n"
                + f"X-Generation: {gen}\r\nX-PID: {os.getpid()}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )


if __name__ == "__main__":
    sys.exit(main())
