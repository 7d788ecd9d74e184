"""Connections to the cluster's Redis: the one home of "a client for this URL", direct or
through Redis Sentinel, for the gateway, the workers, Flower and the CLI alike.

`redis_url` is either a URL redis-py takes (`redis://`, `rediss://`, `unix://`) or kombu's
Sentinel form, one `sentinel://` URL per sentinel joined by `;`, the master's password and
database number on the first:

    sentinel://:PASSWORD@s1:26379/0;sentinel://s2:26379;sentinel://s3:26379

with the name the sentinels monitor in `redis_sentinel_master` (kombu's `master_name`
transport option) and their own password, if they have one, in `redis_sentinel_password`.
Every connection made here asks the sentinels for the current master when it connects, so
after a failover each client reconnects to the promoted replica by itself; a client still
holding a connection to a demoted master is told so (READONLY) and reconnects too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio import sentinel as asentinel
from redis.sentinel import Sentinel

if TYPE_CHECKING:
    from common.settings import Settings

SENTINEL_SCHEME = "sentinel"
SENTINEL_PORT = 26379
# A sentinel that does not answer within this is skipped for the next one.
SENTINEL_TIMEOUT_S = 2.0


def is_sentinel_url(url: str) -> bool:
    return url.strip().lower().startswith(f"{SENTINEL_SCHEME}://")


@dataclass(frozen=True)
class RedisTarget:
    """Where the cluster's Redis is. Build it with `of(settings)`; `client()`,
    `async_client()`, `master_url()` and `kombu_options()` connect the ways each part
    needs."""

    url: str
    master: str | None = None  # Sentinel: the name of the monitored master
    sentinel_password: str | None = field(default=None, repr=False)
    sentinels: tuple[tuple[str, int], ...] = field(init=False, default=())
    _master_kwargs: dict[str, Any] = field(init=False, default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not is_sentinel_url(self.url):
            return
        if not self.master:
            raise ValueError(
                "a sentinel:// redis_url needs the master's name: set redis_sentinel_master "
                "(CORRAL_REDIS_SENTINEL_MASTER)"
            )
        hosts, kwargs = _parse_sentinels(self.url)
        object.__setattr__(self, "sentinels", hosts)
        object.__setattr__(self, "_master_kwargs", kwargs)

    @classmethod
    def of(cls, settings: Settings, url: str | None = None) -> RedisTarget:
        """The target of `url` (default: the settings' own), with their Sentinel options."""
        password = settings.redis_sentinel_password
        return cls(
            url or settings.require_redis_url(),
            settings.redis_sentinel_master,
            password.get_secret_value() if password is not None else None,
        )

    @property
    def is_sentinel(self) -> bool:
        return bool(self.sentinels)

    @property
    def host(self) -> str | None:
        """A host of the cluster's Redis (its first sentinel's): a peer on its network."""
        return self.sentinels[0][0] if self.sentinels else urlsplit(self.url).hostname

    def __str__(self) -> str:
        """The URL without its passwords (for logs), and the master's name if any."""
        shown = ";".join(_sanitized(part) for part in self.url.split(";"))
        return f"{shown} (master {self.master})" if self.is_sentinel else shown

    def client(self, **kwargs: Any) -> redis.Redis:
        """A blocking client (`kwargs` as for `redis.Redis`)."""
        if not self.is_sentinel:
            return redis.Redis.from_url(self.url, **kwargs)
        manager = Sentinel(
            self.sentinels, sentinel_kwargs=self._sentinel_kwargs(), **self._master_kwargs
        )
        return manager.master_for(str(self.master), redis_class=_SentinelRedis, **kwargs)

    def async_client(
        self, *, max_connections: int, timeout: float, **kwargs: Any
    ) -> aioredis.Redis:
        """An asyncio client on a blocking pool: past `max_connections` in use, a command
        waits up to `timeout` for one to come back instead of failing."""
        if not self.is_sentinel:
            pool = aioredis.BlockingConnectionPool.from_url(
                self.url, max_connections=max_connections, timeout=timeout, **kwargs
            )
            return aioredis.Redis(connection_pool=pool)
        manager = asentinel.Sentinel(
            self.sentinels, sentinel_kwargs=self._sentinel_kwargs(), **self._master_kwargs
        )
        return manager.master_for(
            str(self.master),
            redis_class=_AsyncSentinelRedis,
            connection_pool_class=_BlockingSentinelPool,
            max_connections=max_connections,
            timeout=timeout,
            **kwargs,
        )

    async def master_url(self) -> str:
        """A plain URL of the current master (the URL itself where there is no Sentinel),
        for a connection made by hand (the gateway's pub/sub)."""
        if not self.is_sentinel:
            return self.url
        manager = asentinel.Sentinel(self.sentinels, sentinel_kwargs=self._sentinel_kwargs())
        try:
            host, port = await manager.discover_master(str(self.master))
        finally:
            await manager.aclose()
        auth = ""
        user, password = self._master_kwargs.get("username"), self._master_kwargs.get("password")
        if password is not None:
            auth = f"{quote(user or '', safe='')}:{quote(password, safe='')}@"
        netloc = f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
        return f"redis://{auth}{netloc}/{self._master_kwargs.get('db', 0)}"

    def kombu_options(self) -> dict[str, Any]:
        """Transport options kombu needs besides the URL (kombu reads the same form)."""
        if not self.is_sentinel:
            return {}
        return {"master_name": self.master, "sentinel_kwargs": self._sentinel_kwargs()}

    def _sentinel_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "socket_timeout": SENTINEL_TIMEOUT_S,
            "socket_connect_timeout": SENTINEL_TIMEOUT_S,
        }
        if self.sentinel_password is not None:
            kwargs["password"] = self.sentinel_password
        return kwargs


