"""God-of-Wealth lotteries: definition, loading, draws, views and reconcile."""
