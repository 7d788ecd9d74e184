"""Request priority: the `X-Request-Priority` header or OpenAI's `service_tier`."""

from __future__ import annotations

from enum import StrEnum

from common.errors import InvalidRequest


class Priority(StrEnum):
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @property
    def rank(self) -> int:
        """0 is the highest priority."""
        return _ORDER.index(self)


_ORDER = [Priority.HIGH, Priority.NORMAL, Priority.LOW]

# OpenAI's service tiers mapped onto ours.
SERVICE_TIERS = {
    "priority": Priority.HIGH,
    "default": Priority.NORMAL,
    "auto": Priority.NORMAL,
    "flex": Priority.LOW,
}


def parse_priority(value: str) -> Priority:
    try:
        return Priority(value.strip().lower())
    except ValueError:
        raise InvalidRequest(
            f"Invalid priority {value!r}: use one of high, normal, low.",
            param="X-Request-Priority",
            code="invalid_priority",
        ) from None


def resolve_priority(header: str | None, service_tier: str | None) -> Priority:
    """The priority a request asks for: the header wins over `service_tier`. Invalid
    values are a 400, never a guess. (A key's maximum is `gateway.tenancy.admission`'s.)"""
    if header is not None and header.strip():
        wanted = parse_priority(header)
    elif service_tier is not None:
        tier = SERVICE_TIERS.get(service_tier)
        if tier is None:
            raise InvalidRequest(
                f"Invalid service_tier {service_tier!r}: use one of {', '.join(SERVICE_TIERS)}.",
                param="service_tier",
                code="invalid_service_tier",
            )
        wanted = tier
    else:
        wanted = Priority.NORMAL
    return wanted
