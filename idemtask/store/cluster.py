"""Clients for Redis Cluster and Redis Sentinel deployments, built from URLs.

``redis+cluster://[user:password@]host:port[,host:port...][/]`` names seed nodes of a
cluster (any reachable one is enough; naming several survives one being down).
``rediss+cluster://`` is the same over TLS.

``redis+sentinel://[user:password@]host:port[,host:port...]/service[/db]`` names the
sentinels and the monitored service; the store talks to whichever node the sentinels name as
primary now. The user and password are the data nodes'; ``?sentinel_password=...`` (and
``sentinel_username``) authenticate to the sentinels when they need it.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.sentinel import Sentinel

from idemtask.errors import ConfigurationError

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SENTINEL_SCHEMES = ("redis+sentinel",)


def is_cluster_url(url: str) -> bool:
    return url.split("://", 1)[0] in CLUSTER_SCHEMES


def is_sentinel_url(url: str) -> bool:
    return url.split("://", 1)[0] in SENTINEL_SCHEMES


_Hosts = tuple[str | None, str | None, list[tuple[str, int]]]


def _hosts(netloc: str, url: str, default_port: int) -> _Hosts:
    """(username, password, [(host, port), ...]) from ``user:pass@h1:p1,h2:p2``."""
    credentials, _, hostlist = netloc.rpartition("@")
    username: str | None = None
    password: str | None = None
    if credentials:
        user, sep, secret = credentials.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if sep else None
    hosts: list[tuple[str, int]] = []
    for item in hostlist.split(","):
        item = item.strip()
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep:
            host, port = item, str(default_port)
        try:
            hosts.append((host.strip("[]"), int(port)))
        except ValueError as exc:
            raise ConfigurationError(f"bad host:port {item!r} in {url!r}") from exc
    if not hosts:
        raise ConfigurationError(f"no host in {url!r}")
    return username, password, hosts


def cluster_client(url: str, **options: Any) -> RedisCluster:
    """A ``RedisCluster`` for a ``redis+cluster://`` URL (seed nodes, database 0 only)."""
    parts = urlsplit(url)
    if parts.scheme not in CLUSTER_SCHEMES:
        raise ConfigurationError(f"not a cluster URL: {url!r}")
    if parts.path.strip("/") not in ("", "0"):
        raise ConfigurationError(f"Redis Cluster has only database 0, got {url!r}")
    username, password, hosts = _hosts(parts.netloc, url, 6379)
    if username is not None:
        options.setdefault("username", username)
    if password is not None:
        options.setdefault("password", password)
    if parts.scheme == "rediss+cluster":
        options.setdefault("ssl", True)
    nodes = [ClusterNode(host, port) for host, port in hosts]  # type: ignore[no-untyped-call]
    return RedisCluster(startup_nodes=nodes, **options)


def sentinel_client(url: str, **options: Any) -> redis.Redis:
    """The current primary of a ``redis+sentinel://`` URL's service, found through Sentinel.

    The returned client asks the sentinels again whenever its connection fails, so it
    follows a failover.
    """
    parts = urlsplit(url)
    if parts.scheme not in SENTINEL_SCHEMES:
        raise ConfigurationError(f"not a sentinel URL: {url!r}")
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ConfigurationError(
            "a sentinel URL names the service: "
            f"redis+sentinel://h:26379/<service>[/db], got {url!r}"
        )
    service = unquote(path[0])
    try:
        db = int(path[1]) if len(path) == 2 else 0
    except ValueError as exc:
        raise ConfigurationError(f"bad database number in {url!r}") from exc
    username, password, hosts = _hosts(parts.netloc, url, 26379)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    sentinel_kwargs: dict[str, Any] = {
        k: options[k] for k in ("socket_timeout", "socket_connect_timeout") if k in options
    }
    if "sentinel_password" in query:
        sentinel_kwargs["password"] = query["sentinel_password"]
    if "sentinel_username" in query:
        sentinel_kwargs["username"] = query["sentinel_username"]
    if username is not None:
        options.setdefault("username", username)
    if password is not None:
        options.setdefault("password", password)
    sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_kwargs, **options)  # type: ignore[no-untyped-call, unused-ignore]
    primary: redis.Redis = sentinel.master_for(service, db=db)  # type: ignore[no-untyped-call, unused-ignore]
    return primary
