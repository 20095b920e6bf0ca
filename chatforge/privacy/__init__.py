"""Privacy: personal data found and replaced in text (pii), files kept encrypted at rest (crypto).

This layer sits above errors/io and below data: prepare, the loaders and the server call it; it imports nothing
higher. Nothing here opens a network connection.
"""
