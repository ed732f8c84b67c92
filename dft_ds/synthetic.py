"""The embedded default: synthetic math data, its tokenizer and the tiny model config.

Everything here is generated locally from a seed, so `dft-train` with no config runs anywhere
without a download. Real runs never need this module.

Data: chain-of-thought word problems in five kinds (inventory, travel, sharing, linear equations,
plain arithmetic). Each solution writes every step as "expression = ... = value" and ends with
`\\boxed{answer}`, as real math chain-of-thought data does.
Splits: "train" and "test" share one distribution and are told apart by a hash of the prompt, so
they never share a prompt; "ood" uses larger numbers and more steps.

A second, easier family (issue 18) is for a miniature where a few-million-parameter model can learn
the arithmetic: "easy-train" / "easy-test" are chains of one to three additions and subtractions
of a single digit, one operation per line (bare, or told as a story of giving and getting);
"easy-ood" is the same with four to six operations, so running values also grow past what
training shows. "retention-train" / "retention" are single-digit products (a skill a base can be
pretrained on and the easy fine-tuning data never contains), to measure forgetting. Each pair is
split by prompt hash as train/test is.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # keep `import dft_ds.synthetic` free of the heavy libraries
    import datasets
    import sentencepiece
    import transformers

EASY_SPLITS = ("easy-train", "easy-test", "easy-ood", "retention-train", "retention")
SPLITS = ("train", "test", "ood", *EASY_SPLITS)
TEST_BUCKETS = 5  # one prompt hash bucket in five belongs to "test"
TOKENIZER_NAME = "synthetic-tokenizer-v1"
# A directory at the final path is whole by construction (atomic rename); these files tell it
# apart from a stray empty directory.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

# Plain-text role markers: the tiny tokenizer learns them from the corpus, no added tokens needed.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>\n"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}"
    "{{ message['content'] }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_NAMES = ("Ana", "Ben", "Carla", "Dev", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jun",
          "Kofi", "Lena", "Mia", "Noor", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq")
_GOODS = (("apples", "bags"), ("marbles", "boxes"), ("stickers", "packs"), ("pencils", "boxes"),
          ("cards", "packs"), ("eggs", "cartons"), ("beads", "jars"), ("stamps", "sheets"))
# (subject, verb in 3rd person, base verb, unit)
_TRAVELLERS = (("A cyclist", "rides", "ride", "km"), ("A train", "travels", "travel", "km"),
               ("A runner", "runs", "run", "km"), ("A boat", "sails", "sail", "miles"),
               ("A car", "drives", "drive", "miles"))
# (verb, container, item)
_BATCHES = (("bakes", "trays", "cookies"), ("picks", "baskets", "plums"),
            ("packs", "boxes", "crayons"), ("folds", "stacks", "napkins"))
_ORDINALS = ("First", "Second", "Third", "Fourth", "Fifth", "Sixth")


@dataclass(frozen=True)
class _Scale:
    """Number ranges and step counts of one difficulty."""

    small: int  # upper bound of multipliers, divisors and counts
    large: int  # upper bound of starting amounts and additive terms
    min_steps: int
    max_steps: int


_EASY = _Scale(small=9, large=50, min_steps=1, max_steps=2)
_HARD = _Scale(small=40, large=999, min_steps=3, max_steps=5)


@dataclass(frozen=True)
class _Problem:
    prompt: str
    steps: list[str]
    answer: int

    def as_example(self) -> dict[str, str]:
        """Render the solution; its last line ends with the boxed answer."""
        lines = [*self.steps, f"The answer is \\boxed{{{self.answer}}}"]
        return {"prompt": self.prompt, "response": "\n".join(lines), "answer": str(self.answer)}


def _inventory(rng: random.Random, scale: _Scale) -> _Problem:
    """A running count changed by buying packs, giving some away and receiving more."""
    name, friend = rng.sample(_NAMES, 2)
    item, container = rng.choice(_GOODS)
    count = rng.randint(2, scale.large)
    story, steps = [f"{name} has {count} {item}."], []
    for _ in range(rng.randint(scale.min_steps, scale.max_steps)):
        event = rng.choice(("buy", "give", "get"))
        if event == "buy":
            packs, size = rng.randint(2, scale.small), rng.randint(2, scale.small + 3)
            new = count + packs * size
            story.append(f"{name} buys {packs} {container} of {size} {item}.")
            steps.append(
                f"After buying: {count} + {packs} * {size} = {count} + {packs * size} = {new}")
        elif event == "give" and count > 1:
            gift = rng.randint(1, count - 1)
            new = count - gift
            story.append(f"{name} gives {gift} {item} to {friend}.")
            steps.append(f"After giving: {count} - {gift} = {new}")
        else:
            gift = rng.randint(1, scale.large)
            new = count + gift
            story.append(f"{friend} gives {name} {gift} more {item}.")
            steps.append(f"After receiving: {count} + {gift} = {new}")
        count = new
    story.append(f"How many {item} does {name} have now?")
    return _Problem(" ".join(story), steps, count)


def _travel(rng: random.Random, scale: _Scale) -> _Problem:
    """Distance over several legs, each at its own speed."""
    subject, verb, base, unit = rng.choice(_TRAVELLERS)
    legs = [(rng.randint(3, scale.large), rng.randint(2, scale.small))
            for _ in range(rng.randint(scale.min_steps, scale.max_steps) + 1)]
    parts = [f"{speed} {unit} per hour for {hours} hours" for speed, hours in legs]
    prompt = (f"{subject} {verb} at {', then at '.join(parts)}. "
              f"How many {unit} does it {base} in total?")
    steps = [f"{_ORDINALS[i]} part: {speed} * {hours} = {speed * hours}"
             for i, (speed, hours) in enumerate(legs)]
    distances = [speed * hours for speed, hours in legs]
    total = sum(distances)
    steps.append(f"Total: {' + '.join(map(str, distances))} = {total}")
    return _Problem(prompt, steps, total)


def _sharing(rng: random.Random, scale: _Scale) -> _Problem:
    """Make batches, maybe keep a few, share the rest equally."""
    name = rng.choice(_NAMES)
    verb, container, item = rng.choice(_BATCHES)
    batches, size = rng.randint(2, scale.small), rng.randint(2, scale.small + 3)
    total = batches * size
    friends = rng.randint(2, min(scale.small, total - 1))
    # Keeping the remainder (plus maybe a few full rounds) makes the division exact.
    kept = total % friends + friends * rng.randint(0, 1 if scale is _EASY else 3)
    if kept >= total:
        kept = total % friends
    share = (total - kept) // friends
    keep_text = f", keeps {kept} for later," if kept else ""
    prompt = (f"{name} {verb} {batches} {container} of {size} {item}{keep_text} and shares "
              f"{'the rest' if kept else 'them'} equally among {friends} friends. "
              f"How many {item} does each friend get?")
    steps = [f"Total {item}: {batches} * {size} = {total}"]
    if kept:
        steps.append(f"Left to share: {total} - {kept} = {total - kept}")
    steps.append(f"Each friend: {total - kept} / {friends} = {share}")
    return _Problem(prompt, steps, share)


def _linear(rng: random.Random, scale: _Scale) -> _Problem:
    """Solve a x + b = c or a x - b = c (x on both sides when hard): undo b, then divide."""
    x = rng.randint(0 if scale is _EASY else 10, scale.large // 2)
    a = rng.randint(2 if scale is _EASY else 3, scale.small)
    if scale is _HARD:
        c = rng.randint(1, a - 2)  # leaves a coefficient >= 2 once the x terms are collected
        b = rng.randint(1, scale.large)
        rhs = (a - c) * x + b
        prompt = f"Solve for x: {a}x + {b} = {c}x + {rhs}"
        steps = [f"Subtract {c}x from both sides: {a - c}x + {b} = {rhs}"]
        a, sign = a - c, "+"
    else:
        sign = rng.choice("+-")
        b = rng.randint(0, scale.large if sign == "+" else a * x)  # keeps c >= 0
        rhs = a * x + b if sign == "+" else a * x - b
        prompt = f"Solve for x: {a}x {sign} {b} = {rhs}" if b else f"Solve for x: {a}x = {rhs}"
        steps = []
    if b:
        undo, inverse = (f"Subtract {b} from", "-") if sign == "+" else (f"Add {b} to", "+")
        steps.append(f"{undo} both sides: {a}x = {rhs} {inverse} {b} = {a * x}")
    steps.append(f"Divide both sides by {a}: x = {a * x} / {a} = {x}")
    return _Problem(prompt, steps, x)


def _arithmetic(rng: random.Random, scale: _Scale) -> _Problem:
    """Evaluate a + b * c - d ...: multiplications first, then left to right."""
    while True:
        count = rng.randint(scale.min_steps, scale.max_steps) + 2
        numbers = [rng.randint(1, scale.large) for _ in range(count)]
        ops = [rng.choice("+-*") for _ in range(count - 1)]
        # A product of two large numbers would dwarf the rest; keep factors small.
        for i, op in enumerate(ops):
            if op == "*":
                numbers[i + 1] = rng.randint(2, scale.small)
        steps, terms, term_ops = _multiply_out(numbers, ops)
        value = terms[0]
        for op, term in zip(term_ops, terms[1:]):
            value = value + term if op == "+" else value - term
        if value >= 0:  # keep answers natural numbers
            break
    chain = [_render(terms, term_ops)]
    partial, rest_terms, rest_ops = terms[0], terms[1:], term_ops
    while rest_terms:
        partial = partial + rest_terms[0] if rest_ops[0] == "+" else partial - rest_terms[0]
        rest_terms, rest_ops = rest_terms[1:], rest_ops[1:]
        chain.append(_render([partial, *rest_terms], rest_ops))
    if len(chain) > 1:
        steps.append(f"Add and subtract from left to right: {' = '.join(chain)}")
    return _Problem(f"Calculate {_render(numbers, ops)}.", steps, value)


def _multiply_out(numbers: list[int], ops: list[str]) -> tuple[list[str], list[int], list[str]]:
    """Collapse every run of products, one step line each; returns steps, terms and +/- ops."""
    steps, terms, term_ops = [], [numbers[0]], []
    run = [numbers[0]]
    for op, number in zip(ops, numbers[1:]):
        if op == "*":
            run.append(number)
            product = terms[-1] * number
            terms[-1] = product
            continue
        if len(run) > 1:
            steps.append(f"Multiply: {' * '.join(map(str, run))} = {terms[-1]}")
        run = [number]
        terms.append(number)
        term_ops.append(op)
    if len(run) > 1:
        steps.append(f"Multiply: {' * '.join(map(str, run))} = {terms[-1]}")
    return steps, terms, term_ops


def _render(numbers: list[int], ops: list[str]) -> str:
    """`[1, 2, 3], ['+', '*']` -> '1 + 2 * 3'."""
    out = str(numbers[0])
    for op, number in zip(ops, numbers[1:]):
        out += f" {op} {number}"
    return out


_KINDS: tuple[Callable[[random.Random, _Scale], _Problem], ...] = (
    _inventory, _travel, _sharing, _linear, _arithmetic)


# ---- the easy family (issue 18): what a 3.4M-parameter model can learn from a few thousand examples.
# Every step line is one operation on a single digit, "a + b = c", so a step is one addition fact
# of a running value up to 36 (in domain) and a digit; the model never carries a long number.
_DIGITS = _Scale(small=9, large=9, min_steps=1, max_steps=3)
_DIGITS_OOD = _Scale(small=9, large=9, min_steps=4, max_steps=6)  # more steps; values grow to 63


def _digit_steps(rng: random.Random, scale: _Scale) -> tuple[int, list[tuple[str, int]]]:
    """A start in 1..9 and (op, digit) moves that keep the running value >= 0."""
    value = start = rng.randint(1, scale.large)
    moves = []
    for _ in range(rng.randint(scale.min_steps, scale.max_steps)):
        op = rng.choice("+-") if value > 0 else "+"
        digit = rng.randint(1, scale.small if op == "+" else min(scale.small, value))
        value = value + digit if op == "+" else value - digit
        moves.append((op, digit))
    return start, moves


def _run_moves(start: int, moves: list[tuple[str, int]]) -> tuple[list[str], int]:
    """One step line per move: '7 + 5 = 12'; returns the lines and the final value."""
    steps, value = [], start
    for op, digit in moves:
        new = value + digit if op == "+" else value - digit
        steps.append(f"{value} {op} {digit} = {new}")
        value = new
    return steps, value


def _digit_chain(rng: random.Random, scale: _Scale) -> _Problem:
    """Calculate 4 + 7 - 3: left to right, one operation per line."""
    start, moves = _digit_steps(rng, scale)
    steps, value = _run_moves(start, moves)
    expression = " ".join([str(start), *(f"{op} {digit}" for op, digit in moves)])
    return _Problem(f"Calculate {expression}.", steps, value)


def _digit_story(rng: random.Random, scale: _Scale) -> _Problem:
    """The same chain told as a count: a friend gives some, the owner gives some away."""
    name, friend = rng.sample(_NAMES, 2)
    item, _ = rng.choice(_GOODS)
    start, moves = _digit_steps(rng, scale)
    story = [f"{name} has {start} {item}."]
    for op, digit in moves:
        story.append(f"{friend} gives {name} {digit} more {item}." if op == "+"
                     else f"{name} gives {digit} {item} to {friend}.")
    story.append(f"How many {item} does {name} have now?")
    steps, value = _run_moves(start, moves)
    return _Problem(" ".join(story), steps, value)


def _digit_product(rng: random.Random, scale: _Scale) -> _Problem:
    """The retention skill: one single-digit product, bare or as packs bought (no + or - at all)."""
    a, b = rng.randint(2, scale.small), rng.randint(2, scale.small)
    if rng.random() < 0.2:  # 64 bare prompts only; the story gives the split room
        prompt = f"Calculate {a} * {b}."
    else:
        name = rng.choice(_NAMES)
        item, container = rng.choice(_GOODS)
        prompt = f"{name} buys {a} {container} of {b} {item}. How many {item} does {name} buy?"
    return _Problem(prompt, [f"{a} * {b} = {a * b}"], a * b)


_EASY_KINDS: tuple[Callable[[random.Random, _Scale], _Problem], ...] = (_digit_chain, _digit_story)


@dataclass(frozen=True)
class _SplitPlan:
    """What one split draws: its problem kinds, their scale, and its side of the prompt hash."""

    kinds: tuple[Callable[[random.Random, _Scale], _Problem], ...]
    scale: _Scale
    side: str | None  # "train" or "test": keep prompts whose hash falls on that side; None: all


_PLANS = {
    "train": _SplitPlan(_KINDS, _EASY, "train"),
    "test": _SplitPlan(_KINDS, _EASY, "test"),
    "ood": _SplitPlan(_KINDS, _HARD, None),
    "easy-train": _SplitPlan(_EASY_KINDS, _DIGITS, "train"),
    "easy-test": _SplitPlan(_EASY_KINDS, _DIGITS, "test"),
    "easy-ood": _SplitPlan(_EASY_KINDS, _DIGITS_OOD, None),  # disjoint from easy-*: more steps
    "retention-train": _SplitPlan((_digit_product,), _DIGITS, "train"),
    "retention": _SplitPlan((_digit_product,), _DIGITS, "test"),
}


def _is_test_prompt(prompt: str) -> bool:
    """Stable (not PYTHONHASHSEED-dependent) assignment of a prompt to the test side."""
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % TEST_BUCKETS == 0


def generate_examples(n: int, seed: int, split: str = "train") -> list[dict[str, str]]:
    """`n` distinct examples {prompt, response, answer}, a pure function of (n, seed, split).

    The first k examples of a call with n > k equal a call with n = k, so growing n only appends.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    # A string seed goes through sha512 in random.Random: stable across runs and platforms.
    rng = random.Random(f"dft_ds-synthetic-{seed}-{split}")
    plan = _PLANS[split]
    examples: list[dict[str, str]] = []
    seen: set[str] = set()
    for _ in range(100 * n + 100):  # bounded: a distribution that ran out of prompts must fail loudly
        if len(examples) == n:
            break
        problem = rng.choice(plan.kinds)(rng, plan.scale)
        if problem.prompt in seen:
            continue
        if plan.side is not None and _is_test_prompt(problem.prompt) != (plan.side == "test"):
            continue
        seen.add(problem.prompt)
        examples.append(problem.as_example())
    if len(examples) < n:
        raise RuntimeError(f"could only generate {len(examples)} distinct {split} examples of {n}")
    return examples


