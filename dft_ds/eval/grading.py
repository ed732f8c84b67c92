"""Answer extraction and grading: is a model's final answer the gold answer?

    extract_answer(text) -> str | None      the last \\boxed{...} / \\fbox{...}, else "the answer is X"
                                            (a sentence X: its last $...$ or number)
    is_equivalent(pred, gold) -> bool       math-verify equivalence, else a normalised string match

Equivalence is math-verify's (parse + verify on sympy objects): 1/2 == \\frac{1}{2} == 0.5,
1,000 == 1000, x = 3 == 3, (0,1] == \\left(0,1\\right], 30^\\circ == 30, \\{1,2\\} == \\{2,1\\},
x^2+2x+1 == (x+1)^2. Percentages follow math-verify, which is lenient both ways: "50\\%" equals
"50" (the MATH convention, where the % sign is decoration) AND "0.5" (the value); "50" and "0.5"
are not equal to each other. A plain-text mixed number is one number: "4 4/9" is 4 + 4/9 = 40/9,
never 44/9, as math-verify already reads 4\\frac{4}{9} (issue 18). A sentence period after the
answer is not part of it: "5 \\text{ cm}." and "90^\\circ." grade as 5 and 90. A normalised string
comparison (spaces, \\! \\, \\left \\right \\text{} wrappers, $, a trailing period) is the last
resort, so a pair math-verify cannot parse is still graded.

Time limit. sympy can spend minutes on one expression (9^{9^{9^{9}}} vs 1), and math-verify's own
guard is signal.alarm: whole seconds, main thread only (it raises ValueError in any other
thread), its `alarm(0)` cancels any alarm the caller had set, and no handler runs while a C
extension that does not poll for signals holds the interpreter (GMP arithmetic, when sympy finds
gmpy2; CPython's own int and re code does poll). So the math-verify step runs in one long-lived
worker process per grading process, started on first use (0.5-2 s to import sympy). Inside it a
float-precision SIGALRM interrupts the comparison at `timeout_s`; if the worker is still silent at
`timeout_s + KILL_SLACK_S` it is killed and restarted on the next call. A comparison that times
out grades as the string comparison does. The worker also caps its own address space
(WORKER_MEMORY_BYTES), so a 10^{10^{10}} cannot take the node's memory with it. `timeout_s=None`
runs math-verify in this process with no limit (for trusted inputs and measurements). Grading is
thread-safe: callers share the worker under a lock.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time

logger = logging.getLogger(__name__)

KILL_SLACK_S = 1.0  # beyond timeout_s, how long a silent worker may take before it is killed
STARTUP_TIMEOUT_S = 60.0  # importing sympy + math-verify on a loaded node
WORKER_MEMORY_BYTES = 4 << 30  # RLIMIT_AS of the worker: a huge integer fails there, not the node

# ---------------------------------------------------------------- extraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# "the answer is X", "final answer is: X", "Answer: X" — X runs to the end of the line. X is a
# lookahead so that a second phrase on the same line is still found (the last one wins).
_ANSWER_RE = re.compile(r"\banswer\s*(?:is\b\s*:?|:)[ \t]*(?=(?P<x>[^\n]*))", re.IGNORECASE)
_SENTENCE_END_RE = re.compile(r"\.(?=\s|$)")  # a period that ends a sentence, not 3.5's
_MATH_DELIMS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
# In a sentence ("The largest $n$ is 34."): inline math, or a number standing as its own word,
# between spaces (or **bold**, or before , ; : ! ?): not the 2 of 2\sqrt{3}, x^2 or the pair (2, 3).
# A mixed number 4 4/9, 1,000, 3.5 and 50% are one number each.
_INLINE_MATH_RE = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]")
_NUMBER_RE = re.compile(
    r"(?<![^\s*])-?(?:\d+[ \t]+\d+/\d+|\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?(?:/\d+)?)(?:\\?%)?"
    r"(?=[\s*;:!?]|,\s|$)"
)
_WORD_RE = re.compile(r"(?<!\\)\b[A-Za-z]{2,}\b")  # an English word, not a LaTeX command's name


def extract_answer(text: str) -> str | None:
    """The final answer in a generation, as a string, or None when there is none.

    The LAST \\boxed{...} (also `\\boxed {...}`, `\\fbox{...}`, and `\\boxed 5` without braces)
    decides; braces are matched by a scan that skips escaped `\\{` `\\}`, so
    `\\boxed{\\frac{1}{2}}` gives `\\frac{1}{2}`. When there is no box, or the last one is
    unclosed or empty (a truncated generation), the last "the answer is X" / "answer: X" is used,
    with X cut at the end of its sentence and stripped of `$...$`. Never raises.
    """
    if not isinstance(text, str) or not text:
        return None
    boxes = list(_BOX_RE.finditer(text))
    if boxes:
        content = _box_content(text, boxes[-1].end())
        if content:
            return content
    return _answer_phrase(text)


def _box_content(text: str, start: int) -> str | None:
    """The argument of a box command whose name ends at `start`; None if unclosed or empty."""
    i = start
    while i < len(text) and text[i].isspace():
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":  # \boxed 5: TeX takes one token; MATH solutions run it to the next space or $
        token = re.match(r"[^\s$]*", text[i:]).group(0).rstrip(".,;")
        return token or None
    depth = 0
    j = i
    while j < len(text):
        ch = text[j]
        if ch == "\\":
            j += 2  # an escaped character (\{, \}, \\) never opens or closes the box
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip() or None
        j += 1
    return None


def _answer_phrase(text: str) -> str | None:
    matches = list(_ANSWER_RE.finditer(text))
    if not matches:
        return None
    x = matches[-1].group("x").strip().strip("*").strip()  # **bold** answers
    for left, right in _MATH_DELIMS:
        if x.startswith(left):
            end = x.find(right, len(left))
            if end > 0:
                return x[len(left) : end].strip() or None
    end = _SENTENCE_END_RE.search(x)
    if end:
        x = x[: end.start()]
    x = x.strip().rstrip(".").strip()
    return _last_math_in_sentence(x) or x or None


def _last_math_in_sentence(x: str) -> str | None:
    """The last $...$ or number of a phrase that is a sentence (two or more words outside the
    math, "The largest $n$ is 34"), else None: "10 cm", "x = 3" and "infinitely many" stay whole.
    Issue 18: "Final Answer: The largest $n$ is 34." was graded as the whole sentence."""
    if len(_WORD_RE.findall(_INLINE_MATH_RE.sub(" ", x))) < 2:
        return None
    found = [(m.start(), next(g for g in m.groups() if g)) for m in _INLINE_MATH_RE.finditer(x)]
    prose = _INLINE_MATH_RE.sub(lambda m: " " * len(m.group(0)), x)  # numbers outside math only
    found += [(m.start(), m.group(0)) for m in _NUMBER_RE.finditer(prose)]
    if not found:
        return None
    return max(found)[1].strip() or None


# ---------------------------------------------------------------- string comparison

_TEXT_WRAP_RE = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox)\s*\{([^{}]*)\}")
_SPACING_RE = re.compile(r"\\left(?![a-zA-Z])|\\right(?![a-zA-Z])|\\[!,;: ]|~|\s+")
_THIN_THOUSANDS_RE = re.compile(r"(?<=\d)\\[!,;: ]\s*(?=\d{3}(?!\d))")  # 1\,000 -> 1000
# "4 4/9": an integer, spaces, a proper fraction, each standing alone. Read as 4 + 4/9 (issue 18):
# removing the spaces made it 44/9. "4 \cdot 4/9", "4 + 4/9", "4, 4/9" and "4 9/4" are left alone.
_MIXED_NUMBER_RE = re.compile(
    r"(?<![\w\\{}^_/.,])(\d+)[ \t]+(\d+)[ \t]*/[ \t]*(\d+)(?![\w{}^_/]|\.\d)"
)
# A sentence period after the answer ("5 \text{ cm}.", "90^\circ."): math-verify then fails to parse
# the whole answer (issue 18). One period only, so an ellipsis "1, 2, \ldots" or "..." stays.
_FINAL_PERIOD_RE = re.compile(r"(?<![.\\])\.\s*$")


def _mixed_numbers(s: str) -> str:
    """`s` with each plain-text mixed number "4 4/9" written as (4+\\frac{4}{9})."""
    def whole_plus_fraction(m: re.Match) -> str:
        whole, num, den = m.groups()
        if int(num) >= int(den):  # not a proper fraction: no mixed-number reading
            return m.group(0)
        return f"({whole}+\\frac{{{num}}}{{{den}}})"

    return _MIXED_NUMBER_RE.sub(whole_plus_fraction, s)


def normalize_answer(s: str) -> str:
    """The string form used by the last-resort comparison: layout and wrappers removed."""
    s = _mixed_numbers(s.replace("\u2212", "-").replace("\\$", "").replace("$", ""))
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    previous = None
    while previous != s:  # \text{\text{a}} unwraps from the inside out
        previous, s = s, _TEXT_WRAP_RE.sub(r"\1", s)
    s = _SPACING_RE.sub("", s)
    return s.rstrip(".")


def strings_equivalent(pred: str | None, gold: str) -> bool:
    """The last-resort comparison on its own: equal after normalize_answer, and not empty."""
    if pred is None or gold is None:
        return False
    p, g = normalize_answer(pred), normalize_answer(gold)
    return bool(p) and p == g


# ---------------------------------------------------------------- equivalence


def is_equivalent(pred: str | None, gold: str, *, timeout_s: float | None = 5.0) -> bool:
    """Whether `pred` (an extracted answer) is mathematically the gold answer.

    None or blank pred -> False. True when the normalised strings match (checked first: it is
    free) or math-verify finds them equal within `timeout_s` seconds of wall time (the call
    returns within timeout_s + KILL_SLACK_S, plus the worker's one-off start). A timeout or an
    unparsable pair grades as the string comparison: False. `timeout_s=None`: math-verify in
    this process, no limit.
    """
    if timeout_s is not None and timeout_s <= 0:
        raise ValueError(f"timeout_s must be a positive number of seconds or None, got {timeout_s!r}")
    if pred is None or gold is None or not str(pred).strip() or not str(gold).strip():
        return False
    pred, gold = str(pred), str(gold)
    if strings_equivalent(pred, gold):
        return True
    if timeout_s is None:
        try:
            return math_equivalent(pred, gold)
        except Exception:  # noqa: BLE001 - grading never raises on a model's output
            return False
    verdict = _shared_worker().compare(pred, gold, soft_s=timeout_s, hard_s=timeout_s + KILL_SLACK_S)
    if verdict is None:  # the worker could not run: math-verify here, if signals can guard it
        return _math_equivalent_guarded_here(pred, gold, timeout_s)
    return verdict


def _latex_for_parse(s: str) -> str:
    """`s` as math-verify's LaTeX extractor wants it: inside \\boxed{}, outer $ removed."""
    s = s.strip()
    for left, right in _MATH_DELIMS:
        if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
            s = s[len(left) : len(s) - len(right)].strip()
            break
    s = _mixed_numbers(_FINAL_PERIOD_RE.sub("", s))  # "$5 \text{ cm}.$" -> 5 \text{ cm}
    s = s.replace("\u2212", "-").replace("\u00b0", "^{\\circ}")  # unicode minus; 30° is 30^\circ
    s = _THIN_THOUSANDS_RE.sub("", s)  # math-verify reads 1\,000 as 1*0
    return "\\boxed{" + s + "}"


def math_equivalent(pred: str, gold: str, *, signal_timeout_s: int | None = None) -> bool:
    """math-verify alone, in this process (gold first: verify is not symmetric).

    signal_timeout_s: math-verify's own SIGALRM guard (whole seconds, main thread only);
    None disables it and the caller must bound the time.
    """
    from math_verify import parse, verify

    gold_parsed = parse(_latex_for_parse(gold), parsing_timeout=signal_timeout_s)
    pred_parsed = parse(_latex_for_parse(pred), parsing_timeout=signal_timeout_s)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=signal_timeout_s))


