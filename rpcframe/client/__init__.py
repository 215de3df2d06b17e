"""Client fronts: sync (``_sync``) and asyncio (``_aio``) over one per-call wrapper."""
