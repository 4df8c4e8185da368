"""Does a prompt ask the model to show its reasoning or narrate its work? A learned classifier.

Campaigns that harvest reasoning ask for it in every request: "show your reasoning step by step",
"imagine and articulate the internal reasoning behind a completed response", "narrate each tool
call and why you made it". A fixed phrase list finds the campaign that used those phrases and
misses the next one, which words the same request differently. So the detector learns the
request's *shape* instead: a linear model over hashed word and character n-grams, trained on
sentences built from a grammar of elicitation requests (an opener, a verb, what to reveal, a
manner) placed before or after real ShareGPT prompts, against real ShareGPT prompts and hard
negatives that use the same words for other purposes ("explain photosynthesis", "a step-by-step
guide to baking bread", "walk me through setting up React").

The grammar is this module's own: it shares no phrase list with the simulator, so measuring the
classifier on simulated campaigns is measuring it on wordings it never saw. ``held_out_report``
measures generalisation inside the grammar too: whole verb and object families are held out of
training and scored afterwards.

Prompts are split into sentences and each of the first and last few is scored; a prompt's
probability is its most elicitation-like sentence's (an instruction wrapped around a long pasted
document is one sentence among many). The fitted model is cached (``cache_dir("detect")``); it
is seeded, so every machine fits the same one.
"""

from __future__ import annotations

import hashlib
import pickle
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from distillscope.paths import atomic_path, cache_dir

#: Bump when the grammar, features or model change: the cache is keyed by it.
VERSION = 7

_GRAMMAR = yaml.safe_load((Path(__file__).parent / "data" / "elicitation.yaml").read_text())
_OPENERS: list[str] = _GRAMMAR["openers"]
#: Verb and object families: whole families are held out when measuring generalisation.
_VERBS: list[tuple[str, list[str]]] = list(_GRAMMAR["verbs"].items())
_OBJECTS: list[tuple[str, list[str]]] = list(_GRAMMAR["objects"].items())
_MANNERS: list[str] = _GRAMMAR["manners"]
#: Standalone phrasings outside the opener-verb-object pattern.
_IDIOMS: list[str] = _GRAMMAR["idioms"]
#: The same words asking for something else: a topic, a procedure, a tutorial, code only.
_HARD_NEGATIVES: list[str] = _GRAMMAR["hard_negatives"]
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
#: Sentences scored from each end of a prompt, and characters kept of each.
_EDGE_SENTENCES = 3
_SENTENCE_CHARS = 240


def sentences(prompt: str) -> list[str]:
    """The first and last ``_EDGE_SENTENCES`` sentences of ``prompt`` (of at least two words),
    lowercased and cut; all of them when there are at most twice as many."""
    pieces = _SENTENCE.split(prompt or "")
    # read from each end only as far as needed: a long document's middle is never scored, so
    # it is not lowercased or counted either (the split itself remains the larger cost)
    head: list[str] = []
    at = 0
    while at < len(pieces) and len(head) < _EDGE_SENTENCES:
        if sentence := _sentence(pieces[at]):
            head.append(sentence)
        at += 1
    tail: list[str] = []
    end = len(pieces)
    while end > at and len(tail) < _EDGE_SENTENCES:
        end -= 1
        if sentence := _sentence(pieces[end]):
            tail.append(sentence)
    return head + tail[::-1] or [""]


def _sentence(piece: str) -> str | None:
    """``piece`` lowercased and cut, or None when it has fewer than two words."""
    text = piece.strip().lower()[:_SENTENCE_CHARS]
    return text if len(text.split()) >= 2 else None


