"""Offline, seeded synthetic long-context retrieval tasks for mask training and evaluation.

Two tasks (RULER-style), both hidden in natural-looking filler text:

* ``multikey``: ``n_pairs`` needles "the code for KEY is V1 V2 V3 ." with distinct keys;
  one key is asked ("what is the code for KEY ? the code for KEY is"); the answer is its
  three value words, in order.
* ``multivalue``: one key with four needles "one of the codes for KEY is V ." spread over
  the text; asked with "what are all the codes for KEY ? the codes for KEY are", the
  answer lists the four values in document order (scored as a set).

Keys and values are made-up pronounceable ids from fixed pools (:data:`KEY_POOL`,
:data:`VALUE_POOL`); the value words of one sample are drawn without replacement.
Text is built from word pieces that are tokenized once each and concatenated, so a sample
has an exact token length and long samples are cheap to make. The model's chat template
wraps the prompt when the tokenizer has one. Nothing is downloaded; every sample is a pure
function of ``(seed, index)``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence

import torch

TASKS = ("multikey", "multivalue")
STYLES = ("natural", "compact")

_CONS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def _make_pool(n: int, seed: int, syllables: int, exclude: frozenset = frozenset()) -> tuple[str, ...]:
    rng = random.Random(seed)
    out: list[str] = []
    seen = set(exclude)
    while len(out) < n:
        w = "".join(rng.choice(_CONS) + rng.choice(_VOWELS) for _ in range(syllables))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return tuple(out)


KEY_POOL: tuple[str, ...] = _make_pool(256, seed=1, syllables=3)
VALUE_POOL: tuple[str, ...] = _make_pool(512, seed=2, syllables=3, exclude=frozenset(KEY_POOL))

_ADJ = ("quiet", "old", "small", "bright", "green", "heavy", "gentle", "narrow", "warm", "distant",
        "busy", "calm", "golden", "rough", "silver", "hidden", "wide", "cold", "early", "late")
_NOUN = ("river", "garden", "teacher", "village", "window", "farmer", "market", "bridge", "letter",
         "forest", "painter", "harbor", "lantern", "road", "student", "mountain", "kitchen", "boat",
         "library", "meadow", "train", "doctor", "castle", "field")
_VERB = ("watched", "crossed", "painted", "followed", "visited", "carried", "found", "passed",
         "remembered", "described", "cleaned", "opened", "measured", "praised", "reached", "left")
_PREP = ("near", "behind", "beyond", "across", "under", "beside", "around", "toward")
_TIME = ("in the morning", "after the rain", "at noon", "before dinner", "every spring",
         "during the festival", "late at night", "on a sunday")

# Template words (lower-case, punctuation split off) used in prompts and needles.
TEMPLATE_WORDS = (
    "the", "a", "code", "codes", "for", "is", "one", "of", "what", "are", "all", "read",
    "text", "below", "and", "remember", "answer", "with", "only", "in", "at", "after", "before",
    "every", "during", "on", "late", "morning", "rain", "noon", "dinner", "spring", "festival",
    "night", "sunday", "words", "its", "it", "three", "four", "are",
)
PUNCT = (".", ",", "?", ":")


def vocabulary() -> list[str]:
    """Every word and punctuation piece the generator can emit (for word-level tokenizers)."""
    words: list[str] = []
    for group in (TEMPLATE_WORDS, _ADJ, _NOUN, _VERB, _PREP, PUNCT, KEY_POOL, VALUE_POOL):
        for w in group:
            for piece in w.split():
                if piece not in words:
                    words.append(piece)
    return words


@dataclass
class Sample:
    """One tokenized retrieval sample.

    Attributes:
        input_ids: int64 ``[T]``: prompt followed by the answer (and EOS when the tokenizer has one).
        prompt_len: number of prompt tokens ``P``; ``input_ids[P:]`` is the answer.
        task: one of :data:`TASKS`.
        answer: the answer values (value words) in order.
        needle_positions: token offsets where the needles start (for analysis).
        answer_spans: ``[(start, end)]`` token ranges of every answer (one unless ``n_questions > 1``).
    """

    input_ids: torch.Tensor
    prompt_len: int
    task: str
    answer: list[str]
    needle_positions: list[int]
    answer_spans: list = field(default_factory=list)


class _Pieces:
    """Tokenizes text pieces once and caches their ids (pieces are encoded with a leading space)."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.cache: dict[str, list[int]] = {}

    def __call__(self, text: str) -> list[int]:
        ids = self.cache.get(text)
        if ids is None:
            ids = list(self.tok.encode(text, add_special_tokens=False))
            self.cache[text] = ids
        return ids

    def words(self, text: str) -> list[int]:
        out: list[int] = []
        for w in text.split():
            out.extend(self(" " + w))
        return out


