# SPDX-License-Identifier: Apache-2.0
"""RULER-style synthetic long-context tasks, generated locally and deterministically.

After RULER (Hsieh et al., arXiv 2404.06654): a haystack (noise filler or random words) with facts hidden in it, and
a question asked *completion-style* so that a small instruction model answers reliably::

    <instruction>\\n<haystack with needles>\\n\\nQuestion: What is the special magic number for X?\\n
    Answer: The special magic number for X is

Each sample is split into ``context`` (everything before ``"\\n\\nQuestion:"``, the part a KV cache holds and a
compressor compresses) and ``query`` (the question and the answer prefix, appended afterwards). Tasks:

``niah_single``      one needle ``"One of the special magic numbers for K is: V."``; asked for V.
``niah_multikey``    four needles with different keys (three distractors); asked for one key's value
                     (:func:`multikey_questions`: one such question per key, four readers of one context).
``niah_multivalue``  three needles with the same key; asked for all values.
``niah_multiquery``  four needles with different keys; asked for the values of two of them at once (RULER asks for
                     all four; two keeps the task within reach of a 135M model, ``niah_queries`` changes it).
``vt``               variable tracking: a chain ``VAR A = 12345``, ``VAR B = VAR A``, ...; asked for every variable
                     that holds the value.
``cwe``              common-word extraction: a numbered word list in which a few words recur often; asked for them.
``fwe``              frequent-word extraction: "coded" words (random 6-letter strings) drawn from a Zipf law
                     (``alpha = 2``), rank 0 being the noise word ``"...."``; asked for ranks 1-3.

Lengths are in tokens of the caller's tokenizer (``count_tokens``); without one a rough word-based estimate is used.
Everything derives from ``random.Random`` seeded by ``(seed, task, index, length)``: the same arguments give the same
sample on every machine.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)

__all__ = [
    "NOISE",
    "TASKS",
    "RulerSample",
    "approx_token_count",
    "generate",
    "generate_suite",
    "multikey_questions",
]

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
"""RULER's noise filler, repeated to fill the haystack."""

_WORDS = """
apple river stone cloud garden window candle forest silver orange mountain pencil rabbit castle engine marble
ocean lantern meadow violin harbor thunder compass basket mirror feather island blanket dragon cottage tiger
planet bottle wagon anchor crystal falcon jacket ladder magnet needle pepper rocket saddle tunnel velvet walnut
yellow zebra almond bamboo canyon dolphin ember fossil glacier hammer igloo jungle kettle lemon maple nectar
olive parrot quartz raven sapphire tulip umbrella valley willow canvas beacon cedar desert elbow fabric goblet
hazel ivory jasmine kernel lotus meteor nickel oyster pebble quiver ribbon summit timber urchin vessel whistle
badger cobalt dagger emerald fiddle gravel hollow indigo jigsaw kitten lilac mosaic nutmeg onion puzzle quill
radish sparrow teapot unicorn vortex wizard yogurt acorn blossom cactus daisy eagle fern ginger honey iris
juniper koala llama mango nebula otter panda quokka robin salmon tomato vanilla walrus basil cherry donkey
falcon giraffe hornet insect jelly kiwi lobster melon narwhal octopus penguin rhubarb spinach turtle vulture
wombat arrow bridge circle diamond engineer fountain guitar helmet journal keyboard library monument notebook
orchard painter quarry rainbow sculptor theater uniform village waterfall author butter captain doctor
farmer gardener hunter inventor jester knight lawyer miner nurse officer pilot queen ranger sailor teacher
tailor violet winter autumn summer spring morning evening midnight breeze frost storm shadow sunlight moonlight
copper bronze granite coral pearl amber jade onyx topaz ruby garnet opal cotton linen silk wool leather paper
""".split()
WORDS: Tuple[str, ...] = tuple(dict.fromkeys(_WORDS))
"""A fixed list of common English words (keys, random-word haystacks, common-word lists)."""

INSTRUCTIONS: Dict[str, str] = {
    "niah": "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
    "I will quiz you about the numbers afterwards.",
    "vt": "Memorize and track the chain(s) of variable assignment hidden in the following text.",
    "cwe": "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.",
    "fwe": "Read the following coded text and track the frequency of each coded word. Find the three most "
    "frequently appeared coded words.",
}

