#!/usr/bin/env python3
"""A stand-in identity provider, to try Tollgate's JWT tenants without Auth0 or Keycloak.

It signs RS256 tokens the way Auth0 does for an API (a namespaced tenant claim, scopes in
`scope`) with the RSA key in `idp.pem`, and prints that key's public half as a JWKS. Only the
Python standard library and the `openssl` command are needed.

    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out idp.pem
    python3 jwt-idp.py jwks > jwks.json
    python3 jwt-idp.py token acme "read generate"          # valid for an hour
    python3 jwt-idp.py token acme "read" -120              # expired two minutes ago

See docs/jwt.md.
"""
import base64
import json
import os
import subprocess
import sys
import time

ISSUER = os.environ.get("IDP_ISSUER", "https://example-saas.eu.auth0.com/")
AUDIENCE = os.environ.get("IDP_AUDIENCE", "https://api.example.com")
TENANT_CLAIM = os.environ.get("IDP_TENANT_CLAIM", "https://example.com/tenant_id")
KEY = os.environ.get("IDP_KEY", "idp.pem")
KID = "stand-in-1"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwks() -> dict:
    out = subprocess.run(
        ["openssl", "rsa", "-in", KEY, "-noout", "-modulus"], capture_output=True, text=True, check=True
    ).stdout
    n = bytes.fromhex(out.strip().split("=", 1)[1])
    e = (65537).to_bytes(3, "big")
    return {"keys": [{"kty": "RSA", "use": "sig", "alg": "RS256", "kid": KID, "n": b64(n), "e": b64(e)}]}


def token(tenant: str, scope: str, ttl: int) -> str:
    now = int(time.time())
    header = {"alg": "RS256", "typ": "JWT", "kid": KID}
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "auth0|64f1c2a9e0",
        "iat": min(now, now + ttl - 60),
        "exp": now + ttl,
        "scope": scope,
        TENANT_CLAIM: tenant,
    }
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = subprocess.run(
        ["openssl", "dgst", "-sha256", "-sign", KEY], input=signing_input.encode(), capture_output=True, check=True
    ).stdout
    return f"{signing_input}.{b64(signature)}"


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "jwks":
        print(json.dumps(jwks(), indent=2))
    elif len(sys.argv) >= 4 and sys.argv[1] == "token":
        print(token(sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 3600))
    else:
        sys.exit(__doc__)
