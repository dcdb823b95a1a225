"""The one-command local run: supervisor, embedded Redis and PostgreSQL, HAProxy, fake WeChat."""