def _chat_parts(tokenizer, pieces: _Pieces) -> tuple[list[int], list[int]]:
    """Token ids before and after the user message in the chat template ([] when none)."""
    tmpl = getattr(tokenizer, "chat_template", None)
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    if not tmpl:
        return bos, []
    marker = "XQXMARKERXQX"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                         add_generation_prompt=True)
    pre, post = text.split(marker)
    return list(tokenizer.encode(pre, add_special_tokens=False)), list(tokenizer.encode(post, add_special_tokens=False))


def _filler_sentence(rng: random.Random) -> str:
    s = (f"the {rng.choice(_ADJ)} {rng.choice(_NOUN)} {rng.choice(_VERB)} the {rng.choice(_NOUN)} "
         f"{rng.choice(_PREP)} the {rng.choice(_ADJ)} {rng.choice(_NOUN)}")
    if rng.random() < 0.4:
        s += " " + rng.choice(_TIME)
    return s + " ."


class RetrievalTask:
    """Makes :class:`Sample` objects for one tokenizer.

    Args:
        tokenizer: a transformers tokenizer (``encode``; ``apply_chat_template`` if it has a
            chat template; ``eos_token_id`` appended to answers when present).
        seed: base seed; sample ``index`` uses ``random.Random(f"{seed}:{index}")``.
        n_pairs: (min, max) needles in a ``multikey`` sample.
        use_chat_template: wrap the prompt with the tokenizer's chat template if it has one.
        style: ``"natural"`` (needle "the code for KEY is V1 V2 V3 .", question ending
            "the code for KEY is") or ``"compact"`` (needle "the code for KEY V1 V2 V3 .",
            question ending "the code for KEY": the key is directly followed by the value,
            a one-token induction that a small model trained from scratch learns quickly).
    """

    def __init__(self, tokenizer, seed: int = 0, n_pairs: tuple[int, int] = (4, 16),
                 use_chat_template: bool = True, style: str = "natural") -> None:
        if style not in STYLES:
            raise ValueError(f"style: expected one of {STYLES}, got {style!r}")
        self.style = style
        if not (1 <= n_pairs[0] <= n_pairs[1] <= len(KEY_POOL)):
            raise ValueError(f"n_pairs: expected 1 <= min <= max <= {len(KEY_POOL)}, got {n_pairs}")
        self.tok = tokenizer
        self.seed = seed
        self.n_pairs = n_pairs
        self.pieces = _Pieces(tokenizer)
        self.chat_pre, self.chat_post = (_chat_parts(tokenizer, self.pieces) if use_chat_template
                                         else (self._bos(), []))
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos = [eos] if eos is not None else []

    def _bos(self) -> list[int]:
        b = getattr(self.tok, "bos_token_id", None)
        return [b] if b is not None else []

    def sample(self, index: int, length: int, task: str, n_questions: int = 1,
               n_pairs: tuple[int, int] | None = None) -> Sample:
        """Sample ``index`` of ``task`` with ``len(input_ids) == length`` exactly.

        ``n_questions > 1`` (multikey only; used to train the tiny model) appends several
        question/answer turns about different keys; ``answer_spans`` lists them all and
        ``prompt_len``/``answer`` refer to the last one. Raises ``ValueError`` if ``length``
        is too short for the needles and questions. ``n_pairs`` overrides the task's range.
        """
        if task not in TASKS:
            raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
        if n_questions < 1 or (task == "multivalue" and n_questions != 1):
            raise ValueError(f"n_questions: expected 1 (or >= 1 for multikey), got {n_questions}")
        rng = random.Random(f"{self.seed}:{task}:{index}")
        qa: list[tuple[str, str, list[str]]] = []  # (question, answer text, answer words)
        link = " is" if self.style == "natural" else ""
        if task == "multikey":
            n = rng.randint(*(n_pairs or self.n_pairs))
            keys = rng.sample(KEY_POOL, n)
            vals = rng.sample(VALUE_POOL, 3 * n)
            needles = [f"the code for {k}{link} {' '.join(vals[3 * i:3 * i + 3])} ." for i, k in enumerate(keys)]
            for q in rng.sample(range(n), min(n_questions, n)):
                words = vals[3 * q:3 * q + 3]
                qa.append((f"what is the code for {keys[q]} ? the code for {keys[q]} is" if link
                           else f"what is the code for {keys[q]}",
                           " ".join(words), words))
        else:
            key = rng.choice(KEY_POOL)
            words = rng.sample(VALUE_POOL, 4)
            needles = [f"one of the codes for {key}{link} {v} ." for v in words]
            qa.append((f"what are all the codes for {key} ? the codes for {key} are" if link
                       else f"what are the codes for {key}",
                       " , ".join(words), words))
        intro = self.pieces.words("read the text below and remember the codes in it .")
        prompt_head = self.chat_pre + intro
        turns = [(self.pieces.words(q), self.pieces.words(a) + self.eos) for q, a, _ in qa]
        tail_len = sum(len(q) + len(self.chat_post) + len(a) for q, a in turns)
        needle_ids = [self.pieces.words(n) for n in needles]
        budget = length - len(prompt_head) - tail_len - sum(len(x) for x in needle_ids)
        if budget < 0:
            raise ValueError(f"length: expected at least {length - budget} tokens for this {task} sample, got {length}")
        filler: list[list[int]] = []
        used = 0
        while used < budget:
            ids = self.pieces.words(_filler_sentence(rng))
            filler.append(ids)
            used += len(ids)
        if filler:  # cut the last sentence so the context has exactly `budget` tokens
            filler[-1] = filler[-1][: len(filler[-1]) - (used - budget)]
        # needles at random sentence boundaries (document order = answer order for multivalue)
        slots = sorted(rng.randint(0, len(filler)) for _ in needle_ids)
        ids = list(prompt_head)
        positions: list[int] = []
        ni = 0
        for si in range(len(filler) + 1):
            while ni < len(needle_ids) and slots[ni] == si:
                positions.append(len(ids))
                ids.extend(needle_ids[ni])
                ni += 1
            if si < len(filler):
                ids.extend(filler[si])
        spans = []
        for q_ids, a_ids in turns:
            ids.extend(q_ids + self.chat_post)
            spans.append((len(ids), len(ids) + len(a_ids)))
            ids.extend(a_ids)
        assert len(ids) == length, (len(ids), length)
        return Sample(torch.tensor(ids, dtype=torch.long), spans[-1][0], task, list(qa[-1][2]), positions, spans)


