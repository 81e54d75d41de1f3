"""One JSON shape for every error: {"error": {"code", "message", "field"}}."""

from __future__ import annotations

from typing import Any

from flask import Flask, Response, jsonify
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from shared.errors import PlanError, Problem

STATUS = {Problem.NOT_FOUND: 404, Problem.INVALID: 422, Problem.CONFLICT: 409}
HTTP_FIELDS = {413: "body"}  # the field an HTTP-level error is about


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.headers = headers or {}


def error_response(status: int, code: str, message: str, field: str | None = None,
                   **extra: Any) -> Response:
    body: dict[str, Any] = {"code": code, "message": message, "field": field, **extra}
    response = jsonify({"error": body})
    response.status_code = status
    return response


def _field(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if part == "[key]":  # pydantic's marker for "the key itself is invalid": the path says it
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "body"


def validation_error(exc: ValidationError) -> Response:
    """flask-openapi3's validation callback: 422 naming the first bad field; all of them in details."""
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    first = errors[0]
    field = _field(first["loc"])
    details = [{"field": _field(e["loc"]), "message": e["msg"]} for e in errors]
    message = first["msg"] if first["type"] != "extra_forbidden" else "unknown field"
    return error_response(422, "invalid", f"{field}: {message}", field, details=details)


def register(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        response = error_response(exc.status, exc.code, exc.message, exc.field)
        response.headers.update(exc.headers)
        return response

    @app.errorhandler(PlanError)
    def _plan_error(exc: PlanError) -> Response:
        c = exc.conflict
        return error_response(STATUS[exc.problem], c.code, c.message, c.field)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        if exc.response is not None and exc.response.mimetype == "application/json":
            return exc.response  # already ours (validation)
        code = (exc.name or "error").lower().replace(" ", "_")
        return error_response(exc.code or 500, code, exc.description or exc.name or "error", HTTP_FIELDS.get(exc.code))

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        app.logger.exception("unhandled error")
        return error_response(500, "internal", "internal error; see the server log")
