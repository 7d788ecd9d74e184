"""Units: reading a batch input file (`common.batch.parse_input`): lines end at a newline
only, and each line is checked as OpenAI reports batch `errors`."""

from __future__ import annotations

import json

from common.batch import parse_input


def _line(custom_id: str, content: str) -> str:
    body = {"model": "m", "messages": [{"role": "user", "content": content}]}
    return json.dumps(
        {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body},
        ensure_ascii=False,  # as web text often is: separators raw inside the strings
    )


def test_line_separators_inside_json_strings_do_not_split_lines() -> None:
    odd = "a\u2028b\u2029c\x85d\x0be\x0cf\x1cg"
    text = _line("one", odd) + "\r\n" + _line("two", "plain") + "\n"
    lines, errors = parse_input(text.encode(), {"m"})
    assert errors == []
    assert [ln.custom_id for ln in lines] == ["one", "two"]
    assert lines[0].body["messages"][0]["content"] == odd


def test_errors_name_the_line_they_are_on() -> None:
    text = "\n".join([_line("a", "x"), "{not json", "", _line("a", "y"), _line("b", "z")])
    lines, errors = parse_input(text.encode(), {"m"})
    assert [ln.custom_id for ln in lines] == ["a", "b"]
    found = [(e.code, e.line) for e in errors]
    assert found == [("invalid_json_line", 2), ("duplicate_custom_id", 4)]
