"""Short-lived signed bearer tokens for service accounts (batch jobs, monitoring) that hold no client
certificate. EdDSA (Ed25519) JWTs via PyJWT: the signing key stays in Vault, the gateway holds only the
public key. Lifetimes are capped so a leaked token expires quickly.
"""

from __future__ import annotations

import time
import uuid

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from runtime.common.identity import Identity

AUDIENCE = "membria-gateway"
MAX_TTL_SECONDS = 3600


class TokenRejected(ValueError):
    pass


def issue(key: Ed25519PrivateKey, service: str, departments: list[str], ttl_seconds: int = 900) -> str:
    if not 0 < ttl_seconds <= MAX_TTL_SECONDS:
        raise ValueError(f"token lifetime must be 1..{MAX_TTL_SECONDS} seconds")
    now = int(time.time())
    claims = {
        "sub": service,
        "kind": "service",
        "departments": sorted(departments),
        "aud": AUDIENCE,
        "iat": now,
        "nbf": now,
        "exp": now + ttl_seconds,
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, key, algorithm="EdDSA")


def verify(token: str, public_key: Ed25519PublicKey) -> Identity:
    try:
        claims = jwt.decode(
            token,
            public_key,
            algorithms=["EdDSA"],
            audience=AUDIENCE,
            options={"require": ["exp", "iat", "sub", "aud"]},
            leeway=5,
        )
    except jwt.PyJWTError as exc:
        raise TokenRejected(f"bearer token rejected: {exc}") from exc
    if claims["exp"] - claims["iat"] > MAX_TTL_SECONDS:
        raise TokenRejected("bearer token lives longer than allowed")
    if claims.get("kind") != "service":
        raise TokenRejected("bearer tokens are for service accounts only")
    return Identity(
        subject=str(claims["sub"]),
        kind="service",
        departments=tuple(str(d) for d in claims.get("departments", [])),
        auth="token",
    )
