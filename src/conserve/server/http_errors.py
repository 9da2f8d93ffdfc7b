"""Every error a conserve HTTP app sends leaves as an OpenAI error object: the API-key check, the
handlers for APIError, body validation, HTTP errors and bugs (logged, never shown as a traceback).
Torch-free, so the cluster ingress shares it with the single-process app."""

from __future__ import annotations

import hmac
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from conserve.server.errors import APIError, error_response, validation_message, validation_param

log = logging.getLogger(__name__)


def install_openai_errors(app: FastAPI, http_errors, api_key: str | None = None) -> None:
    """http_errors: a Prometheus counter labelled by status, counting every error response."""

    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                http_errors.labels("401").inc()
                return error_response(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                                      code="invalid_api_key")
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError):
        http_errors.labels(str(e.status)).inc()
        return error_response(e.status, e.message, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError):
        http_errors.labels("400").inc()
        errors = e.errors()
        if errors and errors[0].get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON")
        return error_response(400, validation_message(errors), validation_param(errors))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException):
        http_errors.labels(str(e.status_code)).inc()
        return error_response(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, e: Exception):  # a bug: log it, never show a traceback
        log.exception("unhandled error")
        http_errors.labels("500").inc()
        return error_response(500, f"internal error: {type(e).__name__}")