TASKS: Tuple[str, ...] = (
    "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe"
)

CountFn = Callable[[str], int]


def approx_token_count(text: str) -> int:
    """Rough token count (about 1.3 tokens per whitespace-separated word) for use without a tokenizer."""
    return int(round(1.3 * len(text.split()))) + 1


@dataclass(frozen=True)
class RulerSample:
    """One generated task instance.

    Attributes
    ----------
    task : str
        One of :data:`TASKS`.
    context : str
        Instruction and haystack: the cached (compressible) part of the prompt.
    query : str
        ``"\\n\\nQuestion: ...\\nAnswer: ..."``: appended after ``context``; ends where the model's answer begins.
    answers : tuple of str
        Strings the answer must contain (all of them for an exact match).
    seed, index, target_tokens : int
        What the sample was generated from.
    num_tokens : int
        Length of ``prompt`` by the ``count_tokens`` used at generation time.
    meta : dict
        Task details (needle depths in ``[0, 1]``, distractors, ...).
    """

    task: str
    context: str
    query: str
    answers: Tuple[str, ...]
    seed: int
    index: int
    target_tokens: int
    num_tokens: int
    meta: Dict[str, object] = field(default_factory=dict, compare=False)

    @property
    def prompt(self) -> str:
        """The full completion-style prompt: ``context + query``."""
        return self.context + self.query

    @property
    def answer(self) -> str:
        """The expected answer as one string (answers joined by ``", "``)."""
        return ", ".join(self.answers)

    def score(self, output: str) -> float:
        """Fraction of :attr:`answers` found in ``output`` (RULER's ``string_match_all``)."""
        low = output.lower()
        return sum(a.lower() in low for a in self.answers) / len(self.answers)

    def exact_match(self, output: str) -> bool:
        """Every expected answer appears in ``output``."""
        return self.score(output) == 1.0


# --- pieces ----------------------------------------------------------------------------------------------------------
def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def _key(rng: random.Random, avoid: Sequence[str] = ()) -> str:
    while True:
        k = f"{rng.choice(WORDS)}-{rng.choice(WORDS)}"
        if k not in avoid and k.split("-")[0] != k.split("-")[1]:
            return k


def _var_name(rng: random.Random, avoid: Sequence[str]) -> str:
    while True:
        v = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if v not in avoid:
            return v


def _filler(rng: random.Random, haystack: str, n: int) -> List[str]:
    """``n`` filler sentences."""
    if haystack == "noise":
        sentences = NOISE.split(". ")
        sentences = [s if s.endswith(".") else s + "." for s in sentences]
        return [sentences[i % len(sentences)] for i in range(n)]
    if haystack == "words":
        out = []
        for _ in range(n):
            words = [rng.choice(WORDS) for _ in range(rng.randint(6, 12))]
            out.append(" ".join(words).capitalize() + ".")
        return out
    raise ValueError(f"haystack: expected 'noise' or 'words', got {haystack!r}")


def _insert(filler: List[str], items: Sequence[str], depths: Sequence[float]) -> List[str]:
    """Insert ``items`` into the sentence list at relative ``depths`` (in ``[0, 1]``)."""
    out = list(filler)
    pos = [int(round(d * len(filler))) for d in depths]
    for p, it in sorted(zip(pos, items), key=lambda x: -x[0]):  # from the back, so earlier positions stay valid
        out.insert(p, it)
    return out


def _fit(build: Callable[[int], Tuple[str, str]], target: int, count: CountFn, unit_guess: float) -> Tuple[int, int]:
    """Largest ``n`` (filler units) whose prompt has ``<= target`` tokens, by bisection; returns ``(n, tokens)``."""

    def size(n: int) -> int:
        return count("".join(build(n)))

    base = size(0)
    if base > target:
        raise ValueError(f"target_tokens: expected >= {base} (the prompt without filler), got {target}")
    lo, lo_tokens = 0, base  # lo always fits
    hi = max(1, int((target - base) / unit_guess * 1.25) + 1)
    while True:  # grow until hi does not fit
        t = size(hi)
        if t > target:
            break
        lo, lo_tokens, hi = hi, t, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        t = size(mid)
        if t <= target:
            lo, lo_tokens = mid, t
        else:
            hi = mid
    return lo, lo_tokens


