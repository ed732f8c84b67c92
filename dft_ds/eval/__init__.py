"""Evaluation: `dft-eval` turns a Hugging Face model directory into a benchmark table.

Rooms: benchmarks (local files -> problems with gold answers), prompting (problem -> prompt
text), generate (Hugging Face or vLLM backend -> completions), grading (answer extraction and
equivalence), metrics (Average@K, pass@K), report (samples.jsonl, results.json/.md/.png, merge
of shards, comparison of runs), cli (the command line). See docs/evaluation.md.

Importing this package is cheap: torch, transformers and vLLM load only when a run needs them.
"""
