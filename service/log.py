"""The service's loggers, under the package's own dotted names."""

import logging

__all__ = (
    "access_logger",
    "app_logger",
    "auth_logger",
    "idp_logger",
    "jwks_logger",
    "keys_logger",
)

app_logger = logging.getLogger("rag_api_core")
auth_logger = logging.getLogger("rag_api_core.auth")
jwks_logger = logging.getLogger("rag_api_core.jwks")
keys_logger = logging.getLogger("rag_api_core.keys")
access_logger = logging.getLogger("rag_api_core.access")
idp_logger = logging.getLogger("rag_api_core.idp")