# --- tasks -----------------------------------------------------------------------------------------------------------
def _query(question: str, prefix: str) -> str:
    """``"\\n\\nQuestion: <question>\\nAnswer: <prefix>"``: the part appended after the context."""
    return f"\n\nQuestion: {question}\nAnswer: {prefix}"


def _single_key_query(key: str) -> str:
    """The query of ``niah_single`` and ``niah_multikey``: asks for the one value of ``key``."""
    return _query(f"What is the special magic number for {key} mentioned in the provided text?",
                  f"The special magic number for {key} mentioned in the provided text is")


def _niah(
    rng: random.Random,
    task: str,
    target: int,
    count: CountFn,
    haystack: str,
    depth_range: Tuple[float, float],
    digits: int,
    queries: int = 2,
) -> Tuple[str, str, Tuple[str, ...], int, Dict[str, object]]:
    key = _key(rng)
    asked_keys = [key]
    if task == "niah_single":
        keys, values = [key], [_number(rng, digits)]
        asked = (values[0],)
    elif task == "niah_multikey":
        keys = [key]
        while len(keys) < 4:
            keys.append(_key(rng, avoid=keys))
        values = [_number(rng, digits) for _ in keys]
        asked = (values[0],)
    elif task == "niah_multiquery":
        keys = [key]
        while len(keys) < 4:
            keys.append(_key(rng, avoid=keys))
        values = []
        while len(values) < 4:
            v = _number(rng, digits)
            if v not in values:
                values.append(v)
        asked_keys = keys[:queries]
        asked = tuple(values[:queries])
    else:  # niah_multivalue
        keys = [key] * 3
        values = []
        while len(values) < 3:
            v = _number(rng, digits)
            if v not in values:
                values.append(v)
        asked = tuple(values)
    needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)]
    order = list(range(len(needles)))
    rng.shuffle(order)
    needles = [needles[i] for i in order]
    depths = sorted(rng.uniform(*depth_range) for _ in needles)
    if task == "niah_multivalue":
        query = _query(f"What are all the special magic numbers for {key} mentioned in the provided text?",
                       f"The special magic numbers for {key} mentioned in the provided text are")
    elif task == "niah_multiquery":
        names = ", ".join(asked_keys[:-1]) + f" and {asked_keys[-1]}"
        query = _query(f"What are all the special magic numbers for {names} mentioned in the provided text?",
                       f"The special magic numbers for {names} mentioned in the provided text are")
    else:
        query = _single_key_query(key)
    filler_seed = rng.random()

    def build(n: int) -> Tuple[str, str]:
        fill = _filler(random.Random(filler_seed), haystack, n)
        body = " ".join(_insert(fill, needles, depths))
        return f"{INSTRUCTIONS['niah']}\n{body}", query

    n, tokens = _fit(build, target, count, unit_guess=7.0 if haystack == "noise" else 12.0)
    context, _ = build(n)
    meta = {"keys": keys, "values": values, "asked_keys": asked_keys, "depths": depths, "needle_order": order,
            "filler_units": n}
    return context, query, asked, tokens, meta


def _vt(
    rng: random.Random,
    target: int,
    count: CountFn,
    haystack: str,
    depth_range: Tuple[float, float],
    hops: int,
    digits: int,
) -> Tuple[str, str, Tuple[str, ...], int, Dict[str, object]]:
    value = _number(rng, digits)
    names: List[str] = []
    for _ in range(hops + 1):
        names.append(_var_name(rng, names))
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, len(names))]
    depths = sorted(rng.uniform(*depth_range) for _ in chain)
    question = f"Find all variables that are assigned the value {value} in the text above."
    prefix = (
        f"According to the chain(s) of variable assignment in the text above, {len(names)} variables are assigned "
        f"the value {value}, they are:"
    )
    query = f"\n\nQuestion: {question}\nAnswer: {prefix}"
    filler_seed = rng.random()

    def build(n: int) -> Tuple[str, str]:
        fill = _filler(random.Random(filler_seed), haystack, n)
        return f"{INSTRUCTIONS['vt']}\n" + " ".join(_insert(fill, chain, depths)), query

    n, tokens = _fit(build, target, count, unit_guess=7.0 if haystack == "noise" else 12.0)
    context, _ = build(n)
    return context, query, tuple(names), tokens, {"value": value, "chain": names, "depths": depths, "filler_units": n}


