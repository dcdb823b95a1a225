"""Schemathesis hooks for tests/test_fuzz.py, loaded by schemathesis (not by pytest)."""

from __future__ import annotations

from typing import Any

import schemathesis

from app.redpacket.split import MAX_COUNT

# A valid red packet may have 10,000,000 envelopes: more than a fuzz run on a shared
# machine should split, copy and load. Valid counts above this are sent as this.
FUZZ_MAX_COUNT = 1_000
CREATE = ("POST", "/api/admin/campaigns")


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    """Cap a valid envelope count; a count the schema rejects is sent as it is."""
    body = case.body
    if (case.operation.method.upper(), case.operation.path) != CREATE:
        return
    if isinstance(body, dict):
        count = body.get("count")
        if type(count) is int and FUZZ_MAX_COUNT < count <= MAX_COUNT:
            body["count"] = FUZZ_MAX_COUNT
