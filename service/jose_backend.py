"""Start-up check that python-jose verifies with its ``cryptography`` backend."""

from __future__ import annotations

from importlib import metadata

__all__ = ("JoseBackendError", "ensure_cryptography_backend")

# SECURITY: CVE-2024-33663 and CVE-2024-33664 are fixed in python-jose 3.4.0.
_MINIMUM_VERSION = (3, 4)


class JoseBackendError(RuntimeError):
    """python-jose would verify with a pure-Python backend, or is too old."""


def ensure_cryptography_backend() -> str:
    """Return the backend's name, or raise when it is not ``cryptography``.

    python-jose silently falls back to the pure-Python ``rsa`` backend when
    ``cryptography`` is missing (catalog J-05); we refuse to start instead.
    """
    from jose.backends import RSAKey

    try:
        from jose.backends.cryptography_backend import CryptographyRSAKey
    except ImportError as err:
        raise JoseBackendError(
            "python-jose cannot load its cryptography backend; "
            "install python-jose[cryptography]"
        ) from err
    if RSAKey is not CryptographyRSAKey:
        raise JoseBackendError("python-jose is not using its cryptography backend")
    version = metadata.version("python-jose")
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts < _MINIMUM_VERSION:
        raise JoseBackendError(f"python-jose {version} is older than 3.4.0")
    return "cryptography"