def sample_lengths(rng: random.Random, n: int, min_len: int, max_len: int) -> list[int]:
    """``n`` lengths uniform in ``[min_len, max_len]``."""
    return [rng.randint(min_len, max_len) for _ in range(n)]


def batch_for_step(task: RetrievalTask, step: int, batch_size: int, min_len: int, max_len: int,
                   tasks: Sequence[str], indices: Sequence[int] | None = None) -> list[Sample]:
    """The samples of training step ``step`` (a pure function of the arguments).

    Sample ``j`` of the step has length drawn from ``[min_len, max_len]`` and task
    ``tasks[(step * batch_size + j) % len(tasks)]``. ``indices`` selects a subset of
    ``range(batch_size)`` (one rank's share under FSDP).
    """
    out = []
    for j in (range(batch_size) if indices is None else indices):
        g = step * batch_size + j
        rng = random.Random(f"len:{task.seed}:{g}")
        length = rng.randint(min_len, max_len)
        out.append(task.sample(g, length, tasks[g % len(tasks)]))
    return out


def decode_words(tokenizer, ids: Sequence[int]) -> list[str]:
    """Generated ids → list of words (punctuation and special tokens dropped)."""
    text = tokenizer.decode(list(ids), skip_special_tokens=True)
    return [w for w in text.replace(",", " ").replace(".", " ").split() if w]


def score(task: str, answer: Sequence[str], predicted_words: Sequence[str]) -> bool:
    """Exact match: ``multikey`` needs the three words in order, ``multivalue`` the four as a set."""
    if task == "multikey":
        return list(predicted_words[: len(answer)]) == list(answer)
    return sorted(predicted_words[: len(answer)]) == sorted(answer)