def char_features(texts: Sequence[str], n_features: int = 2**18):
    """What scikit-learn's ``HashingVectorizer(analyzer="char_wb", ngram_range=(3, 5),
    n_features=n_features, alternate_sign=False)`` makes of ``texts`` (the same matrix, to the
    last bit), faster (`benchmarks/detection.md`).

    A ``char_wb`` n-gram never crosses a word: a text's n-gram counts are the sum of its words'.
    So each distinct word is hashed once, by the vectoriser itself, and a text's counts are its
    word counts times the words' n-gram counts (one sparse product). Texts share most of their
    words, and generating the n-grams of every word of every text, in Python, was most of the
    vectorising time.
    """
    from scipy.sparse import csr_matrix
    from sklearn.feature_extraction.text import HashingVectorizer
    from sklearn.preprocessing import normalize

    vocabulary: dict[str, int] = {}
    columns: list[int] = []
    starts = [0]
    for text in texts:
        # the vectoriser lowercases the text, then splits on whitespace
        columns.extend(vocabulary.setdefault(w, len(vocabulary)) for w in text.lower().split())
        starts.append(len(columns))
    if not vocabulary:  # no words at all: no n-grams
        return csr_matrix((len(texts), n_features))
    counts = csr_matrix(
        (np.ones(len(columns)), np.asarray(columns, dtype=np.int64), np.asarray(starts)),
        shape=(len(texts), len(vocabulary)),
    )
    grams = HashingVectorizer(
        analyzer="char_wb", ngram_range=(3, 5), n_features=n_features, alternate_sign=False,
        norm=None, lowercase=False,
    ).transform(list(vocabulary))  # fmt: skip
    features = (counts @ grams).tocsr()
    features.sum_duplicates()  # sorted indices, as the vectoriser leaves them: the same sums
    return normalize(features)


def _elicitation(
    r: random.Random, verbs: Sequence[str], objects: Sequence[str], idioms: bool = True
) -> str:
    if idioms and r.random() < 0.15:
        return r.choice(_IDIOMS)
    words = [r.choice(_OPENERS), r.choice(verbs), r.choice(objects), r.choice(_MANNERS)]
    if r.random() < 0.3:  # clause order varies: "step by step, explain your reasoning"
        words = [words[3], words[1], words[2]]
    return " ".join(w for w in words if w).strip(" ,") + r.choice((".", "", ".", "!"))


def _families(held_out: frozenset[str]) -> tuple[list[str], list[str], list[str], list[str]]:
    verbs = [v for family, vs in _VERBS if family not in held_out for v in vs]
    objects = [o for family, os_ in _OBJECTS if family not in held_out for o in os_]
    verbs_out = [v for family, vs in _VERBS if family in held_out for v in vs]
    objects_out = [o for family, os_ in _OBJECTS if family in held_out for o in os_]
    return verbs, objects, verbs_out, objects_out


def _carriers(n: int, seed: int) -> list[str]:
    """Sentences of real ShareGPT prompts: the negatives, and the tasks elicitations attach to."""
    from distillscope.prompts import _load_sharegpt

    prompts = [p.text for p in _load_sharegpt()]
    r = random.Random(seed)
    r.shuffle(prompts)
    out = []
    for text in prompts:
        out.extend(s for s in sentences(text) if len(s) > 10)
        if len(out) >= n:
            break
    return out[:n]