def _math_equivalent_guarded_here(pred: str, gold: str, timeout_s: float) -> bool:
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        return False  # no guard available: the string comparison (already False) stands
    try:
        return math_equivalent(pred, gold, signal_timeout_s=max(1, round(timeout_s)))
    except Exception:  # noqa: BLE001 - grading never raises on a model's output
        return False


# ---------------------------------------------------------------- the worker process

# The worker imports this file by path, not dft_ds: no package __init__ runs, nothing heavy loads.
_BOOT = (
    "import importlib.util, sys; "
    "spec = importlib.util.spec_from_file_location('_dft_ds_grading_worker', sys.argv[1]); "
    "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod); mod._serve()"
)


class _Deadline(BaseException):
    """Raised by the worker's alarm. A BaseException, so math-verify's `except Exception` and
    `except TimeoutException` handlers do not swallow it and carry on with the next candidate."""


def _serve() -> None:
    """Worker main loop: one JSON request per stdin line, one JSON verdict per stdout line."""
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr  # a stray print in a library must not corrupt the protocol
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # we own the timeouts, not it
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY or soft > WORKER_MEMORY_BYTES:
            resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, hard))
    except (ImportError, ValueError, OSError):
        pass

    armed = [False]  # an alarm that lands after the comparison finished must not kill the loop

    def on_alarm(signum, frame):
        if armed[0]:
            raise _Deadline()

    signal.signal(signal.SIGALRM, on_alarm)
    import math_verify  # noqa: F401 - pay the import before saying ready

    out.write("ready\n")
    for line in sys.stdin:
        req = json.loads(line)
        status, ok = "ok", False
        try:
            if req["soft_s"]:
                armed[0] = True
                signal.setitimer(signal.ITIMER_REAL, req["soft_s"])
            ok = math_equivalent(req["pred"], req["gold"])
        except _Deadline:
            status = "timeout"
        except BaseException:  # noqa: BLE001 - MemoryError, RecursionError, a parser bug
            status = "error"
        finally:
            armed[0] = False
            signal.setitimer(signal.ITIMER_REAL, 0)
        out.write(json.dumps({"id": req["id"], "ok": ok, "status": status}) + "\n")


