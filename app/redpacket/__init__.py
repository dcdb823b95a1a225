"""Red packets: definition, split, loading, grabs, views, sold-out memory, reconcile, rebuild."""
