"""status.master for a failover test minion whose masters share 127.0.0.1.

Salt's own status.master (the master_alive_interval check) looks for a TCP
connection to the *configured* publish_port (4506 here, which makes the
minion use the port each master reports) and so finds none when the
masters listen on random loopback ports: the minion would think its master
lost every interval and flap between them. This one asks the question the
check means — does the current master answer on its request port — and
fires the same events. Only the multi-master test's minion loads it
(module_dirs); every other status function is Salt's.
"""

import socket

import salt.minion
import salt.utils.event

__virtualname__ = "status"


def __virtual__():
    return __virtualname__


def _request_address():
    """The current master's request address: master_uri (tcp://IP:PORT)."""
    uri = str(__opts__.get("master_uri") or "")
    rest = uri.split("://", 1)[-1]
    host, _, port = rest.rpartition(":")
    if host and port.isdigit():
        return host.strip("[]"), int(port)
    return __opts__.get("master_ip") or "127.0.0.1", int(__opts__.get("master_port") or 4506)


def master(master=None, connected=True):
    try:
        with socket.create_connection(_request_address(), timeout=2):
            status = True
    except (OSError, TypeError, ValueError):
        status = False
    if status is not connected:
        with salt.utils.event.get_event("minion", opts=__opts__, listen=False) as event:
            kind = "connected" if status else "disconnected"
            event.fire_event({"master": master}, salt.minion.master_event(type=kind))
    return status
