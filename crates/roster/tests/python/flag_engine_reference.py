"""Evaluates flag contexts with Flagsmith's reference engine for Roster's differential test.

Reads one JSON object per line from stdin: {"id": ..., "context": <EvaluationContext>}. Identity
override segments carry "priority": null, which stands for -inf (JSON has no infinities), the way
Flagsmith's SDKs map identity overrides. Writes one JSON object per line: the flags (enabled,
value, variant) by feature name and the names of the matched API segments.
"""

import json
import sys

from flag_engine.engine import get_evaluation_result


def main() -> None:
    out = sys.stdout
    for line in sys.stdin:
        if not line.strip():
            continue
        case = json.loads(line)
        context = case["context"]
        for segment in (context.get("segments") or {}).values():
            for override in segment.get("overrides") or []:
                if override.get("priority", 0) is None:
                    override["priority"] = float("-inf")
        result = get_evaluation_result(context)
        flags = {
            name: {"enabled": flag["enabled"], "value": flag["value"], "variant": flag["variant"]}
            for name, flag in result["flags"].items()
        }
        segments = [
            segment["name"]
            for segment in result["segments"]
            if (segment.get("metadata") or {}).get("source") != "identity_overrides"
        ]
        out.write(json.dumps({"id": case["id"], "flags": flags, "segments": segments}) + "\n")


if __name__ == "__main__":
    main()
