import random

import pytest

from chatforge.guard.unicode import KINDS, normalize, perturb, scan

LEGIT = [
    "Hello, how are you?",
    "你好，世界！（测试）「引号」　全角空格。",
    "café naïve — “quoted”",
    "👨\u200d👩\u200d👧 family 🏳️\u200d🌈 flag 🏴\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f",
    "می\u200cخواهم بروم",  # Persian ZWNJ
    "क्\u200dष and ന്\u200d",  # Indic ZWJ
    "1️⃣ keycap, m² and ℹ️, 👍🏽",
    "Привет, как дела?",
    "I said привет to him",
    "שלום \u200fעולם",  # RLM inside Hebrew
]


@pytest.mark.parametrize("text", LEGIT)
def test_legitimate_text_is_left_alone(text):
    assert scan(text) == []
    assert normalize(text) == text


@pytest.mark.parametrize("bad, kind, clean", [
    ("pay\u200bpal", "zero_width", "paypal"),
    ("access = \u202e}⁦if (isAdmin)⁩ ⁦ { begin admins only", "bidi", None),
    ("hi\U000e0069\U000e0067", "tag", "hi"),
    ("раураl login", "confusable", "paypal login"),
    ("ｋｉｌｌ all", "fullwidth", "kill all"),
    ("𝐡𝐞𝐥𝐥𝐨", "fullwidth", "hello"),
    ("cafÃ© au lait", "mojibake", "café au lait"),
    ("你好，世界".encode("utf-8").decode("latin-1"), "mojibake", "你好，世界"),
])
def test_each_trick_is_found_and_undone(bad, kind, clean):
    assert kind in {f.kind for f in scan(bad)}
    if clean is not None:
        assert normalize(bad) == clean


def test_finding_names_the_character():
    [finding] = scan("a\u200bb")
    assert (finding.kind, finding.index, finding.detail) == ("zero_width", 1, "U+200B ZERO WIDTH SPACE")


@pytest.mark.parametrize("kind", KINDS)
def test_perturb_is_undone_exactly(kind):
    rng = random.Random(1)
    texts = ["What is your favourite book?", "I like the café near the station", "我喜欢读书，你呢？"]
    for text in texts:
        bad = perturb(text, kind, rng)
        if bad != text:
            assert scan(bad), (kind, bad)
            assert normalize(bad) == text, (kind, bad)


def test_perturb_rejects_unknown_kind():
    with pytest.raises(ValueError, match="perturb: unknown kind 'typo'"):
        perturb("x", "typo", random.Random(0))
