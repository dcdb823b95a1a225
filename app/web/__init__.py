"""The web edge: app factory, edge middleware, cleanup contexts, handlers, the H5 page."""