def _cwe(
    rng: random.Random, target: int, count: CountFn, num_common: int, freq_common: int, freq_rare: int
) -> Tuple[str, str, Tuple[str, ...], int, Dict[str, object]]:
    words = list(WORDS)
    rng.shuffle(words)
    common, rare_pool = words[:num_common], words[num_common:]
    question = f"What are the {num_common} most common words in the above list?"
    prefix = f"The top {num_common} words that appear most often in the list are:"
    query = f"\n\nQuestion: {question}\nAnswer: {prefix}"
    order_seed = rng.random()

    def build(n: int) -> Tuple[str, str]:
        # n rare words (freq_rare times each, cycling through the pool) and the common words freq_common times each
        lst = common * freq_common + [rare_pool[i % len(rare_pool)] for i in range(n)] * freq_rare
        random.Random(order_seed).shuffle(lst)
        body = " ".join(f"{i + 1}. {w}" for i, w in enumerate(lst))
        return f"{INSTRUCTIONS['cwe']}\n{body}", query

    n, tokens = _fit(build, target, count, unit_guess=4.0 * freq_rare)
    if n > len(rare_pool):
        logger.debug("cwe: %d rare slots over a pool of %d words; rare words repeat", n, len(rare_pool))
    context, _ = build(n)
    return context, query, tuple(common), tokens, {"common": common, "freq_common": freq_common, "rare_units": n}


ZETA_2 = math.pi**2 / 6
"""Riemann zeta(2): the normaliser of the Zipf law with ``alpha = 2``."""


def _fwe(
    rng: random.Random, target: int, count: CountFn, vocab_size: int, word_len: int
) -> Tuple[str, str, Tuple[str, ...], int, Dict[str, object]]:
    """Frequent-word extraction after RULER's ``freq_words_extraction.py`` (``alpha = 2``, rank 0 is noise)."""
    vocab: List[str] = ["...."]
    seen = set(vocab)
    while len(vocab) < vocab_size:
        w = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(word_len))
        if w not in seen:
            seen.add(w)
            vocab.append(w)
    question = "Do not provide any explanation. Please ignore the dots '....'. What are the three most frequently " \
        "appeared words in the above coded text?"
    prefix = "According to the coded text above, the three most frequently appeared words are:"
    query = f"\n\nQuestion: {question}\nAnswer: {prefix}"
    order_seed = rng.random()

    def counts(n: int) -> List[int]:
        return [int(n * (k + 1) ** -2.0 / ZETA_2) for k in range(vocab_size)]

    def build(n: int) -> Tuple[str, str]:
        lst = [w for w, c in zip(vocab, counts(n)) for _ in range(c)]
        random.Random(order_seed).shuffle(lst)
        return f"{INSTRUCTIONS['fwe']}\n" + " ".join(lst), query

    n, tokens = _fit(build, target, count, unit_guess=3.0)
    cnt = counts(n)
    if not cnt[1] > cnt[2] > cnt[3] > cnt[4]:
        raise ValueError(
            f"target_tokens: expected a length whose word counts rank the top three strictly (fwe), got {target} "
            f"(counts {cnt[1:5]})"
        )
    context, _ = build(n)
    return context, query, tuple(vocab[1:4]), tokens, {"top": vocab[:5], "counts": cnt[:5], "words": n}


