"""Times Flagsmith's reference engine on the contexts roster-bench sends, for the same-run
comparison. Reads {"contexts": [...], "rounds": N} from stdin; prints {"per_evaluation_us": ...}.
Identity override priorities arrive as null and stand for -inf."""

import json
import sys
import time

from flag_engine.engine import get_evaluation_result


def main() -> None:
    request = json.load(sys.stdin)
    contexts = request["contexts"]
    for context in contexts:
        for segment in (context.get("segments") or {}).values():
            for override in segment.get("overrides") or []:
                if override.get("priority", 0) is None:
                    override["priority"] = float("-inf")
    for context in contexts:  # warm-up (caches, imports)
        get_evaluation_result(context)
    rounds = request["rounds"]
    started = time.perf_counter()
    for _ in range(rounds):
        for context in contexts:
            get_evaluation_result(context)
    elapsed = time.perf_counter() - started
    evaluations = rounds * len(contexts)
    json.dump({"per_evaluation_us": elapsed / evaluations * 1e6, "evaluations": evaluations}, sys.stdout)


if __name__ == "__main__":
    main()
