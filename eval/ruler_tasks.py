"""RULER-style synthetic long-context tasks, generated offline from a seed, and their scorers.

Six tasks in the spirit of RULER (Hsieh et al., 2024), written from scratch for this
project (own wording, own filler text, no downloads):

- ``niah_single``: one "special code" (7-digit number) for one key hidden in filler text;
- ``niah_multikey``: several keys with codes, the question asks for one of them;
- ``niah_multivalue``: one key with four codes, all asked;
- ``niah_multiquery``: four keys with one code each, all asked;
- ``vt`` (variable tracking): ``VAR A = 12345``, ``VAR B = VAR A`` ... chains in filler;
  the answer is every variable that ends up holding the asked value;
- ``cwe`` (common-words extraction): a numbered word list where ten words repeat often and
  the rest rarely; the answer is the ten frequent words.

A sample is fitted to a token budget with the model's own tokenizer: the whole prompt
(chat template and answer prefix included) plus the answer's ``max_new_tokens`` is at most
``length`` tokens, and as close to it as whole filler units allow. Every sample is a pure
function of ``(seed, task, length, index)`` and the tokenizer.

Scoring is RULER's string match: for each sample, the fraction of reference strings
found (case-insensitively) in the prediction; the task score is the mean over samples,
times 100 (``string_match_all``). ``string_match_part`` (best single reference) is what
RULER uses for QA.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

# ----------------------------------------------------------------------------- vocabulary
ADJECTIVES = (
    "quiet bright narrow ancient gentle rapid hollow golden crooked distant humble patient "
    "restless silver sturdy tender vivid wooden bitter brave careful clever curious eager "
    "faint fierce fragile honest lively lonely modest polite proud rough sharp shy steady "
    "strange sudden tidy warm wild"
).split()
NOUNS = (
    "river lantern harbor meadow engine violin ladder garden pebble window compass orchard "
    "bridge candle canyon kettle market needle ribbon saddle shelter signal statue teapot "
    "thunder tunnel valley wagon whistle feather forest glacier island jacket kitchen magnet "
    "mirror notebook painting pillow pocket puzzle rocket shovel spider stone storm tractor "
    "umbrella village basket blanket castle cottage falcon fountain hammer helmet"
).split()
VERBS = (
    "carried painted watched repaired followed crossed opened borrowed described measured "
    "visited cleaned ignored noticed dropped lifted counted sketched polished guarded "
    "admired shared traded packed"
).split()
PLACES = (
    "station library square harbor workshop bakery courtyard museum warehouse lighthouse "
    "schoolyard hallway greenhouse stable attic cellar pier plaza riverbank hillside"
).split()
TIMES = (
    "at dawn|before lunch|after the rain|on a cold morning|late in the evening|during the fair|"
    "every spring|in the afternoon|before the storm|on the last day of summer|at midnight|"
    "while the bells rang"
).split("|")
NAMES = "Ada Bruno Clara Dmitri Elena Farid Greta Hugo Irene Jonas Keiko Luis Maya Nils Olga Pavel Rosa Tomas".split()
ADVERBS = "slowly quickly carefully quietly happily patiently gladly loudly calmly eagerly".split()

SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def filler_sentence(rng: random.Random) -> str:
    """One plain, self-contained English sentence with no digits."""
    a, n, n2 = rng.choice(ADJECTIVES), rng.choice(NOUNS), rng.choice(NOUNS)
    v, p, t = rng.choice(VERBS), rng.choice(PLACES), rng.choice(TIMES)
    k = rng.randrange(6)
    if k == 0:
        return f"The {a} {n} near the {p} was {v} {t}."
    if k == 1:
        return f"{rng.choice(NAMES)} {v} a {a} {n} {t}."
    if k == 2:
        return f"Nobody expected the {n} in the {p} to look so {a}."
    if k == 3:
        return f"In the {p}, someone {v} the {n2} {rng.choice(ADVERBS)}."
    if k == 4:
        return f"{rng.choice(NAMES)} said that the {n} and the {n2} were both {a}."
    return f"Every {n} in the {p} seemed {a} {t}."


class FillerStream:
    """Deterministic, lazily extended list of filler sentences."""

    def __init__(self, seed: str):
        self._rng = random.Random(seed)
        self._items: list[str] = []

    def take(self, n: int) -> list[str]:
        while len(self._items) < n:
            self._items.append(filler_sentence(self._rng))
        return self._items[:n]


def distinct_words(rng: random.Random, count: int) -> list[str]:
    """``count`` distinct lowercase words: real words first (shuffled), then pseudo-words."""
    real = sorted(set(ADJECTIVES + NOUNS + VERBS + PLACES))
    rng.shuffle(real)
    out = real[:count]
    seen = set(out)
    while len(out) < count:
        w = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3)))) + rng.choice(("", "n", "r", "s", "l"))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def make_key(rng: random.Random, taken: set) -> str:
    while True:
        k = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if k not in taken:
            taken.add(k)
            return k


def make_code(rng: random.Random, taken: set, digits: int = 7) -> str:
    while True:
        c = str(rng.randrange(10 ** (digits - 1), 10**digits))
        if c not in taken:
            taken.add(c)
            return c


def make_var(rng: random.Random, taken: set) -> str:
    while True:
        v = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if v not in taken:
            taken.add(v)
            return v


def insert_at_depths(sentences: list[str], items: Sequence[str], depths: Sequence[float]) -> list[str]:
    """Insert ``items[i]`` at fractional depth ``depths[i]`` (0 = start, 1 = end) of ``sentences``.

    Items keep their relative order when depths are sorted (needed by variable tracking).
    """
    out = list(sentences)
    n = len(sentences)
    # insert from the deepest so earlier positions stay valid; stable for equal depths
    order = sorted(range(len(items)), key=lambda i: (depths[i], i), reverse=True)
    for i in order:
        out.insert(round(depths[i] * n), items[i])
    return out


# ----------------------------------------------------------------------------- tasks
@dataclass
class Draft:
    """A task instance before fitting: ``render(n)`` gives (input text, answer prefix)."""

    render: Callable[[int], tuple[str, str]]
    answers: list[str]
    metadata: dict = field(default_factory=dict)


NIAH_INTRO = ("A few special codes are hidden in the text below. Read it closely and remember them; "
              "you will be asked about them afterwards.")


def _needle(key: str, code: str) -> str:
    return f"One of the special codes for {key} is: {code}."


def _niah(seed: str, num_keys: int, values_per_key: int, num_queries: int) -> Draft:
    rng = random.Random(seed + "/draw")
    keys_taken: set = set()
    codes_taken: set = set()
    keys = [make_key(rng, keys_taken) for _ in range(num_keys)]
    codes = {k: [make_code(rng, codes_taken) for _ in range(values_per_key)] for k in keys}
    needles = [(k, c) for k in keys for c in codes[k]]
    rng.shuffle(needles)
    depths = [rng.random() for _ in needles]
    asked = keys[:num_queries]
    filler = FillerStream(seed + "/filler")

    if num_queries > 1:
        joined = ", ".join(asked[:-1]) + " and " + asked[-1]
        question = f"What are the special codes for {joined} in the text above?"
        prefix = f"The special codes for {joined} are:"
    elif values_per_key > 1:
        question = f"What are all the special codes for {asked[0]} in the text above?"
        prefix = f"The special codes for {asked[0]} are:"
    else:
        question = f"What is the special code for {asked[0]} in the text above?"
        prefix = f"The special code for {asked[0]} is:"

    def render(n: int) -> tuple[str, str]:
        body = " ".join(insert_at_depths(filler.take(n), [_needle(k, c) for k, c in needles], depths))
        return f"{NIAH_INTRO}\n\n{body}\n\n{question}", prefix

    answers = [c for k in asked for c in codes[k]]
    return Draft(render, answers, {"keys": keys, "asked": asked, "depths": depths})


def niah_single(seed: str) -> Draft:
    return _niah(seed, num_keys=1, values_per_key=1, num_queries=1)


def niah_multikey(seed: str) -> Draft:
    return _niah(seed, num_keys=4, values_per_key=1, num_queries=1)


def niah_multivalue(seed: str) -> Draft:
    return _niah(seed, num_keys=1, values_per_key=4, num_queries=1)


def niah_multiquery(seed: str) -> Draft:
    return _niah(seed, num_keys=4, values_per_key=1, num_queries=4)


def variable_tracking(seed: str, num_chains: int = 2, num_hops: int = 4) -> Draft:
    """Chains ``VAR X0 = value; VAR X1 = VAR X0; ...``; chain 0 is asked, the others distract."""
    rng = random.Random(seed + "/draw")
    names: set = set()
    values: set = set()
    chains = []
    for _ in range(num_chains):
        vars_ = [make_var(rng, names) for _ in range(num_hops + 1)]
        chains.append((vars_, make_code(rng, values, digits=5)))
    statements, depths = [], []
    for vars_, value in chains:
        ds = sorted(rng.random() for _ in vars_)
        statements.append(f"VAR {vars_[0]} = {value}.")
        statements.extend(f"VAR {vars_[i]} = VAR {vars_[i - 1]}." for i in range(1, len(vars_)))
        depths.extend(ds)
    filler = FillerStream(seed + "/filler")
    value = chains[0][1]
    question = (f"Which variables in the text above are assigned the value {value}, "
                "directly or through other variables? List all of them.")
    prefix = f"The variables that hold the value {value} are:"

    def render(n: int) -> tuple[str, str]:
        body = " ".join(insert_at_depths(filler.take(n), statements, depths))
        intro = "Remember the variable assignments in the text below; you will be asked to follow them."
        return f"{intro}\n\n{body}\n\n{question}", prefix

    return Draft(render, list(chains[0][0]), {"chains": [list(c[0]) + [c[1]] for c in chains]})


CWE_FREQS = ((30, 3), (20, 3), (10, 2), (6, 2), (4, 1), (3, 1), (2, 1))


def common_words(seed: str, num_common: int = 10, freqs: tuple[int, int] = (30, 3)) -> Draft:
    """Numbered list: ``num_common`` words ``freqs[0]`` times each, ``n`` others ``freqs[1]`` times."""
    f_common, f_rare = freqs
    common = distinct_words(random.Random(seed + "/common"), num_common)
    rare_pool: list[str] = []

    def rare(n: int) -> list[str]:
        if len(rare_pool) < n:  # prefix-stable growth, never reusing a common word
            words = distinct_words(random.Random(seed + "/rare"), 2 * n + num_common + 16)
            rare_pool[:] = [w for w in words if w not in common]
        return rare_pool[:n]

    question = f"Which {num_common} words appear most often in the list above?"
    prefix = f"The {num_common} most frequent words in the list are:"

    def render(n: int) -> tuple[str, str]:
        words = common * f_common + rare(n) * f_rare
        random.Random(f"{seed}/shuffle/{n}").shuffle(words)
        body = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
        intro = "Below is a numbered list of words. Some words appear many times, most appear rarely."
        return f"{intro}\n\n{body}\n\n{question}", prefix

    return Draft(render, list(common), {"freqs": [f_common, f_rare]})


@dataclass(frozen=True)
class TaskSpec:
    name: str
    build: Callable[[str], Draft]
    max_new_tokens: int
    metric: str = "string_match_all"


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("niah_single", niah_single, 32),
        TaskSpec("niah_multikey", niah_multikey, 32),
        TaskSpec("niah_multivalue", niah_multivalue, 64),
        TaskSpec("niah_multiquery", niah_multiquery, 64),
        TaskSpec("vt", variable_tracking, 48),
        TaskSpec("cwe", common_words, 96),
    )
}


# ----------------------------------------------------------------------------- prompts
def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def apply_template(tokenizer, text: str, use_chat_template: bool = True) -> tuple[str, bool]:
    """Wrap ``text`` as one user turn with the tokenizer's chat template when it has one.

    Returns ``(prompt_text, templated)``; a templated prompt already holds its special
    tokens, so it is encoded with ``add_special_tokens=False`` (see ``encode``).
    """
    if use_chat_template and has_chat_template(tokenizer):
        out = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                            add_generation_prompt=True)
        return out, True
    return text + "\n\n", False


def encode(tokenizer, prompt: str, templated: bool) -> list[int]:
    return tokenizer(prompt, add_special_tokens=not templated)["input_ids"]


@dataclass
class Sample:
    """One fitted task instance. ``prompt`` is the exact text fed to the model."""

    task: str
    length: int
    index: int
    prompt: str
    templated: bool
    answers: list[str]
    max_new_tokens: int
    num_tokens: int
    units: int
    metadata: dict = field(default_factory=dict)
    input_ids: list[int] | None = None  # set when the prompt was cut at token level (LongBench)


def fit_units(tokens_for: Callable[[int], int], budget: int, max_iter: int = 64) -> int:
    """Largest ``n >= 0`` with ``tokens_for(n) <= budget`` (``tokens_for`` nondecreasing in n).

    Interpolation search (token counts grow about linearly in n) with a bisection
    fallback, so a 128K-token prompt costs a handful of tokenizer calls.
    """
    t0 = tokens_for(0)
    if t0 > budget:
        raise ValueError(f"length: the task needs {t0} prompt tokens with no filler, budget is {budget}")
    lo, t_lo, hi = 0, t0, None
    n, t_n = 0, t0
    probe = 8
    for _ in range(max_iter):
        if hi is not None and hi - lo <= 1:
            break
        rate = (t_n - t0) / n if n > 0 and t_n > t0 else None
        if rate is None:
            guess = lo + probe if hi is None else (lo + hi) // 2
            probe *= 4
        else:
            guess = lo + int((budget - t_lo) / rate)
        if hi is not None and not lo < guess < hi:
            guess = (lo + hi) // 2
        guess = max(guess, lo + 1)
        n, t_n = guess, tokens_for(guess)
        if t_n <= budget:
            lo, t_lo = n, t_n
        else:
            hi = n
    return lo


def make_sample(task: str, length: int, index: int, tokenizer, seed: int = 0, use_chat_template: bool = True) -> Sample:
    """Generate sample ``index`` of ``task`` fitted to ``length`` tokens (prompt + answer)."""
    if task not in TASKS:
        raise ValueError(f"task: expected one of {sorted(TASKS)}, got {task!r}")
    spec = TASKS[task]
    budget = length - spec.max_new_tokens
    key = f"{seed}/{task}/{length}/{index}"
    drafts = [spec.build(key)]
    if task == "cwe":  # short budgets: fewer repetitions of the common words
        drafts = [common_words(key, freqs=f) for f in CWE_FREQS]
    last_err = None
    for draft in drafts:
        cache: dict[int, tuple[str, bool, int]] = {}

        def tokens_for(n: int) -> int:
            if n not in cache:
                text, prefix = draft.render(n)
                prompt, templated = apply_template(tokenizer, text, use_chat_template)
                prompt = prompt + prefix
                cache[n] = (prompt, templated, len(encode(tokenizer, prompt, templated)))
            return cache[n][2]

        try:
            n = fit_units(tokens_for, budget)
        except ValueError as e:
            last_err = e
            continue
        tokens_for(n)
        prompt, templated, ntok = cache[n]
        return Sample(task, length, index, prompt, templated, draft.answers, spec.max_new_tokens, ntok, n,
                      draft.metadata)
    raise ValueError(f"length={length} is too short for task {task!r}: {last_err}")


def make_samples(tasks: Sequence[str], lengths: Sequence[int], num_samples: int, tokenizer, seed: int = 0,
                 use_chat_template: bool = True) -> list[Sample]:
    return [make_sample(t, L, i, tokenizer, seed, use_chat_template)
            for L in lengths for t in tasks for i in range(num_samples)]


# ----------------------------------------------------------------------------- scoring
def postprocess(prediction: str) -> str:
    return prediction.strip()


def match_all(prediction: str, references: Sequence[str]) -> float:
    """Fraction of ``references`` that occur in ``prediction`` (case-insensitive), in [0, 1]."""
    if not references:
        raise ValueError("references: expected at least one reference string, got none")
    p = postprocess(prediction).lower()
    return sum(r.lower() in p for r in references) / len(references)


def match_part(prediction: str, references: Sequence[str]) -> float:
    """1 if any reference occurs in ``prediction`` (case-insensitive), else 0."""
    if not references:
        raise ValueError("references: expected at least one reference string, got none")
    p = postprocess(prediction).lower()
    return float(max(r.lower() in p for r in references))


def string_match_all(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """RULER's ``string_match_all``: mean over samples of ``match_all``, x100."""
    if len(predictions) != len(references):
        raise ValueError(f"predictions: expected {len(references)} (one per reference list), got {len(predictions)}")
    if not predictions:
        raise ValueError("predictions: expected at least one prediction, got none")
    return 100.0 * sum(match_all(p, r) for p, r in zip(predictions, references)) / len(predictions)


def string_match_part(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """RULER's ``string_match_part``: mean over samples of ``match_part``, x100."""
    if len(predictions) != len(references):
        raise ValueError(f"predictions: expected {len(references)} (one per reference list), got {len(predictions)}")
    if not predictions:
        raise ValueError("predictions: expected at least one prediction, got none")
    return 100.0 * sum(match_part(p, r) for p, r in zip(predictions, references)) / len(predictions)


METRICS = {"string_match_all": match_all, "string_match_part": match_part}


def count_words(text: str) -> Counter:
    """Word counts of a CWE list body (used by tests to check the answer is really the top 10)."""
    return Counter(tok for tok in text.split() if not tok.rstrip(".").isdigit())
