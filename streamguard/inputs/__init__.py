"""Inputs from users: files fetched by URL (fetch.py) or uploaded (upload.py),
recognised by content (sniff.py). Shared by file jobs and standalone checks."""