def load_split(split: str, n: int, seed: int) -> datasets.Dataset:
    """`generate_examples` as a datasets.Dataset with columns prompt, response, answer."""
    import datasets

    rows = generate_examples(n, seed, split)
    columns = {key: [row[key] for row in rows] for key in ("prompt", "response", "answer")}
    return datasets.Dataset.from_dict(columns)


def _render_chat(prompt: str, response: str | None = None) -> str:
    """CHAT_TEMPLATE's text for one user turn (and the reply), without bos and eos."""
    text = f"<|user|>\n{prompt}\n<|assistant|>\n"
    return text if response is None else f"{text}{response}"


def _tokenizer_corpus(seed: int) -> list[str]:
    """Tokenizer training text: whole chats from train, plus ood so long numbers are covered.

    Whole multi-line chats, not lines: sentencepiece then learns pieces across newlines
    ("|>\n") and words at a line start without the "▁" prefix, as they occur in training.
    """
    examples = generate_examples(3000, seed, "train") + generate_examples(1000, seed, "ood")
    texts = [_render_chat(example["prompt"], example["response"]) for example in examples]
    return ["<|system|>\nBe concise.\n" + texts[0], *texts[1:]]


def _train_sentencepiece(texts: list[str], seed: int, vocab_size: int) -> bytes:
    """Train a byte-fallback BPE sentencepiece model; returns the serialised model."""
    import sentencepiece as spm

    model = io.BytesIO()
    # sentencepiece samples with its own generator: fix it (0 would mean "seed from the clock")
    # and train on one thread so the same seed always gives the same pieces.
    spm.set_random_generator_seed(seed + 1)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,  # any text encodes, no <unk>
        split_digits=True,  # one token per digit keeps arithmetic learnable
        # identity normalisation keeps decode(encode(x)) == x and matches the HF Llama
        # backend (Metaspace pre-tokenizer, no normaliser) that the pieces are loaded into.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", pad_piece="<pad>",
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return model.getvalue()


