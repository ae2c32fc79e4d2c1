"""Transports: the I/O shells that implement ``protocol.transport.Transport``."""
