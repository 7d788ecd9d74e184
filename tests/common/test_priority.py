from __future__ import annotations

import pytest

from common.errors import InvalidRequest
from common.priority import Priority, resolve_priority


@pytest.mark.parametrize(
    ("header", "tier", "want"),
    [
        (None, None, Priority.NORMAL),
        ("high", None, Priority.HIGH),
        (" Low ", None, Priority.LOW),
        (None, "priority", Priority.HIGH),
        (None, "default", Priority.NORMAL),
        (None, "auto", Priority.NORMAL),
        (None, "flex", Priority.LOW),
        ("low", "priority", Priority.LOW),  # the header wins
        ("", "flex", Priority.LOW),  # an empty header is no header
    ],
)
def test_resolve(header: str | None, tier: str | None, want: Priority) -> None:
    assert resolve_priority(header, tier) is want


@pytest.mark.parametrize(("header", "tier"), [("urgent", None), (None, "scale"), ("1", None)])
def test_invalid_values_are_400(header: str | None, tier: str | None) -> None:
    with pytest.raises(InvalidRequest) as err:
        resolve_priority(header, tier)
    assert err.value.status == 400


def test_rank_order() -> None:
    assert Priority.HIGH.rank < Priority.NORMAL.rank < Priority.LOW.rank