def _bpe_merges(vocab: dict[str, int], first_mergeable: int) -> list[tuple[str, str]]:
    """BPE merges that rebuild sentencepiece's pieces, ranked like its pieces (by id).

    A sentencepiece BPE model stores pieces in merge order but not the merges themselves;
    every split of a piece into two known pieces is a merge at that piece's rank.
    """
    merges = []
    for piece, piece_id in sorted(vocab.items(), key=lambda item: item[1]):
        if piece_id < first_mergeable:
            continue
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece))]
        known = [(left, right) for left, right in splits if left in vocab and right in vocab]
        merges.extend(sorted(known, key=lambda pair: (vocab[pair[0]], vocab[pair[1]])))
    return merges


def _is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in _TOKENIZER_FILES)


def build_tokenizer(out_dir: str | os.PathLike, seed: int = 0, vocab_size: int = 512) -> str:
    """Train the synthetic tokenizer and save it as a Hugging Face directory at `out_dir`.

    Llama conventions: bos `<s>` prepended, no eos appended, `<pad>` distinct from `</s>`, and a
    chat template with plain-text role markers. An existing complete `out_dir` is returned
    untouched; otherwise the directory is built beside it and renamed into place, so readers
    never see half a tokenizer and concurrent builders do not clash.
    """
    out = Path(out_dir)
    if _is_complete(out):
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        _write_tokenizer(staging, seed, vocab_size)
        try:
            os.rename(staging, out)  # atomic; fails if another builder got there first
        except OSError:
            if not _is_complete(out):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(out)


