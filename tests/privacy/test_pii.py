"""PII recognizers: what each finds, exact spans and types; look-alikes that fail a check are left alone; the
scrubber's placeholders and pseudonyms; the streaming redactor equals whole-text redaction at every chunking."""

import socket

import pytest

from chatforge.errors import ChatforgeError
from chatforge.privacy.pii import (
    TYPES, Redactor, Scrubber, card_ok, cn_id_ok, find_entities, iban_ok, phone_e164, scrub_text,
)

pytestmark = pytest.mark.usefixtures("no_network")  # nothing here may open a connection

ENTITIES = [
    ("EMAIL", "Write to john.smith@example.org today.", "john.smith@example.org"),
    ("EMAIL", "邮箱zhangwei@163.com，谢谢", "zhangwei@163.com"),
    ("PHONE", "电话13812345678，请回电", "13812345678"),
    ("PHONE", "或者+86 138 1234 5678。", "+86 138 1234 5678"),
    ("PHONE", "北京办公室010-12345678", "010-12345678"),
    ("PHONE", "深圳 0755-8888 1234 转", "0755-8888 1234"),
    ("PHONE", "Call (415) 555-0123 now", "(415) 555-0123"),
    ("PHONE", "Call 415.555.0123 now", "415.555.0123"),
    ("PHONE", "Mobile +1-641-985-8398x868, thanks", "+1-641-985-8398x868"),
    ("PHONE", "London +44 20 7946 0958.", "+44 20 7946 0958"),
    ("PHONE", "Tokyo 0081 3-1234-5678.", "0081 3-1234-5678"),
    ("CN_ID", "身份证号：11010519491231002X", "11010519491231002X"),
    ("CARD", "card 4111 1111 1111 1111, exp 12/27", "4111 1111 1111 1111"),
    ("CARD", "amex 378282246310005", "378282246310005"),
    ("CARD", "银联卡6222021234567890128", "6222021234567890128"),
    ("IBAN", "IBAN DE89 3704 0044 0532 0130 00 please", "DE89 3704 0044 0532 0130 00"),
    ("IBAN", "to GB82WEST12345698765432.", "GB82WEST12345698765432"),
    ("IP", "from 192.168.1.10:8080 blocked", "192.168.1.10"),
    ("IP", "host fe80::1 and more", "fe80::1"),
    ("IP", "服务器2001:db8::ff00:42:8329无法访问", "2001:db8::ff00:42:8329"),
]

LOOKALIKES = [
    "order 20231012153000123 shipped",  # a timestamp-like order number
    "订单号：202310121530001234",
    "at 2023-10-12 14:30:00 and 2023-10-12T14:30:00Z",
    "unix 1697121000 or 1697121000123 ms",
    "stamp 2023101214 in the log",  # YYYYMMDDHH, also a valid North American number as digits
    "version v1.2.3.4, 3.11.0 and 10.0.19041.1 and 1.2.3.4-beta",
    "ID 110105194912310021 has a bad check digit",
    "card 4111 1111 1111 1112 fails Luhn",
    "IBAN DE88 3704 0044 0532 0130 00 fails mod-97",
    "999.1.2.3 and 1.2.3 are not addresses",
    "MAC 00:1A:2B:3C:4D:5E at 14:30:00",
    "ref 9016-1829-92, tracking 1Z999AA10123456784, ISBN 978-3-16-148410-0",
    "(123) 456-7890 has no such area code; +86 123 4567 8901 no such prefix",
    "C++ std::vector and a ratio of 3:2",
]


@pytest.mark.parametrize("kind,text,value", ENTITIES)
def test_each_recognizer_finds_its_entity_exactly(kind, text, value):
    found = find_entities(text)
    assert [(e.type, e.text) for e in found] == [(kind, value)]
    assert text[found[0].start: found[0].end] == value


@pytest.mark.parametrize("text", LOOKALIKES)
def test_lookalikes_are_never_flagged(text):
    assert find_entities(text) == []


def _with_check(body: str) -> str:
    weights = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
    return body + "10X98765432"[sum(int(c) * w for c, w in zip(body, weights)) % 11]


def test_validators():
    assert cn_id_ok(_with_check("11010519491231002"))
    assert cn_id_ok("11010519491231002X") and cn_id_ok("11010519491231002x")
    assert not cn_id_ok("110105194912310021")  # check digit
    assert not cn_id_ok(_with_check("11010519490230002"))  # no 30 February
    assert not cn_id_ok(_with_check("99110519491231002"))  # no province 99
    assert not cn_id_ok(_with_check("11010521491231002"))  # born in the future
    assert card_ok("4111111111111111") and not card_ok("4111111111111112")
    assert not card_ok("9111111111111111")  # Luhn-valid, no issuer starts with 9
    assert not card_ok("4111 1111-1111 1111")  # mixed separators
    assert iban_ok("GB82WEST12345698765432") and not iban_ok("GB82WEST1234569876543")  # length of GB is 22
    assert phone_e164("+86 138 1234 5678") == phone_e164("13812345678") == "+8613812345678"
    assert phone_e164("(415) 555-0123") == "+14155550123"
    assert phone_e164("12345678901") is None


def test_overlap_goes_to_the_longer_entity():
    assert [(e.type, e.text) for e in find_entities("mail 13812345678@qq.com")] == [("EMAIL", "13812345678@qq.com")]


