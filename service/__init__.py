"""rag-api-core: an aiohttp front door for APIM keys and Entra ID tokens."""

__all__ = ("__version__",)

__version__ = "0.1.0"