def _write_tokenizer(directory: Path, seed: int, vocab_size: int) -> None:
    """Train sentencepiece, load its pieces into the HF Llama tokenizer, save to `directory`."""
    import sentencepiece as spm
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        # 4.x's LlamaTokenizer is the slow sentencepiece class and takes no vocab/merges.
        raise RuntimeError(f"the synthetic tokenizer needs transformers>=5, found {transformers.__version__}")
    texts = _tokenizer_corpus(seed)
    processor = spm.SentencePieceProcessor(model_proto=_train_sentencepiece(texts, seed, vocab_size))
    vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
    # Pieces below this id are <unk>/<s>/</s>/<pad> and the 256 byte-fallback pieces.
    first_mergeable = 1 + max(
        i for i in range(len(vocab)) if processor.is_byte(i) or processor.is_control(i))
    # transformers 5 has no sentencepiece-backed Llama tokenizer: LlamaTokenizer *is* the
    # `tokenizers` BPE backend (Metaspace + byte fallback). Building it from vocab and merges
    # avoids the .model -> protobuf conversion path.
    tokenizer = transformers.LlamaTokenizer(
        vocab=vocab,
        merges=_bpe_merges(vocab, first_mergeable),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=1024,
        chat_template=CHAT_TEMPLATE,
    )
    _check_same_ids(tokenizer, processor, texts[:200])
    tokenizer.save_pretrained(directory)


