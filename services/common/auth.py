"""The bearer token that registry writes and usage reports carry (DESIGN 3)."""

from __future__ import annotations

import hmac

from pydantic import SecretStr
from starlette.requests import Request

from services.common.errors import Unauthorized


def check_bearer(request: Request, token: SecretStr | None) -> None:
    """Pass when no token is configured or the request carries ``Authorization: Bearer
    <token>`` (the scheme in any case, as HTTP has it); else ``Unauthorized``."""
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    expected = token.get_secret_value().encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
        raise Unauthorized()
