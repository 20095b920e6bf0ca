"""PII recognizers on a generated, labelled English + Chinese set: recall and precision per type, false flags on
look-alikes, and throughput, beside two references measured in the same run.

    pip install -e '.[bench]'            # faker
    python benchmarks/pii.py             # 3,000 entities, 1,500 look-alikes, seed 0
    python benchmarks/pii.py --entities 6000 --lookalikes 3000 --seed 1

Entities come from `faker` (locales en_US and zh_CN, IBANs from six European locales) placed in English and Chinese
sentence templates; phone numbers faker makes that are not in the numbering plan (North American ones with an
impossible area code or exchange, China mobiles with an unassigned prefix) are redrawn, since they are not phone
numbers, and so are faker's JCB numbers outside JCB's 3528-3589 range and its Maestro numbers starting 0604
(no scheme's prefix). International numbers are drawn in the numbering plans of `phonenumbers`. A found
entity counts only with the exact span and type. Look-alikes are strings that share a shape with an entity but fail
its check: order and tracking numbers, timestamps in six formats, version strings, 18-digit IDs with a wrong check
digit, card numbers failing Luhn, IBANs failing mod-97, out-of-range IPv4, MAC addresses, impossible phone numbers.
(A four-part version string whose parts are all <= 255, "1.2.3.4", is a valid IPv4 address as written and is not
used as a look-alike; "v1.2.3.4" is.)

References: the same patterns without their validators (what a regex-only scrubber flags), and for PHONE the
`phonenumbers.PhoneNumberMatcher` of the library itself (regions CN then US). Exit 1 if a target is missed
(recall >= 0.99, precision >= 0.95, no look-alike flagged, >= 1 MB/s per core).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter, defaultdict

EN = {
    "EMAIL": ["Please email me at {x} when you can.", "My address is {x}, reply there.", "Contact: {x}",
              "Send the invoice to {x}."],
    "PHONE": ["Call me on {x} after 5pm.", "My number is {x}.", "Phone: {x}", "You can reach the office at {x} today."],
    "CN_ID": ["Her resident ID is {x}.", "ID number: {x}", "The form lists {x} as the ID."],
    "CARD": ["My card number is {x}, expiry 12/27.", "Charge {x} please.", "Card: {x}"],
    "IBAN": ["Wire it to {x} by Friday.", "IBAN: {x}", "Our account is {x}."],
    "IP": ["The server at {x} is down.", "Login from {x} was blocked.", "Ping {x} and tell me."],
}
ZH = {
    "EMAIL": ["我的邮箱是{x}，谢谢。", "请发邮件到{x}联系我", "邮箱：{x}"],
    "PHONE": ["请拨打{x}联系我。", "我的手机号是{x}，有事打给我", "电话：{x}", "联系方式{x}（工作日）"],
    "CN_ID": ["身份证号：{x}", "他的身份证号码是{x}。", "请核对证件号{x}是否正确"],
    "CARD": ["银行卡号{x}，请尽快转账。", "卡号：{x}", "我用{x}这张卡付款"],
    "IBAN": ["请汇款至{x}。", "账户IBAN：{x}"],
    "IP": ["服务器地址{x}无法访问。", "来自{x}的登录已被拦截", "IP：{x}"],
}


def _grouped(s: str, sep: str = " ") -> str:
    return sep.join(s[i: i + 4] for i in range(0, len(s), 4))


def _phone_numbers(rng: random.Random, fake_en, fake_zh) -> callable:
    import phonenumbers
    from phonenumbers import PhoneNumberFormat as F

    def nanp() -> str:
        while True:
            s = fake_en.phone_number()
            try:
                if phonenumbers.is_valid_number(phonenumbers.parse(s, "US")):
                    return s
            except phonenumbers.NumberParseException:
                pass

    def china_mobile() -> str:
        while True:
            s = fake_zh.phone_number()
            if phonenumbers.is_valid_number(phonenumbers.parse(s, "CN")):
                return s

    def plan(region: str, kind) -> phonenumbers.PhoneNumber:
        example = phonenumbers.example_number_for_type(region, kind)
        digits = phonenumbers.national_significant_number(example)  # keeps an Italian leading zero
        for _ in range(1000):  # the example with its last digits redrawn, while the number stays valid
            national = digits[:-3] + "".join(rng.choice("0123456789") for _ in range(3))
            number = phonenumbers.parse("+" + str(example.country_code) + national, None)
            if phonenumbers.is_valid_number(number):
                return number
        return example

    mobile, fixed = phonenumbers.PhoneNumberType.MOBILE, phonenumbers.PhoneNumberType.FIXED_LINE

    def draw() -> str:
        r = rng.random()
        if r < 0.3:
            return china_mobile()
        if r < 0.4:  # a China mobile written in groups, with or without +86
            s = china_mobile()
            return rng.choice(["{} {} {}", "{}-{}-{}", "+86 {} {} {}", "+86-{}-{}-{}"]).format(s[:3], s[3:7], s[7:])
        if r < 0.5:  # a China fixed line with its area code
            n = plan("CN", fixed)
            return phonenumbers.format_number(n, rng.choice([F.NATIONAL, F.INTERNATIONAL]))
        if r < 0.75:
            return nanp()
        region = rng.choice(["GB", "DE", "FR", "JP", "AU", "IN", "SG", "HK", "TW", "KR", "IT", "ES", "BR", "CA"])
        n = plan(region, rng.choice([mobile, fixed]))
        return phonenumbers.format_number(n, rng.choice([F.INTERNATIONAL, F.E164]))

    return draw


def generate(n_entities: int, n_lookalikes: int, seed: int) -> tuple[list[tuple[str, list]], list[str]]:
    """(documents as (text, [(type, start, end)]), look-alike documents)."""
    from faker import Faker

    rng = random.Random(seed)
    Faker.seed(seed)
    en, zh = Faker("en_US"), Faker("zh_CN")
    ibans = [Faker(loc) for loc in ("de_DE", "fr_FR", "nl_NL", "en_GB", "es_ES", "it_IT")]
    phone = _phone_numbers(rng, en, zh)
    card_types = ["visa", "mastercard", "amex", "discover", "jcb", "diners", "maestro", "visa13", "visa19"]

    def entity(kind: str) -> str:
        if kind == "EMAIL":
            return rng.choice([en, zh]).email() if rng.random() < 0.7 else rng.choice([en, zh]).company_email()
        if kind == "PHONE":
            return phone()
        if kind == "CN_ID":
            return zh.ssn()
        if kind == "CARD":
            s = en.credit_card_number(rng.choice(card_types))
            while s.startswith(("0604", "35")) and not 3528 <= int(s[:4]) <= 3589:  # see the docstring
                s = en.credit_card_number(rng.choice(card_types))
            return _grouped(s, rng.choice([" ", "-"])) if len(s) == 16 and rng.random() < 0.4 else s
        if kind == "IBAN":
            s = rng.choice(ibans).iban()
            return _grouped(s) if rng.random() < 0.4 else s
        v6 = rng.random() < 0.4
        if not v6:
            return en.ipv4_private() if rng.random() < 0.3 else en.ipv4()
        import ipaddress

        return ipaddress.IPv6Address(en.ipv6()).compressed if rng.random() < 0.5 else en.ipv6()

    docs = []
    kinds = list(EN)
    for i in range(n_entities):
        kind = kinds[i % len(kinds)]
        lang = EN if i % 2 == 0 else ZH
        filler = en.sentence() if lang is EN else zh.sentence()
        x = entity(kind)
        template = rng.choice(lang[kind])
        pre, post = template.split("{x}")
        pre = (filler + " " if lang is EN else filler) + pre
        docs.append((pre + x + post, [(kind, len(pre), len(pre) + len(x))]))
    return docs, lookalikes(n_lookalikes, rng, en, zh)


def _luhn_digit(body: str) -> str:
    total = 0
    for i, c in enumerate(reversed(body)):
        d = int(c)
        if i % 2 == 0:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return str(-total % 10)


def lookalikes(n: int, rng: random.Random, en, zh) -> list[str]:
    def digits(k: int) -> str:
        return "".join(rng.choice("0123456789") for _ in range(k))

    def bad_id() -> str:
        s = zh.ssn()
        return s[:17] + rng.choice([c for c in "0123456789X" if c != s[17]])

    def bad_card() -> str:
        s = en.credit_card_number(rng.choice(["visa", "mastercard", "amex", "discover", "jcb"]))
        return s[:-1] + rng.choice([c for c in "0123456789" if c != s[-1]])

    def bad_iban() -> str:
        s = Faker_iban()
        check = int(s[2:4])
        return s[:2] + f"{(check + rng.randint(1, 96)) % 97:02d}" + s[4:]

    from faker import Faker

    iban_fakers = [Faker(loc) for loc in ("de_DE", "fr_FR", "nl_NL", "en_GB")]

    def Faker_iban() -> str:  # noqa: N802
        return rng.choice(iban_fakers).iban()

    def timestamp() -> str:
        t = en.date_time_between("-10y", "now")
        return rng.choice([t.strftime("%Y-%m-%d %H:%M:%S"), t.strftime("%Y-%m-%dT%H:%M:%SZ"),
                           t.strftime("%Y%m%d%H%M%S"), str(int(t.timestamp())), str(int(t.timestamp() * 1000)),
                           t.strftime("%d/%m/%Y %H:%M"), t.strftime("%Y年%m月%d日 %H:%M"), t.strftime("%Y.%m.%d")])

    def version() -> str:
        a, b, c = rng.randint(0, 20), rng.randint(0, 30), rng.randint(0, 99)
        return rng.choice([f"v{a}.{b}.{c}", f"{a}.{b}.{c}", f"v{a}.{b}.{c}.{rng.randint(0, 255)}",
                           f"{a}.{b}.{c}.{rng.randint(256, 30000)}", f"{a}.{b}.{c}-rc{rng.randint(1, 5)}",
                           f"{a}.{b}.{c}.{rng.randint(0, 99)}-beta"])

    def order() -> str:
        return rng.choice([f"ORD-{rng.randint(2015, 2026)}-{digits(6)}", f"SO{digits(14)}", f"#{digits(8)}",
                           f"{rng.randint(2015, 2026)}{digits(2)}{digits(2)}{digits(12)}",  # 20 digits
                           f"INV{digits(10)}", f"SF{digits(13)}", f"1Z{digits(3)}AA{digits(10)}",
                           f"{digits(4)}-{digits(4)}-{digits(2)}"])

    def bad_ip() -> str:
        parts = [rng.randint(0, 255) for _ in range(4)]
        parts[rng.randrange(4)] = rng.randint(256, 999)
        return rng.choice([".".join(map(str, parts)), ".".join(map(str, parts[:3]))])

    def bad_phone() -> str:
        return rng.choice([f"({rng.choice('01')}{digits(2)}) {digits(3)}-{digits(4)}",  # area code 0xx / 1xx
                           f"{rng.choice('01')}{digits(2)}-{digits(3)}-{digits(4)}",
                           f"+86 12{digits(1)} {digits(4)} {digits(4)}", f"+1 555 {digits(2)}", "000-000-0000",
                           f"10{digits(9)}", f"11{digits(9)}", f"12{digits(9)}"])  # no such China mobile prefix

    def mac() -> str:
        return ":".join(f"{rng.randint(0, 255):02X}" for _ in range(6))

    kinds = {"18-digit ID, bad check digit": bad_id, "card number, bad Luhn": bad_card, "IBAN, bad mod-97": bad_iban,
             "timestamp": timestamp, "version string": version, "order/tracking number": order,
             "IPv4 out of range": bad_ip, "impossible phone number": bad_phone, "MAC address": mac}
    en_t = ["Reference {x} was logged.", "See {x} for details.", "Value: {x}", "We shipped {x} yesterday."]
    zh_t = ["订单号：{x}", "请查看{x}的记录。", "编号{x}已处理", "版本{x}发布了"]
    out = []
    names = list(kinds)
    for i in range(n):
        name = names[i % len(names)]
        out.append((name, rng.choice(en_t if i % 2 == 0 else zh_t).format(x=kinds[name]())))
    return out


def naive_entities(text: str) -> list[tuple[str, int, int]]:
    """The recognizers' patterns with no validator: what a regex-only scrubber flags."""
    from chatforge.privacy import pii

    found = []
    for kind, pattern in (("EMAIL", pii._EMAIL), ("IP", pii._IPV4), ("CN_ID", pii._CN_ID), ("CARD", pii._CARD),
                          ("IBAN", pii._IBAN), ("PHONE", pii._PHONE)):
        found += [(kind, *m.span()) for m in pattern.finditer(text)]
    return found


