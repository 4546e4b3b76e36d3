"""Drives Customer.io's Python client (customerio) against a Roster server.

Usage: customerio_sdk.py BASE_URL SITE_ID API_KEY. The client only builds https URLs
(`https://{host}:{port}/api/v1`); to reach a plain-HTTP Roster on localhost it is pointed at
Roster the way a user would point it at any other endpoint: by setting its `base_url`.
"""

import json
import sys

from customerio import CustomerIO


def main() -> None:
    base_url, site_id, api_key = sys.argv[1:4]
    cio = CustomerIO(site_id, api_key, retries=0)
    cio.base_url = f"{base_url}/api/v1"
    errors = []
    calls = [
        lambda: cio.track_anonymous("anon-cio", "Viewed Pricing", {"tier": "pro"}),
        lambda: cio.identify("u-cio", email="cio@example.com", plan="pro", created_at=1700000000),
        lambda: cio.identify("u-cio", plan="team", anonymous_id="anon-cio"),
        lambda: cio.track("u-cio", "Checkout", {"total": 20}, id="evt-1"),
        lambda: cio.track("u-cio", "Checkout", {"total": 20}, id="evt-1"),
        lambda: cio.add_device("u-cio", "apns-cio", "ios", last_used=1700000100, app_version="2.1"),
        lambda: cio.identify("u-dup", seats=2),
        lambda: cio.merge_customers("id", "u-cio", "id", "u-dup"),
        lambda: cio.identify("gone", plan="free"),
        lambda: cio.delete("gone"),
        lambda: cio.suppress("quiet"),
        lambda: cio.track("quiet", "Dropped"),
    ]
    for call in calls:
        try:
            call()
        except Exception as error:  # noqa: BLE001 - report whatever the client raised
            errors.append(f"{type(error).__name__}: {error}")
    print(json.dumps({"errors": errors}))


if __name__ == "__main__":
    main()