def generate(
    task: str,
    *,
    target_tokens: int = 2048,
    seed: int = 0,
    index: int = 0,
    count_tokens: Optional[CountFn] = None,
    haystack: str = "noise",
    depth_range: Tuple[float, float] = (0.05, 0.8),
    digits: int = 7,
    vt_hops: int = 4,
    cwe_num_common: int = 5,
    cwe_freq_common: int = 20,
    cwe_freq_rare: int = 2,
    niah_queries: int = 2,
    fwe_vocab: int = 200,
    fwe_word_len: int = 6,
) -> RulerSample:
    """One RULER-style sample.

    Parameters
    ----------
    task : str
        One of :data:`TASKS`.
    target_tokens : int
        Upper bound on the prompt length (context + query) in tokens of ``count_tokens``; the haystack is filled as
        far as it fits.
    seed, index : int
        Sample ``index`` of the suite drawn with ``seed``.
    count_tokens : callable, optional
        ``str -> int`` (e.g. ``lambda s: len(tok(s).input_ids)``); default :func:`approx_token_count`.
    haystack : str
        ``"noise"`` (RULER's repeated sentences) or ``"words"`` (random-word sentences); needle and vt tasks only.
    depth_range : tuple of float
        Needles are placed at uniform relative depths in this range of the haystack (``(0.05, 0.8)`` by default, so
        that they are not in the last 20% of the context, which a recent window would keep dense).
    digits : int
        Digits of the magic numbers / tracked value.
    vt_hops : int
        Assignments after the first in the variable-tracking chain.
    cwe_num_common, cwe_freq_common, cwe_freq_rare : int
        Common-word extraction: how many common words, and how often each common / rare word appears.
    niah_queries : int
        ``niah_multiquery``: how many of the four keys are asked for at once (1 to 4).
    fwe_vocab, fwe_word_len : int
        Frequent-word extraction: number of distinct coded words (noise word included) and their length.
    """
    if task not in TASKS:
        raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
    lo, hi = depth_range
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"depth_range: expected 0 <= lo <= hi <= 1, got {depth_range!r}")
    if not 1 <= niah_queries <= 4:
        raise ValueError(f"niah_queries: expected 1 to 4, got {niah_queries!r}")
    if fwe_vocab < 5 or fwe_word_len < 3:
        raise ValueError(f"fwe_vocab, fwe_word_len: expected >= 5 and >= 3, got {fwe_vocab!r}, {fwe_word_len!r}")
    count = count_tokens or approx_token_count
    rng = random.Random(f"ruler:{seed}:{task}:{index}:{target_tokens}")
    if task.startswith("niah"):
        context, query, answers, tokens, meta = _niah(
            rng, task, target_tokens, count, haystack, depth_range, digits, niah_queries
        )
    elif task == "vt":
        context, query, answers, tokens, meta = _vt(rng, target_tokens, count, haystack, depth_range, vt_hops, digits)
    elif task == "cwe":
        context, query, answers, tokens, meta = _cwe(
            rng, target_tokens, count, cwe_num_common, cwe_freq_common, cwe_freq_rare
        )
    else:
        context, query, answers, tokens, meta = _fwe(rng, target_tokens, count, fwe_vocab, fwe_word_len)
    return RulerSample(task, context, query, answers, seed, index, target_tokens, tokens, meta)


def generate_suite(
    tasks: Sequence[str] = TASKS,
    *,
    num_samples: int = 4,
    target_tokens: int = 2048,
    seed: int = 0,
    count_tokens: Optional[CountFn] = None,
    **kwargs: object,
) -> List[RulerSample]:
    """``num_samples`` samples of every task, in task order (see :func:`generate` for the keyword arguments)."""
    return [
        generate(t, target_tokens=target_tokens, seed=seed, index=i, count_tokens=count_tokens, **kwargs)  # type: ignore[arg-type]
        for t in tasks
        for i in range(num_samples)
    ]


def multikey_questions(sample: RulerSample) -> List[Tuple[str, Tuple[str, ...]]]:
    """One ``(query, answers)`` per key of a ``niah_multikey`` sample, in the order of ``meta["keys"]``.

    Every query is built as the sample's own (which asks for ``keys[0]``, so the first pair is ``(sample.query,
    sample.answers)``) but for its key; its answers are that key's value. Appended to ``sample.context`` they make
    four questions about one shared context.
    """
    if sample.task != "niah_multikey":
        raise ValueError(f"sample.task: expected 'niah_multikey', got {sample.task!r}")
    keys, values = sample.meta.get("keys"), sample.meta.get("values")
    if not isinstance(keys, list) or not isinstance(values, list) or len(keys) != len(values) or not keys:
        raise ValueError(f"sample.meta: expected equally long 'keys' and 'values' lists, got {sample.meta!r}")
    return [(_single_key_query(str(k)), (str(v),)) for k, v in zip(keys, values)]
