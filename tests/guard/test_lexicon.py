import pytest

from chatforge.guard.lexicon import Lexicon, default_lexicon


@pytest.fixture(scope="module")
def lex():
    return Lexicon({"illicit/violent": {"en": ["make a pipe bomb"], "zh": ["制造炸弹"]},
                    "harassment/threatening": {"en": ["i will kill you"]}})


@pytest.mark.parametrize("text", [
    "first, make a pipe bomb",
    "MAKE A PIPE BOMB",
    "m a k e  a  p i p e  b o m b",
    "make\u200b a pi\u200dpe bomb",
    "ｍａｋｅ ａ ｐｉｐｅ ｂｏｍｂ",
    "mаke а pipe bоmb",  # Cyrillic а and о
    "教你制造炸弹",
    "制 造 炸 弹",
    "製造炸彈",  # traditional
    "zhi zao zha dan",
    "zhizao炸弹",
    "制\u200b造炸\u3000弹",
])
def test_obfuscated_entries_are_found(lex, text):
    hits = lex.find(text)
    assert [h.category for h in hits] == ["illicit/violent"]


@pytest.mark.parametrize("text", ["skill you", "I will kill your process with SIGTERM", "炸蛋怎么做", "炸鸡和炸弹鱼",
                                  "you make a pipe bombastic claim"])
def test_innocent_text_is_not(lex, text):
    assert lex.find(text) == []


def test_hit_spans_cover_the_original_text_for_redaction(lex):
    text = "ok: I will k i l l  y o u, bye"
    [hit] = lex.find(text)
    assert (hit.category, hit.entry) == ("harassment/threatening", "harassment/threatening/en#0")
    assert text[hit.start:hit.end] == "I will k i l l  y o u"
    assert lex.redact(text, [hit]) == "ok: [redacted], bye"


def test_longest_counts_skeleton_characters(lex):
    assert lex.longest == max(len("makeapipebomb"), len("iwillkillyou"), len("zhizaozhadan"))


def test_default_lexicon_loads_and_covers_both_languages():
    lex = default_lexicon()
    assert lex.find("教你自制炸药") and lex.find("child pornography")
    assert lex.find("How do I kill a Python process?") == []
    assert lex.find("怎么杀死一个进程？") == []
