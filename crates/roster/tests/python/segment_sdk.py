"""Drives Segment's Python library (segment-analytics-python) against a Roster server.

Usage: segment_sdk.py BASE_URL WRITE_KEY. Sends synchronously (each call is posted before the
next), gzip-compressed, the way the library does; prints the errors it reported (none expected).
"""

import json
import sys

import segment.analytics as analytics


def main() -> None:
    base_url, write_key = sys.argv[1:3]
    errors = []
    analytics.write_key = write_key
    analytics.host = base_url
    analytics.sync_mode = True
    analytics.gzip = True
    analytics.max_retries = 0
    analytics.on_error = lambda error, items: errors.append(str(error))

    analytics.track(anonymous_id="anon-seg", event="Viewed Pricing", properties={"tier": "pro"})
    analytics.identify("u-seg", {"email": "ada@example.com", "plan": "pro"})
    analytics.identify("u-seg", {"plan": "team"})
    analytics.alias(previous_id="anon-seg", user_id="u-seg")
    analytics.track("u-seg", "Checkout", {"total": 49.99})
    analytics.page("u-seg", "Docs", "Home", {"path": "/docs"})
    analytics.flush()
    print(json.dumps({"errors": errors}))


if __name__ == "__main__":
    main()
