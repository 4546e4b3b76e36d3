"""Drives Flagsmith's Python SDK against a Roster server; prints what the SDK saw as JSON.

Usage: flagsmith_sdk.py BASE_URL CLIENT_KEY SERVER_KEY. Remote evaluation uses the client key;
local evaluation (which Flagsmith allows with a `ser.` server key only) downloads the environment
document and evaluates in-process.
"""

import json
import sys

from flagsmith import Flagsmith


def flag_state(flags, name):
    return {"enabled": flags.is_feature_enabled(name), "value": flags.get_feature_value(name)}


def main() -> None:
    base_url, client_key, server_key = sys.argv[1:4]
    api_url = f"{base_url}/api/v1/"
    remote = Flagsmith(environment_key=client_key, api_url=api_url)
    seen = {
        "environment": flag_state(remote.get_environment_flags(), "checkout"),
        "pro": flag_state(remote.get_identity_flags("ada", traits={"plan": "pro", "app_version": "2.1.0"}), "checkout"),
        "downgraded": flag_state(remote.get_identity_flags("ada", traits={"plan": "free"}), "checkout"),
        "transient": flag_state(
            remote.get_identity_flags("ada", traits={"plan": {"value": "pro", "transient": True}}), "checkout"
        ),
        "vip": flag_state(remote.get_identity_flags("vip"), "checkout"),
    }
    local = Flagsmith(environment_key=server_key, api_url=api_url, enable_local_evaluation=True)
    seen["local_pro"] = flag_state(
        local.get_identity_flags("bob", traits={"plan": "pro", "app_version": "3.0.0"}), "checkout"
    )
    seen["local_free"] = flag_state(local.get_identity_flags("bob", traits={"plan": "free"}), "checkout")
    seen["local_vip"] = flag_state(local.get_identity_flags("vip"), "checkout")
    seen["local_environment"] = flag_state(local.get_environment_flags(), "checkout")
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
