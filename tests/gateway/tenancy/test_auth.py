"""API keys end to end: the key lifecycle through the `corral keys` CLI, 401 and
403, per-key models and priority caps (downgrade and reject), keys never in logs, and a
keyless gateway open only on loopback. A gateway with an admin key runs beside the shared
cluster, on its Valkey and workers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import openai
import pytest
import redis
import redis.asyncio as aioredis
from openai.types.chat import ChatCompletionMessageParam
from pydantic import SecretStr

from common import redis_keys
from common.errors import AuthenticationFailed
from common.net import free_port
from common.settings import Settings
from corral.redis_server import EmbeddedRedis
from gateway.tenancy.exposure import check_exposure
from gateway.tenancy.principals import Authenticator, Role
from tests.conftest import CHAT, EMBED, Cluster
from tests.gateway.helpers import (
    ADMIN_KEY,
    add_key,
    assert_envelope,
    bearer,
    client,
    corral,
    full_logs,
    start_gateway,
)

HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello there"}]
SECRETS: list[str] = [ADMIN_KEY]  # every secret used here: none may reach a log
pytestmark = pytest.mark.usefixtures("no_keys_left")


def user_key(gw: Cluster, name: str, **limits: object) -> str:
    _, secret = add_key(gw.redis_url, name, **limits)
    SECRETS.append(secret)
    return secret


def test_key_lifecycle_through_the_cli(gw: Cluster) -> None:
    args = ["keys", "create", "--name", "alice", "--max-priority", "normal", "--rpm", "100"]
    args += ["--models", f"{CHAT},{EMBED}"]
    # the first user key without an admin key would lock the owner out: refused, said why
    refused = corral(gw.redis_url, *args)
    assert refused.returncode == 1 and "CORRAL_ADMIN_KEY" in refused.stderr, refused.stderr
    assert not corral(gw.redis_url, "keys", "list").stdout.count("alice")
    made = corral(gw.redis_url, *args, CORRAL_ADMIN_KEY=ADMIN_KEY)
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()  # stdout holds the secret alone
    SECRETS.append(secret)
    assert secret.startswith("sk-corral-") and "shown only now" in made.stderr
    dup = corral(gw.redis_url, "keys", "create", "--name", "alice")
    assert dup.returncode == 1 and "exists" in dup.stderr
    typo = corral(gw.redis_url, "keys", "create", "--name", "bob", "--models", "no-such-model")
    assert typo.returncode == 1 and "unknown model(s) no-such-model" in typo.stderr
    assert CHAT in typo.stderr  # the models it knows

    listed = corral(gw.redis_url, "keys", "list")
    assert listed.returncode == 0 and "alice" in listed.stdout
    assert "max_priority=normal" in listed.stdout and f"models={CHAT},{EMBED}" in listed.stdout
    assert secret not in listed.stdout and secret[-4:] in listed.stdout  # the hint only

    reply = client(gw.base_url, secret).chat.completions.with_raw_response.create(
        model=CHAT, messages=HI, max_tokens=2
    )
    assert reply.parse().choices and reply.headers["x-ratelimit-limit-requests"] == "100"

    gone = corral(gw.redis_url, "keys", "revoke", "alice")
    assert gone.returncode == 0, gone.stderr
    with pytest.raises(openai.AuthenticationError):
        client(gw.base_url, secret).models.list()
    assert corral(gw.redis_url, "keys", "revoke", "alice").returncode == 1


def test_missing_or_wrong_key_is_401_and_health_stays_open(gw: Cluster) -> None:
    user_key(gw, "someone")
    url = f"{gw.base_url}/v1/chat/completions"
    body = {"model": CHAT, "messages": HI}
    missing = httpx.post(url, json=body)
    assert_envelope(missing, 401, "authentication_error", "missing_api_key")
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = httpx.post(url, json=body, headers=bearer("sk-corral-not-a-key"))
    assert_envelope(wrong, 401, "authentication_error", "invalid_api_key")
    basic = httpx.get(f"{gw.base_url}/v1/models", headers={"Authorization": "Basic eDp5"})
    assert_envelope(basic, 401, "authentication_error")
    with pytest.raises(openai.AuthenticationError):
        client(gw.base_url, "sk-corral-nope").models.list()
    assert httpx.get(f"{gw.base_url}/health").status_code == 200
    # 401 comes before the body is looked at: a bad body without a key is still a 401
    assert httpx.post(url, content=b"{not json").status_code == 401


def test_user_key_gets_403_on_management_routes(gw: Cluster) -> None:
    secret = user_key(gw, "bob")
    with httpx.Client(base_url=gw.base_url, timeout=10) as http:
        for path in ("/v1/queue/stats", "/metrics", "/metrics/targets"):
            r = http.get(path, headers=bearer(secret))
            assert_envelope(r, 403, "permission_error", "admin_key_required")
            assert http.get(path, headers=bearer(ADMIN_KEY)).status_code == 200, path
        assert http.get("/v1/models", headers=bearer(secret)).status_code == 200
        # looking a request up by its id is for users too (404: no such request)
        r = http.get("/v1/requests/req_unknown", headers=bearer(secret))
        assert r.status_code == 404, r.text


def test_key_limited_to_some_models(gw: Cluster) -> None:
    secret = user_key(gw, "chat-only", models=[CHAT])
    c = client(gw.base_url, secret)
    assert c.chat.completions.create(model=CHAT, messages=HI, max_tokens=2).choices
    with pytest.raises(openai.PermissionDeniedError) as err:
        c.embeddings.create(model=EMBED, input="x")
    assert err.value.code == "model_not_allowed"
    # the admin key may use every model
    assert client(gw.base_url, ADMIN_KEY).embeddings.create(model=EMBED, input="x").data


@pytest.mark.parametrize(
    ("header", "tier", "ran_at"),
    [
        ("high", None, "normal"),
        (None, "priority", "normal"),
        ("normal", None, "normal"),
        ("low", None, "low"),
    ],
)
def test_priority_over_the_cap_is_downgraded(
    gw: Cluster, header: str | None, tier: str | None, ran_at: str
) -> None:
    secret = user_key(gw, "capped", max_priority="normal")
    raw = client(gw.base_url, secret).chat.completions.with_raw_response.create(
        model=CHAT,
        messages=HI,
        max_tokens=2,
        extra_headers={"X-Request-Priority": header} if header else {},
        extra_body={"service_tier": tier} if tier else {},
    )
    assert raw.headers["x-request-priority"] == ran_at
    assert raw.parse().choices


def test_priority_over_the_cap_is_rejected_when_so_configured(
    cluster: Cluster, tmp_path: Path
) -> None:
    strict = start_gateway(
        cluster.redis_url,
        tmp_path / "strict",
        CORRAL_ADMIN_KEY=ADMIN_KEY,
        CORRAL_PRIORITY_OVER_CAP="reject",
    )
    try:
        _, secret = add_key(cluster.redis_url, "low-only", max_priority="low")
        SECRETS.append(secret)
        c = client(strict.base_url, secret)
        with pytest.raises(openai.PermissionDeniedError) as err:
            c.chat.completions.create(
                model=CHAT,
                messages=HI,
                max_tokens=2,
                extra_headers={"X-Request-Priority": "normal"},
            )
        assert err.value.code == "priority_over_cap"
        raw = c.chat.completions.with_raw_response.create(
            model=CHAT, messages=HI, max_tokens=2, extra_headers={"X-Request-Priority": "low"}
        )
        assert raw.headers["x-request-priority"] == "low"
        # the admin key has no cap
        raw = client(strict.base_url, ADMIN_KEY).chat.completions.with_raw_response.create(
            model=CHAT, messages=HI, max_tokens=2, extra_headers={"X-Request-Priority": "high"}
        )
        assert raw.headers["x-request-priority"] == "high"
    finally:
        strict.stop()
    assert ADMIN_KEY not in full_logs(strict) and secret not in full_logs(strict)


def test_no_secret_ever_reaches_a_log(gw: Cluster, cluster: Cluster) -> None:
    """Also checks every secret the tests above used (they ran first)."""
    secret = user_key(gw, "logged")
    assert (
        client(gw.base_url, secret)
        .chat.completions.create(model=CHAT, messages=HI, max_tokens=2)
        .choices
    )
    wrong = secret[:-2] + "xx"
    SECRETS.append(wrong)
    assert httpx.get(f"{gw.base_url}/v1/models", headers=bearer(wrong)).status_code == 401
    logs = full_logs(gw) + full_logs(cluster)
    assert "refused: invalid_api_key" in logs  # the failure was logged...
    for used in SECRETS:
        assert used not in logs  # ...and no key ever was


def test_keyless_gateway_is_open_only_on_loopback(cluster: Cluster, tmp_path: Path) -> None:
    assert "open, but only on loopback" in full_logs(cluster)
    refused = corral(cluster.redis_url, "gateway", "--host", "0.0.0.0", "--port", str(free_port()))
    assert refused.returncode == 2
    assert "refusing to serve 0.0.0.0" in refused.stderr and "--insecure" in refused.stderr

    r = redis.Redis.from_url(cluster.redis_url)
    try:
        exposed = Settings(redis_url=cluster.redis_url, host="0.0.0.0")
        assert check_exposure(exposed, r) is not None
        assert check_exposure(exposed.model_copy(update={"insecure": True}), r) is None
        assert check_exposure(Settings(redis_url=cluster.redis_url, host="::1"), r) is None
        keyed = Settings(
            redis_url=cluster.redis_url, host="0.0.0.0", admin_key=SecretStr(ADMIN_KEY)
        )
        assert check_exposure(keyed, r) is None
    finally:
        r.close()


def test_exposed_gateway_never_opens_when_the_last_key_goes(cluster: Cluster) -> None:
    """With no key left, a gateway that may not run open (a reachable address) answers 401
    rather than opening; one on loopback opens. In-process: no test binds 0.0.0.0."""

    async def run() -> None:
        r = aioredis.Redis.from_url(cluster.redis_url, decode_responses=True)
        try:
            exposed = Authenticator(Settings(redis_url=cluster.redis_url, host="0.0.0.0"))
            with pytest.raises(AuthenticationFailed):
                await exposed.authenticate(r, None)
            local = Authenticator(Settings(redis_url=cluster.redis_url))
            assert (await local.authenticate(r, "Bearer whatever")).role is Role.OPEN
        finally:
            await r.aclose()

    asyncio.run(run())


def test_key_lookups_are_cached_within_an_epoch(cluster: Cluster) -> None:
    """A lookup is read from Redis once per keys epoch; a new epoch (a KEYS_CHANGED note)
    reads again, so a key added or revoked is seen at once."""

    async def run() -> None:
        r = aioredis.Redis.from_url(cluster.redis_url, decode_responses=True)
        auth = Authenticator(Settings(redis_url=cluster.redis_url))
        try:
            assert (await auth.authenticate(r, None, epoch=7)).role is Role.OPEN
            await r.hset(redis_keys.API_KEYS, "not-a-digest", "{}")  # a key now exists
            try:
                assert (await auth.authenticate(r, None, epoch=7)).role is Role.OPEN  # cached
                with pytest.raises(AuthenticationFailed):
                    await auth.authenticate(r, None, epoch=8)  # read again: keys exist
            finally:
                await r.hdel(redis_keys.API_KEYS, "not-a-digest")
        finally:
            await r.aclose()

    asyncio.run(run())


def test_the_local_admin_key_leaves_a_loopback_gateway_open_until_a_user_key(
    redis_server: EmbeddedRedis,
) -> None:
    """`corral up`'s own admin key (`open_until_user_keys`) is one more credential: the
    README's `api_key="unused"` works until someone creates a user key; another admin key
    closes the gateway, as it always did; beyond loopback it closes it too."""
    url = redis_server.url.rsplit("/", 1)[0] + "/6"  # a database of its own, no keys

    async def run() -> None:
        r = aioredis.Redis.from_url(url, decode_responses=True)
        mine = Settings(redis_url=url, admin_key=SecretStr(ADMIN_KEY), open_until_user_keys=True)
        auth = Authenticator(mine)
        try:
            assert (await auth.authenticate(r, None)).role is Role.OPEN
            assert (await auth.authenticate(r, "Bearer unused")).role is Role.OPEN
            assert (await auth.authenticate(r, f"Bearer {ADMIN_KEY}")).role is Role.ADMIN
            given = Authenticator(mine.model_copy(update={"open_until_user_keys": False}))
            with pytest.raises(AuthenticationFailed):
                await given.authenticate(r, None)
            exposed = Authenticator(mine.model_copy(update={"host": "0.0.0.0"}))
            with pytest.raises(AuthenticationFailed):
                await exposed.authenticate(r, None)
            _, secret = add_key(url, "first-user")
            with pytest.raises(AuthenticationFailed):
                await auth.authenticate(r, "Bearer unused", epoch=1)
            assert (await auth.authenticate(r, f"Bearer {secret}", epoch=1)).role is Role.USER
            assert (await auth.authenticate(r, f"Bearer {ADMIN_KEY}", epoch=1)).role is Role.ADMIN
        finally:
            await r.flushdb()
            await r.aclose()

    asyncio.run(run())
    client = redis.Redis.from_url(url)
    try:  # at start, the local key does not count as a key: 0.0.0.0 without keys is refused
        exposed = Settings(
            redis_url=url, host="0.0.0.0", admin_key=SecretStr(ADMIN_KEY), open_until_user_keys=True
        )
        assert check_exposure(exposed, client) is not None
        assert (
            check_exposure(exposed.model_copy(update={"open_until_user_keys": False}), client)
            is None
        )
    finally:
        client.close()
