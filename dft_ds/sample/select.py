"""Selection: graded samples -> the rows a training run learns from, the rejected rows, and a
summary per problem. Pure functions of the records and the policy, so `dft-sample filter` and
`merge` reproduce a sampling run's selection exactly.

A record is one problem as samples.jsonl holds it: benchmark, index, id, problem, gold, the prompt
(`messages` for a chat-templated prompt, else `prompt_text`), and per sample: sample, seed, text,
extracted, verdict (correct | wrong | no_answer | timeout), finished and tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from dft_ds.data import PROVENANCE_FIELD  # the field of a training row that says where it came from

VERDICTS = ("correct", "wrong", "no_answer", "timeout")


@dataclass(frozen=True)
class Policy:
    """Which correct samples become training rows (docs/offline_rl.md, "Selection")."""

    max_per_problem: int | None = None  # keep at most this many correct samples per problem (lowest sample index first)
    drop_all_correct: bool = False  # drop problems every sample solved: nothing left to learn there
    drop_all_wrong: bool = False  # drop problems no sample solved from rejected.jsonl and the counts
    dedup: bool = False  # keep one of identical completions of a problem
    keep_unfinished: bool = False  # keep correct samples cut at max_new_tokens (by default they teach not to stop)

    def describe(self) -> str:
        parts = ["every correct sample" if self.max_per_problem is None
                 else f"at most {self.max_per_problem} correct per problem"]
        parts += [text for on, text in ((self.drop_all_correct, "problems solved K of K dropped"),
                                        (self.drop_all_wrong, "problems solved 0 of K dropped"),
                                        (self.dedup, "identical completions once"),
                                        (not self.keep_unfinished, "unfinished samples dropped")) if on]
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Selection:
    kept: list[dict]  # training rows
    rejected: list[dict]  # the incorrect samples, in the same layout (for a later preference baseline)
    problems: list[dict]  # one summary line per problem
    counts: dict[str, int]


def training_row(record: dict, generation: dict, model: str) -> dict:
    """A dft-train data row: the prompt exactly as sampled and the completion as the target."""
    tag = {"benchmark": record["benchmark"], "index": record["index"], "id": record["id"],
           "sample": generation["sample"], "seed": generation["seed"], "model": model,
           "verdict": generation["verdict"], "extracted": generation["extracted"], "gold": record["gold"]}
    if record.get("messages") is not None:
        row = {"messages": [*record["messages"], {"role": "assistant", "content": generation["text"]}]}
    else:
        row = {"prompt": record["prompt_text"], "response": generation["text"]}
    row[PROVENANCE_FIELD] = tag
    return row


def select(records: list[dict], policy: Policy, model: str) -> Selection:
    kept, rejected, problems = [], [], []
    counts = dict.fromkeys(("problems", "samples", "correct", "kept", "rejected", "cut", "timeouts",
                            "dropped_unfinished", "dropped_duplicate", "dropped_over_max", "problems_all_correct",
                            "problems_all_wrong", "problems_dropped"), 0)
    for record in records:
        gens = record["generations"]
        k = len(gens)
        correct = [g for g in gens if g["verdict"] == "correct"]
        line = {"benchmark": record["benchmark"], "index": record["index"], "id": record["id"], "k": k,
                "correct": len(correct), "cut": sum(not g["finished"] for g in gens),
                "timeouts": sum(g["verdict"] == "timeout" for g in gens), "kept": 0, "dropped": None}
        counts["problems"] += 1
        counts["samples"] += k
        counts["correct"] += len(correct)
        counts["cut"] += line["cut"]
        counts["timeouts"] += line["timeouts"]
        all_correct, all_wrong = len(correct) == k, not correct
        counts["problems_all_correct"] += all_correct
        counts["problems_all_wrong"] += all_wrong
        if (all_correct and policy.drop_all_correct) or (all_wrong and policy.drop_all_wrong):
            line["dropped"] = "all correct" if all_correct else "all wrong"
            counts["problems_dropped"] += 1
            problems.append(line)
            continue
        seen: set[str] = set()
        taken = 0
        for g in gens:
            if g["verdict"] != "correct":
                rejected.append(training_row(record, g, model))
                continue
            if not g["finished"] and not policy.keep_unfinished:
                counts["dropped_unfinished"] += 1
                continue
            if policy.dedup and g["text"] in seen:
                counts["dropped_duplicate"] += 1
                continue
            if policy.max_per_problem is not None and taken >= policy.max_per_problem:
                counts["dropped_over_max"] += 1
                continue
            seen.add(g["text"])
            taken += 1
            kept.append(training_row(record, g, model))
        line["kept"] = taken
        problems.append(line)
    counts["kept"], counts["rejected"] = len(kept), len(rejected)
    return Selection(kept, rejected, problems, counts)
