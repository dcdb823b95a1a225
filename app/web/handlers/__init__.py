"""HTTP handlers by audience: h5 (players), admin (operators), auth, ops."""
