"""Request parsers of the operator API: DRF's, refusing what the database cannot store.

Kept apart from ``core.api``: DRF reads ``DEFAULT_PARSER_CLASSES`` while its views module
loads, which ``core.api`` imports.
"""

from __future__ import annotations

from typing import Any

from rest_framework import exceptions, parsers

NUL_MESSAGE = "Text may not contain NUL (U+0000) characters."


def holds_nul(value: Any) -> bool:
    """Whether any string in a parsed JSON value (keys included) holds a NUL character.

    PostgreSQL's text and jsonb cannot store one, so it must be refused at the door (400)
    rather than fail at the database (500).
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return False


class JSONParser(parsers.JSONParser):
    """DRF's JSON parser, refusing NUL characters anywhere in the document."""

    def parse(self, stream: Any, media_type: Any = None, parser_context: Any = None) -> Any:
        data = super().parse(stream, media_type, parser_context)
        if holds_nul(data):
            raise exceptions.ParseError(NUL_MESSAGE)
        return data


class MultiPartParser(parsers.MultiPartParser):
    """DRF's multipart parser, refusing NUL characters in the form fields (files are bytes)."""

    def parse(self, stream: Any, media_type: Any = None, parser_context: Any = None) -> Any:
        result = super().parse(stream, media_type, parser_context)
        if holds_nul(dict(result.data.lists())):
            raise exceptions.ParseError(NUL_MESSAGE)
        return result


class FormParser(parsers.FormParser):
    """DRF's form parser, refusing NUL characters in the fields."""

    def parse(self, stream: Any, media_type: Any = None, parser_context: Any = None) -> Any:
        data = super().parse(stream, media_type, parser_context)
        if holds_nul(dict(data.lists())):
            raise exceptions.ParseError(NUL_MESSAGE)
        return data
