"""Loops that run beside the requests: the ledger drainer, the events listener, the lag sampler."""
