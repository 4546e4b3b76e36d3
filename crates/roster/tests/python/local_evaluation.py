"""Evaluates identities locally the way Flagsmith's Python SDK does: from Roster's environment
document, through the SDK's own mapping into the reference engine.

Reads one JSON object from stdin: {"document": <environment document>, "identities":
[{"identifier": ..., "traits": {...}}]}. Writes a JSON list with, per identity, the flags
(enabled, value, variant) by feature name and the names of the matched segments.
"""

import json
import sys

from flag_engine.engine import get_evaluation_result
from flagsmith.mappers import (
    map_context_and_identity_data_to_context,
    map_environment_document_to_context,
)


def main() -> None:
    request = json.load(sys.stdin)
    environment_context = map_environment_document_to_context(request["document"])
    answers = []
    for identity in request["identities"]:
        context = map_context_and_identity_data_to_context(
            environment_context, identity["identifier"], identity["traits"]
        )
        result = get_evaluation_result(context)
        answers.append(
            {
                "flags": {
                    name: {"enabled": flag["enabled"], "value": flag["value"], "variant": flag["variant"]}
                    for name, flag in result["flags"].items()
                },
                "segments": [
                    segment["name"]
                    for segment in result["segments"]
                    if (segment.get("metadata") or {}).get("source") == "api"
                ],
            }
        )
    json.dump(answers, sys.stdout)


if __name__ == "__main__":
    main()
