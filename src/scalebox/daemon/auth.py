"""Bearer-token auth: a pure check of one Authorization header.

The token is compared in constant time and never put into an error message
or a log line; errors describe the header's shape, not its content.
"""

from __future__ import annotations

import hmac

from scalebox.daemon.errors import ApiError, InvalidInput


class Unauthorized(ApiError):
    status = 401


def check_bearer(header: str | None, token: str) -> None:
    """Raise unless ``header`` is exactly 'Bearer <token>'.

    Missing header or wrong token: 401. A header that is not of the form
    'Bearer <credentials>': 400, because the client is broken, not unauthorised.
    """
    if header is None or not header.strip():
        raise Unauthorized("missing Authorization header; send 'Authorization: Bearer <API_TOKEN>'")
    scheme, _, credentials = header.strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() != "bearer" or not credentials or " " in credentials:
        raise InvalidInput(
            "malformed Authorization header; expected 'Authorization: Bearer <API_TOKEN>'"
        )
    # Bytes, because compare_digest refuses non-ASCII str; headers arrive latin-1 decoded.
    if not hmac.compare_digest(credentials.encode(), token.encode()):
        raise Unauthorized("invalid API token; check SCALEBOX_TOKEN or run 'scalebox login'")
