"""The OpenAPI schema's error responses, derived once for every operation.

A drf-spectacular postprocessing hook (``SPECTACULAR_SETTINGS["POSTPROCESSING_HOOKS"]``)
adds to each operation the 4xx answers it can give, in the one error shape of
:mod:`core.api`, from what the operation itself declares rather than from hand
annotations on every view:

- 400 when it takes parameters or a body (validation, malformed JSON, a bad filter);
- 401 when it requires credentials, 403 when it requires the operator API's token
  (roles); the device API's own codes (403, 409, 429, ...) are written with its paths;
- 404 when a path names a resource or a list is paginated (a page past the end);
- 405 never needs documenting (only documented methods are served);
- 406 for the operator API (an ``Accept`` it cannot render);
- 409 for every operator write (a state conflict, a resource still referenced);
- 413 when it takes a body (too large), and 415 for the operator API's (a media type
  it does not parse);
- 429 when the view is throttled, and on every device API call (core.ratelimit).

Codes an operation documents itself keep their description and get the error shape.
"""

from __future__ import annotations

import re
from typing import Any

ERROR_COMPONENT = "Error"
ERROR_REF = {"$ref": f"#/components/schemas/{ERROR_COMPONENT}"}

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "The one error shape of every refused request.",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "code": {"type": "string", "description": "A stable machine code, e.g. `not_found`."},
                "message": {"type": "string"},
                "details": {"description": "Per-field errors or facts about the refusal."},
            },
            "required": ["code", "message", "details"],
        }
    },
    "required": ["error"],
}

DESCRIPTIONS = {
    "400": "Invalid request: a parameter or the body failed validation.",
    "401": "Missing, unknown or revoked credentials.",
    "403": "The caller's role does not allow this.",
    "404": "No such resource (or not visible to the caller), or a page past the end.",
    "406": "The Accept header asks for a representation the API does not produce.",
    "409": "The request conflicts with the resource's state or with what references it.",
    "413": "The request body is too large.",
    "415": "The request body's media type is not accepted.",
    "416": "The requested byte range is not satisfiable.",
    "422": "The request is well-formed but its content is refused.",
    "429": "Too many requests; retry after `Retry-After` seconds.",
}

WRITE_METHODS = frozenset({"post", "put", "patch", "delete"})
HTTP_METHODS = frozenset({"get", "head", "post", "put", "patch", "delete", "options", "trace"})


def error_response(code: str, description: str | None = None) -> dict[str, Any]:
    """An OpenAPI response object for status ``code`` in the one error shape."""
    return {
        "description": description or DESCRIPTIONS[code],
        "content": {"application/json": {"schema": ERROR_REF}},
    }


_PARAM = re.compile(r"\{[^}]*\}")


def _shape(path: str) -> str:
    """A path with its parameters unnamed (the schema renames `{pk}` to `{id}`)."""
    return _PARAM.sub("{}", path)


def _throttled(generator: Any) -> set[tuple[str, str]]:
    """(path shape, method) of the endpoints whose DRF view is throttled."""
    found: set[tuple[str, str]] = set()
    for path, _regex, method, callback in getattr(generator, "endpoints", None) or []:
        view = getattr(callback, "cls", callback)  # as_view() keeps its class there
        if getattr(view, "throttle_classes", None):
            found.add((_shape(path), method.lower()))
    return found


def expected_errors(path: str, method: str, operation: dict[str, Any], *, throttled: bool) -> list[str]:
    """The 4xx codes an operation can answer, from its method, security, parameters and body."""
    params = operation.get("parameters") or []
    has_body = "requestBody" in operation
    secured = any(req for req in operation.get("security") or [])
    operator_api = path.startswith("/api/v1/")
    codes: list[str] = []
    if params or has_body:
        codes.append("400")
    if secured:
        codes.append("401")
        if operator_api:
            codes.append("403")
    if any(p.get("in") == "path" for p in params) or any(p.get("name") == "page" for p in params):
        codes.append("404")
    if operator_api:
        codes.append("406")
    if method in WRITE_METHODS and operator_api:
        codes.append("409")
    if has_body:
        # The device API reads its JSON whatever the Content-Type: no 415 there.
        codes += ["413", "415"] if operator_api else ["413"]
    if throttled or not operator_api:
        # Every device request is rate limited (per device, and failed credentials per
        # address: fleet.auth); operator views by their DRF throttle.
        codes.append("429")
    return codes


def add_error_responses(result: dict[str, Any], generator: Any = None, **_: Any) -> dict[str, Any]:
    """Postprocessing hook: document every operation's error answers (see the module doc)."""
    result.setdefault("components", {}).setdefault("schemas", {})[ERROR_COMPONENT] = ERROR_SCHEMA
    throttled = _throttled(generator)
    for path, item in result.get("paths", {}).items():
        for method, operation in item.items():
            if method not in HTTP_METHODS:
                continue
            responses = operation.setdefault("responses", {})
            for code in expected_errors(
                path, method, operation, throttled=(_shape(path), method) in throttled
            ):
                responses.setdefault(code, error_response(code))
            for code, response in responses.items():
                # An error a view documents by its description alone still has the one shape.
                if str(code).startswith("4") and "content" not in response and code != "304":
                    response["content"] = error_response(str(code))["content"]
    return result