def _check_same_ids(
    tokenizer: transformers.PreTrainedTokenizerBase,
    processor: sentencepiece.SentencePieceProcessor,
    texts: list[str],
) -> None:
    """Fail the build if the HF tokenizer disagrees with sentencepiece (a conversion bug)."""
    for text in texts:
        expected = processor.encode(text)
        got = tokenizer(text, add_special_tokens=False)["input_ids"]
        if got != expected:
            raise RuntimeError(
                f"HF tokenizer differs from sentencepiece on {text!r}: {got} != {expected}")


def default_cache_dir() -> Path:
    """$DFT_DS_CACHE, else ~/.cache/dft_ds."""
    return Path(os.environ.get("DFT_DS_CACHE") or Path.home() / ".cache" / "dft_ds")


def ensure_assets(cache_dir: str | os.PathLike | None = None, seed: int = 0) -> str:
    """Path of the embedded default's tokenizer, built on first use (safe under races)."""
    root = (Path(cache_dir) if cache_dir is not None else default_cache_dir()).expanduser()
    return build_tokenizer(root / f"{TOKENIZER_NAME}-seed{seed}", seed=seed)


def tiny_model_config(vocab_size: int, **overrides: object) -> transformers.LlamaConfig:
    """A few-million-parameter Llama for CPU tests and the embedded default run.

    Special token ids default to the synthetic tokenizer's (unk 0, bos 1, eos 2, pad 3).
    """
    from transformers import LlamaConfig

    fields: dict[str, object] = dict(
        vocab_size=vocab_size,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=688,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)
