"""Model components (registered on import)."""
