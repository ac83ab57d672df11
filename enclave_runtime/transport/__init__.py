"""Transports: the NSM device and vsock (real or emulated)."""
