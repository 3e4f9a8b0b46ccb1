"""Socket helpers shared by the stand-in proxy, the echo servers and the input checks.

Standard library only: the proxy and the echo servers run as small processes inside
the demo's namespaces and should start fast.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

ACCEPT_POLL = 0.2  # how soon an accept loop notices its stop flag


def is_local(ip: str) -> bool:
    """Whether ``ip`` is assigned here: binding to it works only then (no IP_FREEBIND)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind((ip, 0))
        except OSError:
            return False
    return True


def accept_loop(
    s: socket.socket, stop: threading.Event, handle: Callable[[socket.socket], None]
) -> None:
    """Accept on ``s`` until ``stop`` is set or ``s`` is closed; one thread per connection."""
    s.settimeout(ACCEPT_POLL)
    while not stop.is_set():
        try:
            conn, _ = s.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        threading.Thread(target=handle, args=(conn,), daemon=True).start()
