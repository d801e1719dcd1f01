"""`raytp serve`'s own checks: the queue, the API key, and an address and port this machine can listen on."""

from __future__ import annotations

import errno
import socket
from pathlib import Path

from raytp.cli.common import UserError


def check_serve_args(args) -> None:
    if args.max_queue < 0:
        raise UserError(f"--max-queue must be >= 0, got {args.max_queue}")
    args.api_key = api_key(args)  # read once, here: a missing file fails now
    check_port(args.host, args.port)


def check_port(host: str, port: int) -> None:
    """Fail in seconds, not after loading the model, when the host is not this machine's or the port is taken."""
    from raytp.serving.sockets import listen_socket

    if not 0 < port < 65536:
        raise UserError(f"--port must be in 1..65535, got {port}")
    try:
        listen_socket(host, port).close()
    except socket.gaierror as e:
        raise UserError(f"--host {host!r} is not an address ({e.strerror}); give one of this machine's addresses, "
                        "e.g. 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None
    except OSError as e:
        if e.errno == errno.EADDRNOTAVAIL:
            raise UserError(f"--host {host!r} is not an address of this machine; give one of its own, e.g. "
                            "127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); is another server using port {port}? "
                        f"Choose another with --port") from None


def api_key(args) -> str | None:
    """--api-key-file's first line, else --api-key (or $RAYTP_API_KEY)."""
    if args.api_key_file is None:
        return args.api_key
    try:
        lines = Path(args.api_key_file).read_text().splitlines()
    except OSError as e:
        raise UserError(f"cannot read --api-key-file {args.api_key_file!r} ({e.strerror})") from None
    key = lines[0].strip() if lines else ""
    if not key:
        raise UserError(f"--api-key-file {args.api_key_file!r} is empty; put the key on its first line")
    return key
