"""Formats both sides speak: bytes and files in, typed objects out; no network, no Docker."""
