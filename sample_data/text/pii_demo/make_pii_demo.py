"""Write the personal-data demo set: Harbor Bank support chats in which customers wrote personal data.

Every value is invented and chosen to pass its checksum (card numbers pass Luhn, IBANs their mod-97 check, SSNs
python-stdnum's rules), so ``data.pii`` finds and redacts each of them; the support line 1-800-555-0142 is the bank's
own number (``data.pii_allow`` in examples/text-pii.yaml). Run ``python sample_data/text/pii_demo/make_pii_demo.py``;
the output is the same every time.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent
CLOSING = " Fair winds!"

#: (customer message, crew answer, answer_contains) with personal data planted in the customer's words
TRAIN = [
    (
        "Hi, I'm Dana Whitfield, my email is dana.whitfield@example.com. What's the HarborFlex monthly fee?",
        "The HarborFlex Checking monthly fee is $6, waived with a $500 minimum daily balance or any direct deposit.",
        ["$6"],
    ),
    (
        "Please call me back on +44 20 7946 0958 about my overdraft fee.",
        "The HarborFlex overdraft fee is $25, at most 2 per day.",
        ["$25"],
    ),
    (
        "My Anchor Card 4539 1488 0343 6467 was swallowed by an ATM. How much is a replacement?",
        "A replacement Anchor Card is free; express replacement is $15.",
        ["free"],
    ),
    (
        "I want to wire money to IBAN GB82 WEST 1234 5698 7654 32. What does an international wire cost?",
        "An international wire transfer costs $35; the same-day cut-off is 3 pm Eastern.",
        ["$35"],
    ),
    (
        "For the account opening form, my SSN is 536-90-4399. What's the minimum opening deposit?",
        "The minimum opening deposit is $25; bring photo ID and proof of address.",
        ["$25"],
    ),
    (
        "My national insurance number is AB 12 34 56 C, can I open a TideSaver? What's the rate?",
        "TideSaver pays 3.10% APY with no monthly fee.",
        ["3.10%"],
    ),
    (
        "Text me at (415) 555-2671 when the branch opens on Saturday.",
        "On Saturday Harbor Bank branches are open 9 am to 1 pm.",
        ["9 am to 1 pm"],
    ),
    (
        "How many Lighthouse Rewards points do I get per dollar? Reply to m.okafor@harbor-mail.example.org please.",
        "You earn 2 points per dollar spent with the Anchor Card; 1,000 points = $10.",
        ["2 points"],
    ),
    # clean records: numbers that are not personal data (an order number, a fee, a date, a card failing Luhn)
    (
        "My order 1234567890 for a new chequebook, when does it arrive?",
        "Chequebooks arrive in 5 to 7 business days.",
        ["5 to 7"],
    ),
    (
        "Is 4539 1488 0343 6468 a valid card number? I think I mistyped it.",
        "That number fails the card check digit; please read it again from your Anchor Card.",
        ["check digit"],
    ),
    (
        "What is the daily HarborPay limit?",
        "You can send up to $2,500 a day with HarborPay.",
        ["$2,500"],
    ),
    (
        "What number do I call if my card is stolen?",
        "Call the Mooring Line on 1-800-555-0142, any time, day or night.",
        ["1-800-555-0142"],
    ),
]

VALIDATION = [
    (
        "This is Priya at priya.n@example.net: how much is an instant HarborPay transfer?",
        "An instant HarborPay transfer costs 1%, at most $10.",
        ["1%"],
    ),
    (
        "Card 5425 2334 3010 9903 is lost, what do I do?",
        "Report it on the Mooring Line, 1-800-555-0142, and lock it under Anchor Card > Lock card.",
        ["1-800-555-0142"],
    ),
    (
        "Send the refund to DE89 3704 0044 0532 0130 00. When are cheque deposits available?",
        "Cheques deposited in HarborPay are available the next business day, up to $3,000 a day.",
        ["next business day"],
    ),
    (
        "What is the domestic wire fee?",
        "A domestic wire transfer costs $20.",
        ["$20"],
    ),
]


def records(rows: list[tuple[str, str, list[str]]], prefix: str) -> list[dict]:
    return [
        {
            "id": f"{prefix}-{i:02d}",
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a + CLOSING}],
            "answer_contains": facts,
        }
        for i, (q, a, facts) in enumerate(rows, start=1)
    ]


def write(name: str, rows: list[dict]) -> None:
    (HERE / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    write("train.jsonl", records(TRAIN, "pii-train"))
    write("validation.jsonl", records(VALIDATION, "pii-val"))
