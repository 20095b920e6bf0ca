"""The server: OpenAI-compatible API and chat page (app.py), continuous batching (scheduler.py), request shapes
(schemas.py), auth and limits (security.py), the page itself (static/)."""
