"""Who may see what. Files, batches and request records belong to the API key that made
them: a user key sees only its own, and anything else answers 404 exactly as if it did not
exist. Ids are no secret (they show in logs, in Flower, in a shared terminal), so knowing
one must not let another team read its prompts and outputs, cancel its batch or its
request. A user key also sees only the models it may use.

The admin key, and every caller of a gateway running open (no keys configured), see
everything; what they make has no owner, so no user key sees it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Protocol, TypeVar

from fastapi import Depends, Request

from common.apikeys import ApiKey
from common.errors import NotFound
from gateway.tenancy.principals import principal_of


class Owned(Protocol):
    @property
    def owner(self) -> str | None: ...


OwnedT = TypeVar("OwnedT", bound=Owned)


@dataclass(frozen=True)
class Caller:
    key: ApiKey | None  # None: the admin key, or an open gateway

    @property
    def owner(self) -> str | None:
        """The owner to record on what this caller makes: its key's id."""
        return self.key.id if self.key is not None else None

    @property
    def viewer(self) -> str | None:
        """The only owner whose objects this caller may list; None: every owner's."""
        return self.owner

    def sees(self, owner: str | None) -> bool:
        return self.key is None or owner == self.key.id

    def own(self, found: OwnedT | None, missing: NotFound) -> OwnedT:
        """`found` if this caller may see it; else `missing`, exactly as if it did not exist."""
        if found is None or not self.sees(found.owner):
            raise missing
        return found

    def allows_model(self, alias: str) -> bool:
        return self.key is None or self.key.allows_model(alias)


EVERYONE = Caller(None)  # sees all, owns nothing: the admin key, an open gateway


def caller_of(request: Request) -> Caller:
    principal = principal_of(request)
    return Caller(principal.key if principal is not None else None)


async def _caller(request: Request) -> Caller:  # async: no thread hop
    return caller_of(request)


CallerDep = Annotated[Caller, Depends(_caller)]
