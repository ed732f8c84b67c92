"""Run in the vLLM environment (.venv-vllm): greedy and seeded generations of one model directory.

  python vllm_generate.py REQUESTS.json OUT_DIR NAME=MODEL_DIR ...

REQUESTS.json: {"prompts": {NAME: [[ids...], ...]}, "max_tokens": N, "seeds": [..]}. OUT.json gets, per
prompt, the greedy token ids, and the seeded samples of two passes (temperature 1) for each seed,
in OUT_DIR/NAME.json; a model vLLM cannot start gets {"error": ...}. One process for all models:
vLLM's import and set-up are paid once, and the engine and its worker run in this process (as
dft-eval's VLLMBackend runs them on CPU): about 6 s for the first model and 2 s for each next one,
where an engine process and a worker process per model took about 16 s each.
"""

import gc
import json
import os
import sys
import time


def generate(vllm, model_dir: str, spec: dict, token_ids: list[list[int]]) -> dict:
    start = time.perf_counter()
    llm = vllm.LLM(model=model_dir, dtype="float32", max_model_len=512, enforce_eager=True,
                   kv_cache_memory_bytes=256 << 20, seed=0, distributed_executor_backend="uni")
    started = time.perf_counter() - start
    prompts = [{"prompt_token_ids": ids} for ids in token_ids]
    greedy = vllm.SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True)
    out = {"startup_s": started,
           "greedy": [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]}
    sampled = []
    for _ in range(2):
        params = [vllm.SamplingParams(temperature=1.0, max_tokens=spec["max_tokens"], seed=s, ignore_eos=True)
                  for s in spec["seeds"]]
        sampled.append([list(o.outputs[0].token_ids) for o in llm.generate(prompts[:len(params)], params, use_tqdm=False)])
    out["sampled"] = sampled
    out["greedy"] = [list(t) for t in out["greedy"]]
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return out


def main(requests_path: str, out_dir: str, models: list[str]) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import vllm

    spec = json.load(open(requests_path, encoding="utf-8"))
    for item in models:
        name, model_dir = item.split("=", 1)
        try:
            out = generate(vllm, model_dir, spec, spec["prompts"][name])
        except Exception as exc:  # reported per model; the test decides what is expected
            out = {"error": f"{type(exc).__name__}: {exc}"}
        json.dump(out, open(os.path.join(out_dir, f"{name}.json"), "w", encoding="utf-8"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
