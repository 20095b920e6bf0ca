"""Held-out evaluation: loss, bits-per-byte, reply metrics."""
