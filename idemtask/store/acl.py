"""The least-privilege Redis ACL for a store user: the commands idemtask sends, on its keys.

Commands called inside the Lua scripts are checked by Redis like any other, so they are
listed too. ``idemtask doctor`` also reads ``INFO`` and ``CONFIG GET``; without them it
reports those checks as not run, and the store works.
"""

from __future__ import annotations

#: What the store calls directly: scripts by SHA (loaded again after a restart), the admin
#: reads (``inspect`` is a MULTI of HGETALL and PTTL), ``forget``, ``scan``, ``ping`` and
#: ``WAIT`` for ``wait_replicas``.
CLIENT_COMMANDS = (
    "evalsha",
    "script|load",
    "multi",
    "exec",
    "hgetall",
    "pttl",
    "del",
    "scan",
    "ping",
    "wait",
)
#: What the Lua scripts call.
SCRIPT_COMMANDS = ("time", "hmget", "hset", "hdel", "pexpire")
#: Optional, for ``idemtask doctor``'s persistence, eviction and memory checks.
DOCTOR_COMMANDS = ("info", "config|get")


def acl_rules(prefix: str = "idemtask", *, doctor: bool = False) -> str:
    """The rules of ``ACL SETUSER <user> on ><password> <rules>`` for a store user."""
    commands = CLIENT_COMMANDS + SCRIPT_COMMANDS + (DOCTOR_COMMANDS if doctor else ())
    allowed = " ".join(f"+{name}" for name in commands)
    return f"resetkeys ~{prefix}:* resetchannels -@all {allowed}"
