"""Drives a Segment-compatible Python library against a Roster server: Segment's own
(segment-analytics-python) or RudderStack's (rudder-sdk-python, a fork speaking the same API).

Usage: segment_libraries.py segment|rudder BASE_URL WRITE_KEY PREFIX. Sends synchronously and
gzip-compressed; ids start with PREFIX so several libraries can share one server. Prints the
errors the library reported (none expected).
"""

import json
import sys


def main() -> None:
    library, base_url, write_key, prefix = sys.argv[1:5]
    if library == "segment":
        import segment.analytics as analytics

        analytics.host = base_url
    else:
        import rudderstack.analytics as analytics

        analytics.dataPlaneUrl = base_url
    errors = []
    analytics.write_key = write_key
    analytics.sync_mode = True
    analytics.gzip = True
    analytics.max_retries = 0
    analytics.on_error = lambda error, items: errors.append(str(error))

    user, anonymous = f"{prefix}-user", f"{prefix}-anon"
    analytics.track(anonymous_id=anonymous, event="Viewed Pricing", properties={"tier": "pro"})
    analytics.identify(user, {"email": f"{prefix}@example.com", "plan": "pro"})
    analytics.identify(user, {"plan": "team"})
    analytics.alias(previous_id=anonymous, user_id=user)
    analytics.track(user, "Checkout", {"total": 49.99})
    analytics.page(user, "Docs", "Home", {"path": "/docs"})
    analytics.flush()
    print(json.dumps({"errors": errors}))


if __name__ == "__main__":
    main()
