"""Generation: per-request seeds, the Gumbel-max sampler against softmax frequencies and top-p, and
the Hugging Face backend on a very small Llama: a request's completion does not depend on its batch
(size, neighbours, order), which is what makes shards reproduce the unsharded run."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from dft_ds import synthetic
from dft_ds.eval.generate import (Completion, HFBackend, Request, Sampling, SeededSampler, completion, eos_ids,
                                  request_seed)


def test_request_seed_is_stable_across_processes_and_distinct():
    here = request_seed(0, "math500", 3, 1)
    code = "from dft_ds.eval.generate import request_seed; print(request_seed(0, 'math500', 3, 1))"
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123"}).stdout.strip()
    assert str(here) == there and 0 <= here < 2**63
    keys = [(s, b, i, k) for s in (0, 1) for b in ("a", "b") for i in range(5) for k in range(4)]
    assert len({request_seed(*key) for key in keys}) == len(keys)


def sample_counts(logits: torch.Tensor, temperature: float, top_p: float, draws: int) -> torch.Tensor:
    """How often greedy decoding over the sampler's output picks each token, one row, `draws` steps."""
    sampler = SeededSampler([7], temperature, top_p, "cpu")
    counts = torch.zeros(logits.shape[-1])
    for _ in range(draws):
        counts[sampler(None, logits[None].clone()).argmax(-1)] += 1
    return counts


def test_gumbel_max_sampling_matches_softmax_frequencies():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    draws = 4000
    for temperature in (1.0, 0.5):
        expected = torch.softmax(logits / temperature, -1) * draws
        counts = sample_counts(logits, temperature, 1.0, draws)
        # Pearson chi-square with 4 degrees of freedom: 18.5 is its 0.999 quantile.
        assert float(((counts - expected) ** 2 / expected).sum()) < 18.5


def test_top_p_never_samples_outside_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    counts = sample_counts(logits, 1.0, 0.7, 2000)  # nucleus: the first two tokens (0.5 + 0.3 >= 0.7)
    assert counts[2] == counts[3] == 0 and counts[0] > counts[1] > 0


def test_each_row_has_its_own_stream():
    logits = torch.zeros(2, 50)
    a = SeededSampler([1, 2], 1.0, 1.0, "cpu")(None, logits)
    b = SeededSampler([2, 1], 1.0, 1.0, "cpu")(None, logits)
    assert torch.equal(a[0], b[1]) and torch.equal(a[1], b[0])  # the row's seed decides, not its place
    assert not torch.equal(a[0], a[1])  # two seeds, two streams: real noise, not the logits passed through
    # Gumbel noise -log(-log u) from u ~ U(0, 1) of the seed's own generator.
    u = torch.empty(50).uniform_(generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a[0], -torch.log(-torch.log(u)))


def test_eos_ids_merge_tokenizer_and_generation_config():
    class Tok:
        eos_token_id = 2

    class Gen:
        eos_token_id = [5, 2]

    assert eos_ids(Tok(), Gen()) == [5, 2] and eos_ids(Tok(), None) == [2]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices gain nothing from threads, and on a shared 2-core machine spinning OpenMP
    threads made these tests 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = tmp_path_factory.mktemp("tiny")
    tok = AutoTokenizer.from_pretrained(synthetic.ensure_assets())
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(synthetic.tiny_model_config(
        len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2))
    model.save_pretrained(tmp / "model")
    tok.save_pretrained(tmp / "model")
    return str(tmp / "model")


@pytest.fixture(scope="module")
def requests_(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    texts = [e["prompt"] for e in synthetic.generate_examples(5, 0, "test")]
    return [Request(tok(t)["input_ids"], request_seed(0, "synthetic", i, k)) for i, t in enumerate(texts)
            for k in range(2)]


def backend(tiny_dir, batch_size):
    from transformers import AutoTokenizer

    return HFBackend(tiny_dir, AutoTokenizer.from_pretrained(tiny_dir), batch_size=batch_size, progress=False)


def test_hf_completions_do_not_depend_on_the_batch(tiny_dir, requests_):
    assert len({len(r.prompt_ids) for r in requests_}) > 1  # left padding is really exercised
    sampling = Sampling(temperature=1.0, top_p=0.9, max_new_tokens=12)
    one = backend(tiny_dir, 1).generate(requests_, sampling)
    assert all(isinstance(c, Completion) and 0 < c.num_tokens <= 12 for c in one)
    all_at_once = backend(tiny_dir, len(requests_))
    assert all_at_once.generate(requests_, sampling) == one
    assert backend(tiny_dir, 3).generate(requests_[::-1], sampling)[::-1] == one
    assert all_at_once.generate(requests_[4:7], sampling) == one[4:7]  # other neighbours, other shard
    assert one[0] != one[1]  # two samples of one problem differ
    assert all_at_once.device == "cpu" and all_at_once.dtype == torch.float32


def test_hf_greedy_is_deterministic_and_ignores_the_seed(tiny_dir, requests_):
    sampling = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=8)
    out = backend(tiny_dir, 4).generate(requests_, sampling)
    assert out[0] == out[1]  # same prompt, different seeds
    assert backend(tiny_dir, 10).generate(requests_, sampling) == out


def test_hf_stops_at_eos_and_reports_it(tiny_dir):
    be = backend(tiny_dir, 1)
    assert completion(be.tokenizer, [10, 11, 2, 3, 3], be.stops) == Completion(be.tokenizer.decode([10, 11]), 2, True)
    assert completion(be.tokenizer, [10, 11, 12], be.stops) == Completion(be.tokenizer.decode([10, 11, 12]), 3, False)
