"""Write the Harbor Bank policy pages, two versions, and the held-out questions about them.

``policies_v1/`` holds the pages the training corpus's facts come from (the bank table of sample_data/text/README.md,
the facts of make_corpus.py); ``policies_v2/`` holds the same pages after six facts changed (see CHANGES), as if the
bank rewrote them after an adapter was trained. ``questions_unchanged.jsonl`` asks facts both versions share,
``questions_changed.jsonl`` the six that changed; every question is worded unlike the page that answers it and names
that page and section as ``source`` (``file.md#heading-anchor``).
Deterministic: running it twice writes the same bytes. Run from anywhere:
``python sample_data/text/policies/make_policies.py``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: every value a page states; v2 differs in CHANGES only
FACTS_V1 = {
    "checking_fee": "$6",
    "waiver_balance": "$500",
    "overdraft_fee": "$25",
    "overdraft_per_day": "2",
    "apy": "3.10%",
    "free_withdrawals": "6",
    "withdrawal_fee": "$2",
    "atm_limit": "$800",
    "purchase_limit": "$5,000",
    "express_card": "$15",
    "harborpay_limit": "$2,500",
    "instant_fee": "1%",
    "instant_cap": "$10",
    "standard_days": "1-3 business days",
    "points_per_dollar": "2 points",
    "points_value": "1,000 points = $10",
    "phone": "1-800-555-0142",
    "weekday_hours": "9 am to 5 pm",
    "saturday_hours": "9 am to 1 pm",
    "domestic_wire": "$20",
    "international_wire": "$35",
    "wire_cutoff": "3 pm",
    "cheque_limit": "$3,000",
    "opening_deposit": "$25",
    "cover_fee": "$0",
    "paper_statement": "$2",
    "dispute_days": "60 days",
    "provisional_credit": "10 business days",
    "stop_payment": "$12",
    "cashiers_cheque": "$8",
    "dormant_months": "12 months",
    "complaint_days": "5 business days",
    "minor_age": "13",
    "early_pay": "2 days",
    "branch_hold": "$225",
}
CHANGES = {
    "overdraft_fee": "$32",
    "apy": "3.45%",
    "atm_limit": "$1,200",
    "express_card": "$18",
    "international_wire": "$42",
    "cheque_limit": "$4,500",
}
FACTS_V2 = {**FACTS_V1, **CHANGES}

# (file, page title, [(section heading, section text)]); {key} is a fact of the version being written
PAGES: list[tuple[str, str, list[tuple[str, str]]]] = [
    (
        "checking.md",
        "HarborFlex Checking",
        [
            (
                "Overview",
                "HarborFlex Checking is the everyday checking account of Harbor Bank. It comes with the Anchor "
                "Card and full access to the HarborPay app.",
            ),
            (
                "Monthly fee",
                "HarborFlex Checking has a monthly fee of {checking_fee}, charged on the last business day "
                "of each statement period.",
            ),
            (
                "Fee waiver",
                "The monthly fee is waived in any month with a {waiver_balance} minimum daily balance or any "
                "direct deposit into the account.",
            ),
        ],
    ),
    (
        "overdraft.md",
        "Overdraft fees",
        [
            (
                "Overdraft fee",
                "When a payment takes a HarborFlex Checking balance below zero and we pay it, the overdraft "
                "fee is {overdraft_fee} per item.",
            ),
            (
                "Daily maximum",
                "We charge at most {overdraft_per_day} overdraft fees in one day, however many items "
                "overdraw the account.",
            ),
            (
                "Avoiding overdrafts",
                "Link a TideSaver account with Safe Harbor Overdraft Cover, or turn on low-balance "
                "alerts in HarborPay.",
            ),
        ],
    ),
    (
        "overdraft-cover.md",
        "Safe Harbor Overdraft Cover",
        [
            (
                "How it works",
                "Safe Harbor Overdraft Cover links your TideSaver savings to HarborFlex Checking. When "
                "checking would go below zero, the shortfall moves over from savings.",
            ),
            ("Transfer fee", "Each Overdraft Cover transfer costs {cover_fee}: there is no fee for the protection."),
        ],
    ),
    (
        "tidesaver.md",
        "TideSaver savings",
        [
            (
                "Interest rate",
                "TideSaver earns {apy} APY on the whole balance. Interest is compounded daily and paid monthly.",
            ),
            ("Monthly fee", "TideSaver has no monthly fee and no minimum balance."),
            (
                "Withdrawals",
                "Each month includes {free_withdrawals} free withdrawals; every further withdrawal costs "
                "{withdrawal_fee}.",
            ),
        ],
    ),
    (
        "anchor-card.md",
        "Anchor Card",
        [
            ("About the card", "The Anchor Card is the Visa debit card of HarborFlex Checking."),
            ("ATM withdrawal limit", "Cash withdrawals at ATMs are limited to {atm_limit} per day."),
            ("Purchase limit", "Card purchases are limited to {purchase_limit} per day."),
            (
                "Using the card abroad",
                "The Anchor Card has no foreign transaction fee: purchases in other currencies cost nothing extra.",
            ),
        ],
    ),
    (
        "card-replacement.md",
        "Replacing a card",
        [
            ("Standard replacement", "A replacement Anchor Card is free and arrives by post in 5 to 7 business days."),
            (
                "Express replacement",
                "Express replacement costs {express_card} and delivers the new card in 2 business days.",
            ),
        ],
    ),
    (
        "lost-stolen-cards.md",
        "Lost or stolen cards",
        [
            ("Reporting a lost card", "Report a lost or stolen card at any hour on the Mooring Line, {phone}."),
            (
                "Locking your card",
                "In HarborPay, open Anchor Card > Lock card to freeze the card at once; unlock it the same way.",
            ),
        ],
    ),
    (
        "harborpay.md",
        "HarborPay",
        [
            (
                "About the app",
                "HarborPay is the Harbor Bank mobile app for balances, payments and person-to-person transfers.",
            ),
            ("Daily sending limit", "You can send up to {harborpay_limit} a day to other people with HarborPay."),
        ],
    ),
    (
        "harborpay-transfers.md",
        "HarborPay transfer speeds",
        [
            ("Standard transfers", "A standard HarborPay transfer is free and arrives in {standard_days}."),
            (
                "Instant transfers",
                "An instant transfer arrives in minutes for a fee of {instant_fee} of the amount, at "
                "most {instant_cap}.",
            ),
        ],
    ),
    (
        "mobile-cheque-deposit.md",
        "Depositing cheques in HarborPay",
        [
            (
                "Daily deposit limit",
                "You can deposit cheques worth up to {cheque_limit} a day by photographing them in HarborPay.",
            ),
            ("Funds availability", "Money from a mobile cheque deposit is available the next business day."),
        ],
    ),
    (
        "lighthouse-rewards.md",
        "Lighthouse Rewards",
        [
            (
                "Earning points",
                "Lighthouse Rewards gives {points_per_dollar} for every dollar spent with the Anchor Card.",
            ),
            ("Redeeming points", "Points are redeemed as statement credit at {points_value}."),
        ],
    ),
    (
        "mooring-line.md",
        "Mooring Line support",
        [
            ("Phone number", "The Mooring Line, {phone}, is answered 24 hours a day, 7 days a week."),
            ("When to call", "Call for lost or stolen cards, suspected fraud, or help with HarborPay."),
        ],
    ),
    (
        "branch-hours.md",
        "Branch opening hours",
        [
            ("Weekdays", "Branches are open Monday to Friday, {weekday_hours}."),
            ("Saturday", "On Saturday branches open {saturday_hours}."),
            ("Sunday and holidays", "Branches are closed on Sunday and on federal holidays."),
        ],
    ),
    (
        "wire-transfers.md",
        "Wire transfers",
        [
            ("Domestic wires", "An outgoing domestic wire costs {domestic_wire}."),
            ("International wires", "An outgoing international wire costs {international_wire}."),
            ("Cut-off time", "Wires requested before {wire_cutoff} Eastern are sent the same business day."),
        ],
    ),
    (
        "opening-an-account.md",
        "Opening an account",
        [
            ("Opening deposit", "The minimum opening deposit for any Harbor Bank account is {opening_deposit}."),
            ("What to bring", "Bring a photo ID and a proof of address, such as a utility bill."),
        ],
    ),
    (
        "joint-accounts.md",
        "Joint accounts",
        [
            (
                "Owners",
                "HarborFlex Checking and TideSaver can each be held by two owners, who both receive an Anchor Card.",
            ),
            ("Removing an owner", "Both owners must sign to remove one of them from a joint account."),
        ],
    ),
    (
        "statements.md",
        "Statements",
        [
            ("Electronic statements", "Monthly statements are free in HarborPay and online banking."),
            ("Paper statements", "Paper statements by post cost {paper_statement} a month."),
        ],
    ),
    (
        "card-disputes.md",
        "Disputing a card payment",
        [
            ("Time limit", "Dispute an Anchor Card payment within {dispute_days} of the statement that shows it."),
            ("Provisional credit", "While we investigate, the amount is credited back within {provisional_credit}."),
        ],
    ),
    (
        "stop-payments.md",
        "Stopping a cheque",
        [
            ("Stop payment fee", "A stop payment on a cheque costs {stop_payment} and lasts six months."),
        ],
    ),
    (
        "cashiers-cheques.md",
        "Cashier's cheques",
        [
            ("Fee", "A cashier's cheque costs {cashiers_cheque} at any branch."),
            ("Lost cashier's cheques", "A lost cashier's cheque can be replaced after a 90-day waiting period."),
        ],
    ),
    (
        "dormant-accounts.md",
        "Inactive accounts",
        [
            (
                "When an account goes dormant",
                "An account with no customer activity for {dormant_months} is marked "
                "dormant; we write to you before that happens.",
            ),
            ("Waking an account", "Any deposit, withdrawal or login reactivates a dormant account."),
        ],
    ),
    (
        "complaints.md",
        "Complaints",
        [
            (
                "How to complain",
                "Tell any member of the Harbor crew, call the Mooring Line, or write through HarborPay.",
            ),
            ("Our answer", "We reply to every complaint within {complaint_days}."),
        ],
    ),
    (
        "young-savers.md",
        "Accounts for young savers",
        [
            (
                "Age",
                "Crew members from age {minor_age} can open a TideSaver account with a parent or guardian as co-owner.",
            ),
            ("Cards", "Young savers do not receive an Anchor Card until they open HarborFlex Checking."),
        ],
    ),
    (
        "direct-deposit.md",
        "Direct deposit",
        [
            (
                "Setting it up",
                "Give your employer the account and routing numbers shown in HarborPay under Account details.",
            ),
            ("Early pay", "Direct deposits are available up to {early_pay} before the payer's settlement date."),
        ],
    ),
    (
        "branch-deposits.md",
        "Deposits at a branch",
        [
            ("Cash deposits", "Cash deposited at a branch is available immediately."),
            (
                "Cheque holds",
                "The first {branch_hold} of a cheque deposited at a branch is available the next business "
                "day; the rest may be held for up to two more business days.",
            ),
        ],
    ),
    (
        "fraud-alerts.md",
        "Fraud alerts",
        [
            (
                "Text alerts",
                "When we see a card payment that looks unusual we send a text message asking you to confirm it.",
            ),
            ("If you did not make the payment", "Reply NO to the text and the Anchor Card is locked straight away."),
        ],
    ),
    (
        "online-security.md",
        "Online security",
        [
            ("Two-step sign-in", "HarborPay and online banking ask for a one-time code on every new device."),
            ("What we never ask", "The Harbor crew never asks for your full password or a one-time code."),
        ],
    ),
    (
        "closing-an-account.md",
        "Closing an account",
        [
            ("How to close", "Close an account at a branch or on the Mooring Line; there is no closing fee."),
            ("Remaining balance", "Any remaining balance is sent to you by cheque or transferred to another account."),
        ],
    ),
    (
        "accessibility.md",
        "Accessibility",
        [
            ("In branches", "Every branch has step-free access and a hearing loop at the counter."),
            ("Statements in other formats", "Statements in large print or Braille are free on request."),
        ],
    ),
    (
        "about.md",
        "About Harbor Bank",
        [
            (
                "Who we are",
                "Harbor Bank is your bank on the waterfront. Our staff are the Harbor crew and our customers "
                "are crew members.",
            ),
            ("Getting help", "Ask at any branch, in HarborPay, or on the Mooring Line."),
        ],
    ),
]

# (id, question, fact key, answer template, source page, source heading)
QUESTIONS: list[tuple[str, str, str, str, str, str]] = [
    (
        "checking-fee",
        "Roughly what do I pay each month just for having the everyday account?",
        "checking_fee",
        "HarborFlex Checking costs {checking_fee} a month.",
        "checking.md",
        "Monthly fee",
    ),
    (
        "checking-waiver",
        "How much must stay in my everyday account all month so the charge disappears?",
        "waiver_balance",
        "A {waiver_balance} minimum daily balance (or any direct deposit) waives the fee.",
        "checking.md",
        "Fee waiver",
    ),
    (
        "purchase-limit",
        "Is there a cap on how much I can buy in shops with my debit card in a single day?",
        "purchase_limit",
        "Yes: {purchase_limit} a day.",
        "anchor-card.md",
        "Purchase limit",
    ),
    (
        "foreign-fee",
        "Will a restaurant bill paid in yen on my debit card cost extra?",
        None,
        "No: the Anchor Card has no foreign transaction fee.",
        "anchor-card.md",
        "Using the card abroad",
    ),
    (
        "harborpay-limit",
        "What's the most I can send to friends through the app on one day?",
        "harborpay_limit",
        "Up to {harborpay_limit} a day.",
        "harborpay.md",
        "Daily sending limit",
    ),
    (
        "instant-fee",
        "If I want the money to land in minutes, what does the app take for it?",
        "instant_fee",
        "Instant transfers cost {instant_fee} of the amount, at most {instant_cap}.",
        "harborpay-transfers.md",
        "Instant transfers",
    ),
    (
        "standard-speed",
        "How long does a free transfer to a friend take to show up?",
        "standard_days",
        "A standard transfer arrives in {standard_days}.",
        "harborpay-transfers.md",
        "Standard transfers",
    ),
    (
        "rewards-earn",
        "How many points do I collect for each dollar I spend on my card?",
        "points_per_dollar",
        "{points_per_dollar} per dollar.",
        "lighthouse-rewards.md",
        "Earning points",
    ),
    (
        "rewards-value",
        "What are my rewards worth when I cash them in?",
        "points_value",
        "{points_value} of statement credit.",
        "lighthouse-rewards.md",
        "Redeeming points",
    ),
    (
        "phone",
        "Which number do I ring at 3 in the morning if my wallet is gone?",
        "phone",
        "Call the Mooring Line, {phone}.",
        "mooring-line.md",
        "Phone number",
    ),
    (
        "weekday-hours",
        "Until what time can I walk into a branch on a Wednesday?",
        "weekday_hours",
        "Branches are open {weekday_hours} on weekdays.",
        "branch-hours.md",
        "Weekdays",
    ),
    (
        "saturday-hours",
        "Can I visit a branch at the weekend, and when?",
        "saturday_hours",
        "On Saturday, {saturday_hours}; closed on Sunday.",
        "branch-hours.md",
        "Saturday",
    ),
    (
        "domestic-wire",
        "What do you charge to wire money to another bank inside the country?",
        "domestic_wire",
        "A domestic wire costs {domestic_wire}.",
        "wire-transfers.md",
        "Domestic wires",
    ),
    (
        "wire-cutoff",
        "By what time must I ask for a wire so it leaves today?",
        "wire_cutoff",
        "Before {wire_cutoff} Eastern.",
        "wire-transfers.md",
        "Cut-off time",
    ),
    (
        "opening-deposit",
        "What's the smallest amount I can start a new account with?",
        "opening_deposit",
        "The minimum opening deposit is {opening_deposit}.",
        "opening-an-account.md",
        "Opening deposit",
    ),
    (
        "cover-fee",
        "Does moving money from savings to stop my checking going negative cost anything?",
        "cover_fee",
        "No: each Overdraft Cover transfer costs {cover_fee}.",
        "overdraft-cover.md",
        "Transfer fee",
    ),
    (
        "free-withdrawals",
        "How often can I take money out of savings each month before a charge kicks in?",
        "free_withdrawals",
        "{free_withdrawals} free withdrawals a month, then {withdrawal_fee} each.",
        "tidesaver.md",
        "Withdrawals",
    ),
    (
        "dispute-window",
        "How long after the statement do I have to contest a card charge I don't recognise?",
        "dispute_days",
        "Within {dispute_days} of the statement.",
        "card-disputes.md",
        "Time limit",
    ),
]
CHANGED_QUESTIONS: list[tuple[str, str, str, str, str, str]] = [
    (
        "overdraft-fee",
        "I went below zero on my everyday account and you paid the item anyway. What's the charge?",
        "overdraft_fee",
        "The overdraft fee is {overdraft_fee} per item.",
        "overdraft.md",
        "Overdraft fee",
    ),
    (
        "savings-rate",
        "What yearly yield does my savings balance earn?",
        "apy",
        "TideSaver earns {apy} APY.",
        "tidesaver.md",
        "Interest rate",
    ),
    (
        "atm-limit",
        "How much cash can the debit card get me from a machine in one day?",
        "atm_limit",
        "Up to {atm_limit} a day.",
        "anchor-card.md",
        "ATM withdrawal limit",
    ),
    (
        "express-card",
        "My card snapped and I need a new one within two days. What does that cost?",
        "express_card",
        "Express replacement costs {express_card}.",
        "card-replacement.md",
        "Express replacement",
    ),
    (
        "international-wire",
        "What's the charge to send a wire to my sister's bank in Spain?",
        "international_wire",
        "An international wire costs {international_wire}.",
        "wire-transfers.md",
        "International wires",
    ),
    (
        "cheque-limit",
        "How much in cheques can I snap with my phone and deposit in one day?",
        "cheque_limit",
        "Up to {cheque_limit} a day.",
        "mobile-cheque-deposit.md",
        "Daily deposit limit",
    ),
]


def anchor(heading: str) -> str:
    """The anchor a Markdown renderer (GitHub) gives a heading, as polyadapt.retrieval cites it."""
    return re.sub(r"[\s_-]+", "-", re.sub(r"[^\w\s-]", "", heading.lower()).strip()).strip("-")


def page(title: str, sections: list[tuple[str, str]], facts: dict[str, str]) -> str:
    lines = [f"# {title}", ""]
    for heading, text in sections:
        lines += [f"## {heading}", "", text.format(**facts), ""]
    return "\n".join(lines)


def write_pages(target: Path, facts: dict[str, str]) -> None:
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for name, title, sections in PAGES:
        (target / name).write_text(page(title, sections, facts), encoding="utf-8")


def records(questions: list[tuple[str, str, str, str, str, str]], changed: bool) -> list[dict]:
    found = []
    known = {name: {h for h, _ in sections} for name, _, sections in PAGES}
    for ident, question, key, answer, source, heading in questions:
        assert heading in known[source], (source, heading)
        record = {"id": ident, "question": question, "answer_v1": answer.format(**FACTS_V1)}
        if changed:
            record["answer_v2"] = answer.format(**FACTS_V2)
            record["answer_contains"] = [FACTS_V2[key]]
            record["answer_contains_v1"] = [FACTS_V1[key]]
        else:
            record["answer_contains"] = [FACTS_V1[key]] if key else ["no foreign transaction fee"]
        record["source"] = f"{source}#{anchor(heading)}"
        found.append(record)
    return found


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    assert set(CHANGES) <= set(FACTS_V1) and len(CHANGES) == 6
    assert sorted(q[2] for q in CHANGED_QUESTIONS) == sorted(CHANGES)
    assert not {q[2] for q in QUESTIONS} & set(CHANGES)
    write_pages(HERE / "policies_v1", FACTS_V1)
    write_pages(HERE / "policies_v2", FACTS_V2)
    write_jsonl(HERE / "questions_unchanged.jsonl", records(QUESTIONS, changed=False))
    write_jsonl(HERE / "questions_changed.jsonl", records(CHANGED_QUESTIONS, changed=True))
    print(f"{len(PAGES)} pages x 2 versions, {len(QUESTIONS)} unchanged and {len(CHANGED_QUESTIONS)} changed questions")


if __name__ == "__main__":
    main()
