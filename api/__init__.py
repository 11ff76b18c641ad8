"""The FastAPI app: routers per resource, JWT auth, OpenAPI at /docs."""
