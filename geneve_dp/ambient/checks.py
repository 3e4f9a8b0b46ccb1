"""Input checks shared by the node, ztunnel and pod commands: fail early, one line each."""

from __future__ import annotations

import ipaddress
import os

from ..errors import UserError
from ..netconf import iptables, links
from . import sockets


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise UserError(
            f"{what} changes network devices, routes and iptables; accepted: run as root",
            field="root",
        )


def require_tools(what: str) -> None:
    require_root(what)
    iptables.require_binaries()


def ipv4(value: str | None, field: str) -> ipaddress.IPv4Address:
    if value is None or value == "":
        raise UserError("is required; accepted: an IPv4 address", field=field)
    try:
        return ipaddress.IPv4Address(value)
    except ValueError as exc:
        raise UserError(
            f"{value!r} is not an IPv4 address; accepted: an IPv4 address", field
        ) from exc


def is_local_address(ip: ipaddress.IPv4Address) -> bool:
    return sockets.is_local(str(ip))


def port(value: int, field: str = "--port") -> int:
    if not 1 <= value <= 65535:
        raise UserError(f"{value} is out of range; accepted: 1..65535", field=field)
    return value


def route_or_fail(dst: ipaddress.IPv4Address, field: str) -> links.RouteTo:
    route = links.route_get(dst)
    if route is None:
        raise UserError(
            f"{dst} is unreachable from this namespace; accepted: an address with a route",
            field=field,
        )
    return route
