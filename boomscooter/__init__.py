"""boomscooter: a replicated append-only log over the bootcast page stream (in progress)."""

__all__: list[str] = []
