"""Payouts through WeChat Pay's merchant transfer: the outbox, the API v3 client, the worker."""
