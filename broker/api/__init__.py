"""HTTP surfaces: the management API and OAuth routers (FastAPI) and the raw-ASGI proxy."""
