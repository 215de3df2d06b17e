"""Pure policy core: no I/O, no grpc, no asyncio (filled by later layers)."""
