"""`dsm api`: a JSON HTTP API over a namespace's store, and the dashboard's static files.

Needs the `api` extra (Starlette and uvicorn): `pip install 'dsm-workflow[api]'`. `app.create_app` builds
the application, `serve.serve` runs it with uvicorn inside an event loop the caller owns.
"""

from __future__ import annotations

MISSING = "dsm api needs Starlette and uvicorn: pip install 'dsm-workflow[api]'"


def available() -> bool:
    """Whether the api extra is installed (and imports)."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        return False
    return True
