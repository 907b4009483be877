"""The web interface: pages at `/` over the same service as the API (see routes.py)."""
