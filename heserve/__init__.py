"""heserve: score a plaintext item catalog against a CKKS-encrypted user vector."""

__version__ = "0.1.0"