def test_two_phones_in_one_run_of_groups():
    text = "ZIP 10001 138 1234 5678 139 1234 5678 end"
    assert [e.text for e in find_entities(text)] == ["138 1234 5678", "139 1234 5678"]


def test_placeholders_and_counts():
    text = "Mail a.b@example.com or call 13812345678; card 4111111111111111."
    scrubbed, counts = scrub_text(text)
    assert scrubbed == "Mail <EMAIL> or call <PHONE>; card <CARD>."
    assert counts == {"EMAIL": 1, "PHONE": 1, "CARD": 1}


def test_pseudonyms_are_keyed_and_consistent():
    key = b"k" * 32
    a = Scrubber("pseudonym", key)
    one = a.scrub("call 13812345678 or +86 138 1234 5678; mail Bob@Example.com")
    tokens = one.split()
    assert tokens[1] == tokens[3].rstrip(";")  # one number, two spellings, one pseudonym
    assert tokens[1].startswith("<PHONE_") and len(tokens[1]) == len("<PHONE_>") + 10
    assert Scrubber("pseudonym", key).scrub("mail bob@example.com") == "mail " + tokens[-1]
    assert Scrubber("pseudonym", b"j" * 32).scrub("call 13812345678") != "call " + tokens[1]
    assert "k" * 16 not in repr(a) and "key" not in repr(a)


def test_only_chosen_types():
    assert Scrubber(types=["email"]).scrub("a@b.co 13812345678") == "<EMAIL> 13812345678"
    with pytest.raises(ChatforgeError, match="unknown PII type"):
        Scrubber(types=["NAME"])
    with pytest.raises(ChatforgeError, match="PII mode"):
        Scrubber("hash")


STREAM = (
    "Mail john.smith@example.org or 张伟的邮箱zhangwei@163.com，电话13812345678，或者+86 138 1234 5678。\n"
    "US (415) 555-0123 or 415.555.0123 or +1-641-985-8398x868. ID 11010519491231002X, card 4111 1111 1111 1111,\n"
    "IBAN DE89 3704 0044 0532 0130 00 and GB82WEST12345698765432. IP 192.168.1.10:8080, fe80::1 and ::1.\n"
    "ZIP 10001 138 1234 5678 139 1234 5678 end  CALL 138 1234 5678 NOW A B C D E F G H I J K L M N O P Q 1 2 3 "
    "order 20231012153000123 v1.2.3.4 " + "x" * 600 + " 13812345678"
)


def _stream(parts: list[str], scrubber: Scrubber | None = None) -> str:
    r = Redactor(scrubber)
    return "".join(r.feed(p) for p in parts) + r.flush()


def test_stream_split_once_anywhere_equals_whole_text():
    whole = Scrubber().scrub(STREAM)
    assert whole.count("<") == 18
    for i in range(len(STREAM) + 1):
        assert _stream([STREAM[:i], STREAM[i:]]) == whole, i


def test_stream_split_at_every_boundary_equals_whole_text():
    whole = Scrubber().scrub(STREAM)
    assert _stream(list(STREAM)) == whole  # one character at a time: every boundary at once
    for step in (2, 3, 5, 7, 11):
        assert _stream([STREAM[i: i + step] for i in range(0, len(STREAM), step)]) == whole


def test_stream_holds_back_only_the_open_segment():
    r = Redactor()
    assert r.feed("Hello there, my number is ") == "Hello there, my number is "
    assert r.feed("1381234") == "" and r.held == 7
    assert r.feed("5678，thanks") == "<PHONE>，" and r.held == len("thanks")
    assert r.flush() == "thanks" and r.held == 0
    r = Redactor()
    held = []
    for c in STREAM:
        r.feed(c)
        held.append(r.held)
    assert max(held) <= 600  # the 600-character word is cut at 512


def test_pseudonym_stream_matches_whole_text():
    key = b"s" * 32
    assert _stream(list(STREAM), Scrubber("pseudonym", key)) == Scrubber("pseudonym", key).scrub(STREAM)


def test_a_reply_may_repeat_the_pii_its_prompt_holds_in_any_spelling():
    """keep = Scrubber.known(prompt): the user's own address in a tool call's arguments, the shop's phone number
    from the system prompt; anything else the model writes is still redacted, streamed or whole."""
    scrubber = Scrubber()
    keep = scrubber.known("I am Ann (Ann.Lee@Example.com), call me on 13812345678. Shop line: +86 10 6552 9988")
    reply = ('{"email": "ann.lee@example.com", "phone": "+86 138 1234 5678"} or bob@example.org, '
             "13912345678 or +86 10 6552 9988")
    want = ('{"email": "ann.lee@example.com", "phone": "+86 138 1234 5678"} or <EMAIL>, <PHONE> or '
            "+86 10 6552 9988")
    r = Redactor(scrubber, keep)
    assert "".join(r.feed(c) for c in reply) + r.flush() == want
    r = Redactor(scrubber, keep)
    assert r.feed(reply) + r.flush() == want
    assert scrubber.known("no entities here") == frozenset()
    assert _stream([reply]) == '{"email": "<EMAIL>", "phone": "<PHONE>"} or <EMAIL>, <PHONE> or <PHONE>'


def test_sockets_are_disabled_here():
    with pytest.raises(OSError, match="network access"):
        socket.socket()


def test_every_type_is_exercised():
    assert {k for k, _, _ in ENTITIES} == set(TYPES)
