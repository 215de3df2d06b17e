"""Endpoint health: passive outlier detection (pure) and active health watching."""
