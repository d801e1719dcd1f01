"""`raytp serve`: the OpenAI-compatible API and the web chat on one port, until Ctrl-C or SIGTERM."""

from __future__ import annotations

import sys

from raytp.cli.common import UserError
from raytp.cli.generate import announce_defaults
from raytp.cli.session import print_driver_logs, ray_session, running_driver


def cmd_serve(args) -> None:
    import signal
    import threading

    stop = threading.Event()

    def on_signal(*_):
        if stop.is_set():  # a second Ctrl-C: stop waiting for the clean shutdown
            raise KeyboardInterrupt
        stop.set()

    # until the server is up, SIGTERM interrupts start-up the way Ctrl-C does, so the cleanup below still runs
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    announce_defaults(args, "a request's own values override each")
    # the relay (this process) holds the clients' connections, so that they are told if the driver dies; it is
    # closed after the driver, whose shutdown tells the open requests first
    with ray_session(args.address, args.devices), relay_on(args.host, args.port) as relay, \
            running_driver(args) as (driver, info):
        import ray

        from raytp.actors.driver import SHUTTING_DOWN

        ray.get(driver.serve.remote(relay.upstream, args.api_key, args.max_queue))
        url = relay.open()
        print(info["plan_table"], file=sys.stderr)
        print(f"raytp: serving {args.model}: web chat {url} , OpenAI API {url}v1 ; Ctrl-C stops", file=sys.stderr)
        print(url, flush=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        while not stop.wait(1.0):
            print_driver_logs(driver)  # also the liveness check: a dead driver ends `serve` within seconds
        print("raytp: shutting down", file=sys.stderr)
        relay.gone = SHUTTING_DOWN  # from now on the driver's server goes away on purpose


def relay_on(host: str, port: int):
    """The relay holding host:port; the port was free when the arguments were checked, but Ray started since."""
    from raytp.serving.relay import Relay

    try:
        return Relay(host, port)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port") from None