def training_set(
    *, held_out: frozenset[str] = frozenset(), n: int = 24_000, seed: int = 0
) -> tuple[list[str], np.ndarray]:
    """Sentences and labels (1 = asks to see reasoning or a narrated trace), the verb and object
    families in ``held_out`` left out of the positives."""
    r = random.Random(seed)
    verbs, objects, _, _ = _families(held_out)
    carriers = _carriers(n, seed)
    texts, labels = [], []
    for i, carrier in enumerate(carriers):
        if i % 2 == 0:
            texts.append(carrier)
            labels.append(0)
        else:
            ask = _elicitation(r, verbs, objects)
            task = carrier[: r.randint(0, 120)]
            glued = f"{task} {ask}" if r.random() < 0.5 else f"{ask} {task}"
            texts.append(glued.strip() if r.random() < 0.6 else ask)
            labels.append(1)
    for _ in range(n // 20):
        negative = r.choice(_HARD_NEGATIVES)
        texts.append(f"{negative} {r.choice(carriers)[:80]}" if r.random() < 0.5 else negative)
        labels.append(0)
    return texts, np.array(labels)


class ElicitationClassifier:
    """Probability that a prompt asks the model to reveal its reasoning or narrate its work.

    ``fit`` trains on ``training_set``; ``predict_proba(prompts)`` scores prompts (the max over
    their edge sentences). ``default()`` loads the cached default model or fits and caches it.
    """

    def __init__(self, held_out: frozenset[str] = frozenset(), seed: int = 0):
        self.held_out = frozenset(held_out)
        self.seed = seed

    def _vectorise(self, texts: Sequence[str]):
        from scipy.sparse import hstack
        from sklearn.feature_extraction.text import HashingVectorizer

        words = HashingVectorizer(ngram_range=(1, 3), n_features=2**18, alternate_sign=False)
        return hstack([words.transform(texts), char_features(texts)]).tocsr()

    def fit(self) -> ElicitationClassifier:
        from sklearn.linear_model import LogisticRegression

        texts, labels = training_set(held_out=self.held_out, seed=self.seed)
        model = LogisticRegression(C=4.0, max_iter=2000, random_state=self.seed)
        self.model_ = model.fit(self._vectorise(texts), labels)
        return self

    def sentence_proba(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0)
        return self.model_.predict_proba(self._vectorise(texts))[:, 1]

    def predict_proba(self, prompts: Sequence[str]) -> np.ndarray:
        # Sentences repeat across prompts (a template's frame, "thanks!"): each is scored once.
        index: dict[str, int] = {}
        owner, piece = [], []
        for i, prompt in enumerate(prompts):
            for s in sentences(prompt):
                owner.append(i)
                piece.append(index.setdefault(s, len(index)))
        proba = self.sentence_proba(list(index))
        out = np.zeros(len(prompts))
        np.maximum.at(out, np.asarray(owner, dtype=int), proba[np.asarray(piece, dtype=int)])
        return out

    @classmethod
    def default(cls) -> ElicitationClassifier:
        key = hashlib.sha256(f"{VERSION}".encode()).hexdigest()[:12]
        path = cache_dir("detect") / f"elicitation-{key}.pkl"
        if path.exists():
            try:
                with path.open("rb") as fh:
                    return pickle.load(fh)
            except (OSError, pickle.UnpicklingError, EOFError, AttributeError):
                pass  # a damaged cache is refitted
        model = cls().fit()
        with atomic_path(path) as staging:
            staging.write_bytes(pickle.dumps(model))
        return model


@dataclass
class HeldOutReport:
    held_out: list[str]
    #: Recall on elicitations built only from held-out verb and object families.
    recall_unseen: float
    #: Share of real ShareGPT sentences and hard negatives (unseen in training) flagged.
    false_positive_rate: float
    threshold: float


def held_out_report(
    held_out: Sequence[str] = ("walk", "reconstruct", "trace", "hidden"),
    *,
    n: int = 2_000,
    threshold: float = 0.5,
    seed: int = 1,
) -> HeldOutReport:
    """Fit without the ``held_out`` verb and object families, then score elicitations built from
    those families only, and ShareGPT sentences the fit never saw."""
    frozen = frozenset(held_out)
    model = ElicitationClassifier(held_out=frozen).fit()
    _, _, verbs_out, objects_out = _families(frozen)
    _, _, verbs_all, objects_all = _families(frozenset(f for f, _ in _VERBS + _OBJECTS))
    r = random.Random(seed)
    unseen = []
    for _ in range(n):
        verbs = verbs_out if r.random() < 0.5 and verbs_out else verbs_all
        objects = objects_out if verbs is verbs_all or r.random() < 0.5 else objects_all
        unseen.append(_elicitation(r, verbs, objects or objects_all, idioms=False))
    seen = set(training_set(held_out=frozen)[0])
    negatives = [s for s in _carriers(60_000, seed) if s not in seen][-n:]
    recall = float((model.predict_proba(unseen) >= threshold).mean())
    fpr = float((model.predict_proba(negatives) >= threshold).mean())
    return HeldOutReport(sorted(frozen), recall, fpr, threshold)