def matcher_phones(text: str) -> list[tuple[str, int, int]]:
    import phonenumbers

    spans = set()
    for region in ("CN", "US"):
        spans |= {(m.start, m.end) for m in phonenumbers.PhoneNumberMatcher(text, region)}
    return [("PHONE", a, b) for a, b in sorted(spans)]


def score(docs, lookalike_docs, predict, only: str | None = None) -> dict:
    tp, fp, fn = Counter(), Counter(), Counter()
    for text, gold in docs:
        g = {(t, a, b) for t, a, b in gold if only in (None, t)}
        p = {(t, a, b) for t, a, b in predict(text) if only in (None, t)}
        for t, *_ in p & g:
            tp[t] += 1
        for t, *_ in p - g:
            fp[t] += 1
        for t, *_ in g - p:
            fn[t] += 1
    flags = Counter()
    for name, text in lookalike_docs:
        if [e for e in predict(text) if only in (None, e[0])]:
            flags[name] += 1
    return {"tp": tp, "fp": fp, "fn": fn, "flags": flags}


def throughput(texts: list[str], fn, repeat: int = 3) -> float:
    data = sum(len(t.encode()) for t in texts)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for t in texts:
            fn(t)
        best = min(best, time.perf_counter() - t0)
    return data / best / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entities", type=int, default=3000)
    parser.add_argument("--lookalikes", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from chatforge.privacy.pii import TYPES, Scrubber, find_entities

    docs, looks = generate(args.entities, args.lookalikes, args.seed)

    def ours(text):
        return [(e.type, e.start, e.end) for e in find_entities(text)]

    results = {"chatforge": score(docs, looks, ours), "regex only": score(docs, looks, naive_entities),
               "PhoneNumberMatcher": score(docs, looks, matcher_phones, only="PHONE")}
    n_gold = Counter(t for _, g in docs for t, *_ in g)
    print(f"{sum(n_gold.values()):,} entities in {len(docs):,} EN+ZH sentences "
          f"({', '.join(f'{t} {n_gold[t]}' for t in TYPES)}), {len(looks):,} look-alikes, seed {args.seed}\n")
    print("| type | n | chatforge recall | chatforge precision | regex-only recall | regex-only precision |"
          " PhoneNumberMatcher recall | precision |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")

    def rp(r, t):
        tp, fp, fn = r["tp"][t], r["fp"][t], r["fn"][t]
        return (tp / (tp + fn) if tp + fn else float("nan")), (tp / (tp + fp) if tp + fp else float("nan"))

    ok = True
    for t in (*TYPES, "all"):
        if t == "all":
            agg = {k: Counter({"all": sum(results["chatforge"][k].values())}) for k in ("tp", "fp", "fn")}
            agg_n = {k: Counter({"all": sum(results["regex only"][k].values())}) for k in ("tp", "fp", "fn")}
            (r1, p1), (r2, p2), n = rp(agg, "all"), rp(agg_n, "all"), sum(n_gold.values())
        else:
            (r1, p1), (r2, p2), n = rp(results["chatforge"], t), rp(results["regex only"], t), n_gold[t]
            ok &= r1 >= 0.99 and p1 >= 0.95
        ref = rp(results["PhoneNumberMatcher"], "PHONE") if t == "PHONE" else None
        ref_s = f"{ref[0]:.4f} | {ref[1]:.4f}" if ref else "– | –"
        print(f"| {t} | {n} | {r1:.4f} | {p1:.4f} | {r2:.4f} | {p2:.4f} | {ref_s} |")

    print(f"\n| look-alike kind | n | chatforge flagged | regex-only flagged | PhoneNumberMatcher flagged |")
    print("|---|---:|---:|---:|---:|")
    per_kind = Counter(name for name, _ in looks)
    for name in per_kind:
        print(f"| {name} | {per_kind[name]} | {results['chatforge']['flags'][name]} | "
              f"{results['regex only']['flags'][name]} | {results['PhoneNumberMatcher']['flags'][name]} |")
    flagged = sum(results["chatforge"]["flags"].values())
    print(f"| all | {len(looks)} | {flagged} | {sum(results['regex only']['flags'].values())} | "
          f"{sum(results['PhoneNumberMatcher']['flags'].values())} |")
    ok &= flagged == 0

    # Throughput on one core: the labelled sentences (about one entity per 60 characters) and plain chat-like
    # text with an entity every ~2,000 characters.
    from faker import Faker

    rng = random.Random(args.seed)
    Faker.seed(args.seed)
    en, zh = Faker("en_US"), Faker("zh_CN")
    sparse = []
    for i in range(300):
        fake = en if i % 2 == 0 else zh
        text = (" " if fake is en else "").join(fake.paragraph(8) for _ in range(4))
        doc, _ = docs[rng.randrange(len(docs))]
        cut = rng.randrange(len(text))
        sparse.append(text[:cut] + doc + text[cut:])
    dense = [d for d, _ in docs] + [t for _, t in looks]
    scrubber = Scrubber()
    rows = [("labelled sentences + look-alikes", dense), ("chat-like paragraphs, sparse entities", sparse)]
    print("\n| text | MB | chatforge MB/s (1 core) | regex-only MB/s | PhoneNumberMatcher (phones only) MB/s |")
    print("|---|---:|---:|---:|---:|")
    for name, texts in rows:
        mb = sum(len(t.encode()) for t in texts) / 1e6
        ours_mbs = throughput(texts, scrubber.scrub)
        print(f"| {name} | {mb:.2f} | {ours_mbs:.2f} | {throughput(texts, naive_entities):.2f} | "
              f"{throughput(texts, matcher_phones, repeat=1):.2f} |")
        ok &= ours_mbs >= 1.0
    misses = [(text[a:b], t) for text, gold in docs for t, a, b in gold
              if (t, a, b) not in {(e.type, e.start, e.end) for e in find_entities(text)}]
    if misses:
        print(f"\nmissed (first 10 of {len(misses)}): {misses[:10]}")
    wrong = [(name, text, [e.text for e in find_entities(text)]) for name, text in looks if find_entities(text)]
    if wrong:
        print(f"look-alikes flagged (first 10 of {len(wrong)}): {wrong[:10]}")
    print("\ntargets (recall >= 0.99, precision >= 0.95 per type, no look-alike flagged, >= 1 MB/s):",
          "met" if ok else "NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