def _parse_sentinels(url: str) -> tuple[tuple[tuple[str, int], ...], dict[str, Any]]:
    """The sentinels' addresses, and the master's connection options (database, user,
    password) from the first URL, as kombu reads them."""
    hosts: list[tuple[str, int]] = []
    master: dict[str, Any] = {}
    for i, part in enumerate(p.strip() for p in url.split(";") if p.strip()):
        parts = urlsplit(part)
        if parts.scheme.lower() != SENTINEL_SCHEME or not parts.hostname:
            raise ValueError(f"not a sentinel://HOST:PORT URL: {_sanitized(part)!r}")
        try:
            hosts.append((parts.hostname, parts.port or SENTINEL_PORT))
        except ValueError as exc:  # a port that is not a number
            raise ValueError(f"bad sentinel URL {_sanitized(part)!r}: {exc}") from None
        if i == 0:
            master = _master_options(parts.path, parts.username, parts.password)
        elif parts.path.strip("/") or parts.password is not None:  # kombu would ignore it
            raise ValueError(
                f"the database and password go on the first sentinel:// URL only (kombu "
                f"reads them there), not on {_sanitized(part)!r}"
            )
    return tuple(hosts), master


def _master_options(path: str, user: str | None, password: str | None) -> dict[str, Any]:
    db = path.strip("/") or "0"
    if not db.isdigit():
        raise ValueError(f"the database in a sentinel:// URL must be a number, not {db!r}")
    options: dict[str, Any] = {"db": int(db)}
    if password:
        options["password"] = unquote(password)
        if user:
            options["username"] = unquote(user)
    return options


def _sanitized(url: str) -> str:
    try:
        password = urlsplit(url).password
    except ValueError:
        return url.split("@")[-1]
    return url if password is None else url.replace(f":{password}@", ":***@", 1)


class _SentinelRedis(redis.Redis):
    """A master's client that also closes its connections to the sentinels."""

    def close(self) -> None:
        super().close()
        pool = self.connection_pool
        for sentinel in getattr(getattr(pool, "sentinel_manager", None), "sentinels", []):
            sentinel.close()


class _AsyncSentinelRedis(aioredis.Redis):
    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        manager = getattr(self.connection_pool, "sentinel_manager", None)
        if manager is not None:
            await manager.aclose()


class _BlockingSentinelPool(asentinel.SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """The master's pool, blocking like the gateway's direct one (redis-py's Sentinel pool
    fails at once with "Too many connections")."""
