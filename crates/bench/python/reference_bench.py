"""Times Flagsmith's reference engine on the contexts roster-bench sends, for the same-run
comparison. Reads {"contexts": [...], "rounds": N} from stdin; prints the median and the mean
over the N passes of the time per evaluation. Identity override priorities arrive as null and
stand for -inf."""

import json
import statistics
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
    passes = []
    for _ in range(rounds):
        started = time.perf_counter()
        for context in contexts:
            get_evaluation_result(context)
        passes.append((time.perf_counter() - started) / len(contexts) * 1e6)
    json.dump(
        {
            "median_us": statistics.median(passes),
            "mean_us": statistics.fmean(passes),
            "evaluations": rounds * len(contexts),
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main()
