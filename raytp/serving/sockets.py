"""The HTTP servers' sockets, bound before uvicorn starts: `raytp serve`'s on --host:--port, light enough for the
CLI's argument checks, which must refuse a taken port before importing the server (FastAPI, torch), and the driver's
on a Unix socket, which only `serve`'s relay reaches."""

from __future__ import annotations

import socket


def listen_socket(host: str, port: int) -> socket.socket:
    """A bound socket for host:port, or OSError. Uvicorn's own bind would sys.exit() inside the actor instead."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does; a listening port still fails
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def unix_socket(path: str) -> socket.socket:
    """A bound Unix socket at `path` (a file no other socket has): its directory decides who may connect."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    return sock


def display_url(host: str, port: int) -> str:
    if host in ("0.0.0.0", "::", ""):  # every interface: show one that others can reach
        try:
            host = socket.gethostbyname(socket.gethostname())
        except OSError:
            pass
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"
