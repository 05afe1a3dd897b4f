"""The management port: HTTP server, dashboard, metrics and JSON API (see app.py)."""
