"""hongbao: a high-concurrency WeChat red-packet and lottery service."""
