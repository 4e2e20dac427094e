"""data.pii: findings precision and recall on a generated labelled set, and scan speed on the text sample data.

The labelled set is made here, seeded: sentences in a support-chat register, each holding one planted value of a type
(e-mail, phone in six regions and four layouts including bare digits, card numbers passing Luhn, IBANs passing their checksum, US SSNs valid
for python-stdnum, UK NINOs) or none, mixed with clean sentences full of numbers that are not personal data (order and
ticket numbers, amounts, dates, ISBNs, card numbers failing Luhn, IBANs with a wrong check digit, invalid SSNs). A
finding counts as a true positive when its type and its exact text match the planted value.

Speed: records scanned per second by :func:`polyadapt.pii.scan_samples` over the Harbor Bank sample set
(sample_data/text/train.jsonl and validation.jsonl, every message and fact), the scanner already built (its build
time, mostly importing Presidio, is reported apart). Names are not part of the set: they need a spaCy pipeline.

Run: ``python benchmarks/pii_scan.py [--per-type 200] [--clean 600] [--seed 0] [--repeat 3]``; prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import string
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "sample_data" / "text"

PLANTED_TEMPLATES = {
    "EMAIL": ["Please write to {v} with the form.", "my email is {v}", "Reply to {v}, thanks!", "{v} is my address"],
    "PHONE": ["Call me on {v} after 5.", "my mobile: {v}", "You can reach me at {v}.", "Give {v} to the courier."],
    "CARD": ["My card {v} was declined.", "card number {v}", "I paid with {v} yesterday.", "Cancel {v} please"],
    "IBAN": ["Send it to IBAN {v}.", "my account {v}", "Refund to {v} please.", "Beneficiary: {v}"],
    "NATIONAL_ID": ["My SSN is {v}.", "national insurance number {v}", "ID {v} on the form.", "it is {v}"],
}
CLEAN_TEMPLATES = [
    "My order {order} has not arrived.",
    "Ticket {order} was closed on {date}.",
    "The fee is ${amount} a month, {pct}% APY.",
    "Is {bad_card} my card? It was rejected.",
    "The IBAN {bad_iban} came back as invalid.",
    "Reference {ref} for invoice INV-{year}-{small}.",
    "ISBN {isbn} and pages {small}-{small2}.",
    "Meet at {hour}:30 on {date}, room {small}.",
    "The number {bad_ssn} is not a valid SSN.",
    "Version {small}.{small2}.{small} ships in {year}.",
    "We moved {amount} points to TideSaver on {date}.",
    "Account 12345678, sort code 12-34-56, branch {small}.",
    "Call reference {order} about the refund.",  # a phone word before a plain number: the hard case
]
FIRST = ["dana", "m.okafor", "priya.n", "j_smith", "li.wei", "o.brien", "anna-maria", "k77", "support.team", "x.y"]
DOMAINS = ["example.com", "mail.example.org", "harbor-mail.example.net", "example.co.uk", "post.example.de"]
PHONE_REGIONS = ["US", "GB", "DE", "FR", "IN", "CA"]


def luhn_number(rng: random.Random, prefix: str, length: int) -> str:
    from stdnum import luhn

    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    return body + luhn.calc_check_digit(body)


def grouped(digits: str, rng: random.Random) -> str:
    return " ".join(digits[i : i + 4] for i in range(0, len(digits), 4)) if rng.random() < 0.6 else digits


def make_value(kind: str, rng: random.Random) -> str:
    import phonenumbers
    from stdnum import iban
    from stdnum.us import ssn

    if kind == "EMAIL":
        return f"{rng.choice(FIRST)}{rng.randint(0, 99) if rng.random() < 0.3 else ''}@{rng.choice(DOMAINS)}"
    if kind == "PHONE":
        while True:
            region = rng.choice(PHONE_REGIONS)
            example = phonenumbers.example_number_for_type(region, phonenumbers.PhoneNumberType.MOBILE)
            national = str(example.national_number)
            changed = national[:-4] + "".join(rng.choice(string.digits) for _ in range(4))
            number = phonenumbers.parse(changed, region)
            if phonenumbers.is_valid_number(number):
                layout = rng.choice(["INTERNATIONAL", "NATIONAL", "E164", "DIGITS"])
                if layout == "DIGITS":  # national digits with no separator: found only after a phone word
                    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.NATIONAL).translate(
                        str.maketrans("", "", " -()")
                    )
                return phonenumbers.format_number(number, getattr(phonenumbers.PhoneNumberFormat, layout))
    if kind == "CARD":
        prefix, length = rng.choice([("4", 16), ("51", 16), ("55", 16), ("37", 15), ("6011", 16)])
        return grouped(luhn_number(rng, prefix, length), rng)
    if kind == "IBAN":
        country = rng.choice(["GB", "DE", "NL"])
        if country == "GB":
            bban = "".join(rng.choice(string.ascii_uppercase) for _ in range(4)) + _digits(rng, 14)
        elif country == "NL":
            bban = "".join(rng.choice(string.ascii_uppercase) for _ in range(4)) + _digits(rng, 10)
        else:
            bban = _digits(rng, 18)
        number = country + iban.calc_check_digits(country + "00" + bban) + bban
        return grouped(number, rng)
    if rng.random() < 0.5:
        while True:
            value = f"{rng.randint(1, 899):03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"
            if ssn.is_valid(value):
                return value
    first = rng.choice("ABCEGHJKLMNOPRSTWXYZ")
    second = rng.choice("ABCEGHJKLMNPRSTWXYZ")
    if first + second in ("BG", "GB", "NK", "KN", "NT", "TN", "ZZ"):
        first, second = "A", "B"
    digits = _digits(rng, 6)
    spaced = rng.random() < 0.5
    middle = f" {digits[:2]} {digits[2:4]} {digits[4:]} " if spaced else digits
    return f"{first}{second}{middle}{rng.choice('ABCD')}"


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(n))


def clean_sentence(rng: random.Random) -> str:
    from stdnum import luhn

    card = luhn_number(rng, "4", 16)
    bad_card = card[:-1] + str((int(card[-1]) + 1) % 10)
    assert not luhn.is_valid(bad_card)
    good_iban = make_value("IBAN", rng).replace(" ", "")
    bad_iban = good_iban[:2] + f"{(int(good_iban[2:4]) + 1) % 100:02d}" + good_iban[4:]
    fields = {
        "order": _digits(rng, rng.choice([8, 10, 12])),
        "date": f"{rng.randint(2019, 2026)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        "amount": f"{rng.randint(1, 9)},{rng.randint(0, 999):03d}",
        "pct": f"{rng.randint(0, 9)}.{rng.randint(0, 99):02d}",
        "bad_card": grouped(bad_card, rng),
        "bad_iban": bad_iban,
        "ref": _digits(rng, 9),
        "year": rng.randint(1990, 2030),
        "small": rng.randint(1, 999),
        "small2": rng.randint(1, 999),
        "isbn": "978-0-306-40615-7",
        "hour": rng.randint(8, 18),
        "bad_ssn": f"{rng.choice(['000', '666', '900'])}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}",
    }
    return rng.choice(CLEAN_TEMPLATES).format(**fields)


def labelled_set(per_type: int, clean: int, seed: int) -> list[tuple[str, list[tuple[str, str]]]]:
    """``(text, [(type, value), ...])`` rows: ``per_type`` planted sentences per type (half with a clean sentence
    beside them) and ``clean`` sentences with nothing to find."""
    rng = random.Random(seed)
    rows = []
    for kind, templates in PLANTED_TEMPLATES.items():
        for _ in range(per_type):
            value = make_value(kind, rng)
            text = rng.choice(templates).format(v=value)
            if rng.random() < 0.5:
                text = f"{clean_sentence(rng)} {text}"
            rows.append((text, [(kind, value)]))
    rows += [(clean_sentence(rng), []) for _ in range(clean)]
    rng.shuffle(rows)
    return rows


def precision_recall(scanner, rows) -> dict:
    tp, fp, fn = Counter(), Counter(), Counter()
    misses, false = [], []
    for text, gold in rows:
        found = {(s.type, text[s.start : s.end]) for s in scanner.find(text)}
        wanted = set(gold)
        for item in found & wanted:
            tp[item[0]] += 1
        for item in found - wanted:
            fp[item[0]] += 1
            false.append([item[0], item[1], text])
        for item in wanted - found:
            fn[item[0]] += 1
            misses.append([item[0], item[1], text])
    per_type = {}
    for kind in PLANTED_TEMPLATES:
        p = tp[kind] / (tp[kind] + fp[kind]) if tp[kind] + fp[kind] else 1.0
        r = tp[kind] / (tp[kind] + fn[kind]) if tp[kind] + fn[kind] else 1.0
        per_type[kind] = {
            "precision": round(p, 4),
            "recall": round(r, 4),
            "tp": tp[kind],
            "fp": fp[kind],
            "fn": fn[kind],
        }
    total_tp, total_fp, total_fn = sum(tp.values()), sum(fp.values()), sum(fn.values())
    return {
        "per_type": per_type,
        "precision": round(total_tp / max(1, total_tp + total_fp), 4),
        "recall": round(total_tp / max(1, total_tp + total_fn), 4),
        "clean_sentences_with_a_finding": sum(1 for text, gold in rows if not gold and scanner.find(text)),
        "first_misses": misses[:8],
        "first_false_positives": false[:8],
    }


def scan_speed(scanner, repeat: int) -> dict:
    from polyadapt.pii import scan_samples
    from polyadapt_text.data import read_text_dataset

    found = read_text_dataset(DATA, drop_duplicates=False)
    splits = {k: v for k, v in found.splits.items() if k in ("train", "validation")}
    records = sum(len(v) for v in splits.values())
    fields = sum(len(s.text_fields()) for v in splits.values() for s in v)
    times = []
    for _ in range(repeat):
        _, scan = scan_samples(splits, scanner, redact=True)
        times.append(scan.seconds)
    best = min(times)
    return {
        "data": "sample_data/text (train + validation)",
        "records": records,
        "fields": fields,
        "findings": len(scan.findings),
        "counts": {k: v for k, v in scan.counts.items() if v},
        "seconds_best_of": [round(t, 4) for t in times],
        "records_per_second": round(records / best, 1),
        "fields_per_second": round(fields / best, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-type", type=int, default=200)
    parser.add_argument("--clean", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    started = time.perf_counter()
    from polyadapt.pii import PiiScanner

    scanner = PiiScanner()
    built = time.perf_counter() - started
    rows = labelled_set(args.per_type, args.clean, args.seed)
    result = {
        "labelled_set": {"rows": len(rows), "planted": sum(len(g) for _, g in rows), "seed": args.seed},
        "scanner_build_seconds": round(built, 2),
        "findings": precision_recall(scanner, rows),
        "speed": scan_speed(scanner, args.repeat),
    }
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
