"""Who is calling and what they may do: API keys as principals (`principals`), whether the
gateway may run keyless at all (`exposure`), per-key rate limits (`ratelimit`), the checks a
generation request passes before it is queued (`admission`), and who owns files, batches
and request records (`ownership`)."""

from __future__ import annotations

from gateway.tenancy.ownership import Caller
from gateway.tenancy.principals import Principal

__all__ = ["Caller", "Principal"]