class _Worker:
    """Client side of the worker: start, ask with a deadline, kill when silent, restart lazily."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._buf = b""
        self._next_id = 0
        self._broken = False  # the worker cannot start here: stop trying
        self.pid = os.getpid()  # the process that owns it (a fork must start its own)
        self.kills = 0  # how many times a silent worker was killed (tests, logs)
        self.timeouts = 0  # comparisons that ran out of time (graded False), kills included

    def compare(self, pred: str, gold: str, *, soft_s: float | None, hard_s: float) -> bool | None:
        """math-verify's verdict; False on timeout or error; None if no worker can run here."""
        with self._lock:
            if not self._ensure_started():
                return None
            self._next_id += 1
            req = {"id": self._next_id, "pred": pred, "gold": gold, "soft_s": soft_s}
            try:
                self._proc.stdin.write((json.dumps(req) + "\n").encode())
                self._proc.stdin.flush()
                reply = self._read_reply(self._next_id, time.monotonic() + hard_s)
            except OSError:  # the worker died between calls
                reply = None
            if reply is None:  # silent past the hard deadline (stuck in C code) or dead
                self.kills += 1
                self.timeouts += 1
                logger.warning("grading: math-verify worker silent after %.1fs, restarting it", hard_s)
                self._stop()
                return False
            if reply["status"] != "ok":
                logger.debug("grading: %s comparing %r with %r", reply["status"], pred, gold)
            if reply["status"] == "timeout":
                self.timeouts += 1
            return bool(reply["ok"])

    def _ensure_started(self) -> bool:
        if self._proc is not None and self.pid == os.getpid() and self._proc.poll() is None:
            return True
        if self.pid != os.getpid():  # forked: the pipes belong to the parent's worker
            self._proc, self._buf, self.pid = None, b"", os.getpid()
        self._stop()
        if self._broken or os.name != "posix":
            return False
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _BOOT, os.path.abspath(__file__)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                start_new_session=True,  # Ctrl-C reaches the caller, not the worker mid-request
            )
            ready = self._read_line(time.monotonic() + STARTUP_TIMEOUT_S)
        except OSError:
            ready = None
        if ready != b"ready":
            logger.warning("grading: math-verify worker did not start; grading in-process instead")
            self._stop()
            self._broken = True
            return False
        return True

    def _read_reply(self, want_id: int, deadline: float) -> dict | None:
        while True:
            line = self._read_line(deadline)
            if line is None:
                return None
            reply = json.loads(line)
            if reply.get("id") == want_id:  # an older reply (caller interrupted mid-call) is dropped
                return reply

    def _read_line(self, deadline: float) -> bytes | None:
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:  # EOF: the worker died
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.strip()

    def _stop(self) -> None:
        proc, self._proc, self._buf = self._proc, None, b""
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass

    def close(self) -> None:
        with self._lock:
            if self.pid == os.getpid():
                self._stop()


_WORKER: _Worker | None = None
_WORKER_LOCK = threading.Lock()


def _shared_worker() -> _Worker:
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is None:
            _WORKER = _Worker()
            atexit.register(_WORKER.close)
        return _WORKER


def timeouts_so_far() -> int:
    """Comparisons that ran out of time in this process so far (each graded False); dft-sample
    reads it around each comparison to tell a timeout from a wrong answer."""
    return _WORKER.timeouts if _WORKER is not None else 0
