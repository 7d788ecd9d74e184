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


def test_errors_read_as_sentences_without_pydantic_text() -> None:
    """Issue 24: a bad line's error showed pydantic's raw text and its documentation link."""
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    lines = [
        "{not json",
        json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": body}),
        json.dumps({"custom_id": "c", "method": "GET", "url": "/v1/chat/completions", "body": {}}),
        json.dumps(
            {"custom_id": "d", "method": "POST", "url": "/v1/chat/completions", "body": {"x": 1}}
        ),
        "[1, 2]",
    ]
    _, errors = parse_input("\n".join(lines).encode(), {"m"})
    messages = [e.message for e in errors]
    assert (
        messages[0]
        == "Line 1 is not JSON: Expecting property name enclosed in double quotes at column 2."
    )
    assert messages[1] == "Line 2 is not a request object (custom_id: Field required)."
    assert errors[1].param == "custom_id"
    assert messages[2] == "Line 3 is not a request object (method: Input should be 'POST')."
    assert messages[3] == "body.model: Field required" and errors[3].param == "body.model"
    assert messages[4] == "Line 5 is not a request object (Input should be a JSON object)."
    for message in messages:
        assert "pydantic" not in message and "input_value" not in message, message
        assert "For further information" not in message and "validation error" not in message
