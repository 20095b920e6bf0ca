"""Unicode-trick detection and normalisation on the built-in dialogs (chatterbot EN + ZH).

Each clean line is perturbed once per trick kind (chatforge.guard.unicode.perturb) and once with every kind applied
in turn; a trick counts as detected when scan() finds anything, and as undone when normalize() returns the clean
line exactly. False positives: clean lines on which scan() finds anything. Reference beside it: NFKC alone (what a
plain `unicodedata.normalize` pipeline would do) — how often it restores the line, and how often it changes a clean
one (it folds CJK full-width punctuation, which chatforge keeps).

    .venv/bin/python benchmarks/guard_unicode.py
"""

from __future__ import annotations

import random
import time
import unicodedata

from chatforge.data.builtin import load_builtin
from chatforge.guard.unicode import KINDS, normalize, perturb, scan


def lines(language: str) -> list[str]:
    seen, out = set(), []
    for record in load_builtin(f"builtin:{language}"):
        for message in record["messages"]:
            text = message["content"].strip()
            if text and text not in seen:
                seen.add(text)
                out.append(text)
    return out


def main() -> None:
    rng = random.Random(0)
    print(f"{'set':<10}{'kind':<12}{'n':>6}{'detected':>10}{'restored':>10}{'NFKC restores':>15}")
    t0 = time.perf_counter()
    for language in ("english", "chinese"):
        clean = lines(language)
        fp = sum(1 for t in clean if scan(t))
        nfkc_changes = sum(1 for t in clean if unicodedata.normalize("NFKC", t) != t)
        changed = sum(1 for t in clean if normalize(t) != t)
        print(f"{language:<10}{'clean':<12}{len(clean):>6}{fp / len(clean):>10.2%}{1 - changed / len(clean):>10.2%}"
              f"{1 - nfkc_changes / len(clean):>15.2%}   (detected = false positives; restored = left unchanged)")
        for kind in (*KINDS, "all"):
            n = detected = restored = nfkc = 0
            for text in clean:
                if kind == "all":
                    bad = text
                    for k in rng.sample(KINDS, len(KINDS)):
                        bad = perturb(bad, k, rng) if k != "mojibake" else bad
                    bad = perturb(bad, "mojibake", rng) if not bad.isascii() and not text.isascii() else bad
                else:
                    bad = perturb(text, kind, rng)
                if bad == text:
                    continue  # the kind does not apply (mojibake of ASCII, homoglyphs of Chinese)
                n += 1
                detected += bool(scan(bad))
                restored += normalize(bad) == text
                nfkc += unicodedata.normalize("NFKC", bad) == text
            if n:
                print(f"{language:<10}{kind:<12}{n:>6}{detected / n:>10.2%}{restored / n:>10.2%}{nfkc / n:>15.2%}")
    print(f"total time {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
