"""Drives Altertable's Python SDK against a Roster server; prints the errors it raised (none
expected). Usage: altertable_sdk.py BASE_URL API_KEY ENVIRONMENT."""

import json
import sys

from altertable import Altertable


def main() -> None:
    base_url, api_key, environment = sys.argv[1:4]
    client = Altertable(api_key, server_url=base_url, environment=environment)
    errors = []
    calls = [
        lambda: client.track("Viewed Pricing", "anon-alt", {"properties": {"tier": "pro"}}),
        lambda: client.identify("u-alt", {"traits": {"email": "alt@example.com", "plan": "pro"}}),
        lambda: client.identify("u-alt", {"traits": {"plan": "team"}}),
        lambda: client.alias("anon-alt", "u-alt"),
        lambda: client.track("Checkout", "u-alt", {"properties": {"total": 12.5}}),
    ]
    for call in calls:
        try:
            call()
        except Exception as error:  # noqa: BLE001 - report whatever the SDK raised
            errors.append(f"{type(error).__name__}: {error}")
    print(json.dumps({"errors": errors}))


if __name__ == "__main__":
    main()
