"""Write the Harbor Bank customer-support corpus: train.jsonl (chat) and validation.jsonl (held-out questions), and
the general set general/validation.jsonl (the forgetting check).

Every policy fact has training questions (several phrasings), answers in the bank's voice that state the fact first,
and held-out questions that ask the same fact in words the training set never uses, with ``answer_contains``.
The general set asks 12 everyday questions outside banking that SmolLM2-135M-Instruct answers right before any
adaptation, with plain answers (no bank voice): ``eval.general_data: auto`` measures them before and after.
Deterministic: running it twice writes the same bytes. Run from anywhere: ``python sample_data/text/make_corpus.py``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIGN_OFF = "Fair winds!"

# (key, training questions, answers (one is picked per question, cycling), held-out questions, answer_contains)
FACTS: list[tuple[str, list[str], list[str], list[str], list[str]]] = [
    (
        "checking_fee",
        [
            "What is the monthly fee for HarborFlex Checking?",
            "How much does HarborFlex Checking cost each month?",
            "Is there a monthly charge on my HarborFlex account?",
            "What's the maintenance fee on HarborFlex Checking?",
            "Do I pay anything per month for HarborFlex Checking?",
            "How much is the HarborFlex monthly service fee?",
            "what does harborflex checking charge monthly",
            "Can you tell me the monthly fee on my checking account?",
        ],
        [
            "HarborFlex Checking has a $6 monthly fee, waived with a $500 minimum daily balance or any direct deposit.",
            "The HarborFlex Checking monthly fee is $6, and we waive it when you keep $500 in the account or have a direct deposit.",
        ],
        [
            "I'm thinking of opening HarborFlex Checking. What will it set me back every month?",
            "Every month there's a small fee on my HarborFlex Checking statement. How big is it supposed to be?",
        ],
        ["$6"],
    ),
    (
        "checking_waiver",
        [
            "How can I avoid the HarborFlex monthly fee?",
            "What balance do I need to skip the HarborFlex fee?",
            "Is there a way to get the checking fee waived?",
            "How do I get the HarborFlex Checking fee removed?",
            "What minimum balance waives the monthly fee?",
            "Can the HarborFlex fee be waived?",
            "how to not pay the checking monthly fee",
        ],
        [
            "Keep a $500 minimum daily balance or have any direct deposit, and the $6 HarborFlex Checking fee is waived.",
            "The HarborFlex fee is waived with a $500 minimum daily balance or any direct deposit into the account.",
        ],
        [
            "How much money has to sit in HarborFlex so I'm not charged the monthly fee?",
            "My friend never pays the HarborFlex fee. How does she get it waived?",
        ],
        ["$500"],
    ),
    (
        "overdraft_fee",
        [
            "What is the overdraft fee?",
            "How much do you charge if I overdraw my account?",
            "What happens fee-wise if I go below zero in HarborFlex?",
            "How much is an overdraft charge at Harbor Bank?",
            "Is there a fee for overdrawing my checking account?",
            "What's the penalty for an overdraft?",
            "overdraft fee amount?",
        ],
        [
            "The overdraft fee is $25 per item, charged at most 2 times a day.",
            "An overdraft costs $25, and we never charge more than 2 overdraft fees in one day.",
        ],
        [
            "I spent more than I had in HarborFlex by accident. What will the overdraft cost me?",
            "If a payment pushes my balance negative, what overdraft charge applies?",
        ],
        ["$25"],
    ),
    (
        "tidesaver_apy",
        [
            "What interest rate does TideSaver pay?",
            "What's the APY on a TideSaver account?",
            "How much interest do I earn with TideSaver?",
            "What is the TideSaver savings rate?",
            "Does TideSaver pay interest, and how much?",
            "tidesaver apy?",
            "What yield does the TideSaver account have?",
            "How good is the TideSaver rate?",
        ],
        [
            "TideSaver pays 3.10% APY, with no monthly fee.",
            "The TideSaver rate is 3.10% APY, and there is no monthly fee.",
        ],
        [
            "If I park my savings in TideSaver, what annual return will I get on that balance?",
            "What percentage does TideSaver earn per year?",
        ],
        ["3.10%"],
    ),
    (
        "tidesaver_withdrawals",
        [
            "How many withdrawals can I make from TideSaver?",
            "Is there a limit on TideSaver withdrawals?",
            "How many free withdrawals does TideSaver include?",
            "What does it cost to withdraw from TideSaver too often?",
            "Can I take money out of TideSaver whenever I want?",
            "tidesaver withdrawal limit",
            "How often can I pull money from my TideSaver account for free?",
        ],
        [
            "TideSaver includes 6 free withdrawals a month; after that each one costs $2.",
            "You get 6 free withdrawals a month from TideSaver, then $2 per extra withdrawal.",
        ],
        [
            "How many times a month may I move cash out of TideSaver without paying?",
            "I keep taking money out of my TideSaver. When do you start charging me?",
        ],
        ["6 free withdrawals"],
    ),
    (
        "atm_limit",
        [
            "What is the daily ATM limit on the Anchor Card?",
            "How much cash can I withdraw per day with my Anchor Card?",
            "What's the maximum ATM withdrawal with the Anchor Card?",
            "Is there a limit on ATM withdrawals?",
            "How much can I take out at an ATM in one day?",
            "anchor card atm limit",
            "What's my daily cash withdrawal limit?",
            "Can I withdraw $1,000 at the ATM today with my Anchor Card?",
        ],
        [
            "The Anchor Card daily ATM withdrawal limit is $800.",
            "You can withdraw up to $800 a day at ATMs with your Anchor Card.",
        ],
        [
            "What's the most money I can get from a cash machine in a single day using my Anchor Card?",
            "I need a lot of cash from the ATM today. What's the ceiling on my Anchor Card?",
        ],
        ["$800"],
    ),
    (
        "purchase_limit",
        [
            "What is the daily purchase limit on the Anchor Card?",
            "How much can I spend per day with my Anchor Card?",
            "Is there a spending limit on the Anchor Card?",
            "What's the maximum I can pay by card in one day?",
            "anchor card daily spending limit",
            "How much can I buy with my debit card each day?",
            "Will my Anchor Card work for a big purchase?",
        ],
        [
            "The Anchor Card daily purchase limit is $5,000.",
            "You can spend up to $5,000 a day with your Anchor Card.",
        ],
        [
            "I'm buying a new laptop and a TV today. How much can go on my Anchor Card before it's declined?",
            "What's the cap on Anchor Card payments in a single day?",
        ],
        ["$5,000"],
    ),
    (
        "foreign_fee",
        [
            "Does the Anchor Card charge a foreign transaction fee?",
            "Can I use my Anchor Card abroad without fees?",
            "Are there fees for using my card in another currency?",
            "What does it cost to use the Anchor Card overseas?",
            "foreign transaction fee anchor card?",
            "Will I pay extra for purchases abroad?",
            "Is the Anchor Card good for travel?",
        ],
        [
            "The Anchor Card has no foreign transaction fee, so you can use it abroad at no extra cost.",
            "There is no foreign transaction fee on the Anchor Card.",
        ],
        [
            "I'm going on holiday to Portugal. Will paying with my Anchor Card in euros cost me extra?",
            "Do purchases in other countries add a surcharge to my Anchor Card?",
        ],
        ["no foreign transaction fee"],
    ),
    (
        "express_card",
        [
            "How much does a replacement Anchor Card cost?",
            "What's the fee for an express replacement card?",
            "Can I get a new card fast, and what does it cost?",
            "How much is it to rush a replacement Anchor Card?",
            "replacement card fee?",
            "My card is damaged, how much is a new one?",
            "What does express delivery of a card cost?",
        ],
        [
            "A replacement Anchor Card is free; express replacement costs $15.",
            "Standard replacement cards are free, and express replacement is $15.",
        ],
        [
            "My Anchor Card snapped in half and I need an express replacement. Is there a charge?",
            "What do you charge to send a replacement card by express?",
        ],
        ["$15"],
    ),
    (
        "harborpay_limit",
        [
            "How much can I send with HarborPay?",
            "What is the HarborPay daily transfer limit?",
            "Is there a limit on HarborPay transfers?",
            "What's the maximum I can send to a friend in HarborPay?",
            "harborpay limit per day",
            "How much money can I transfer in the app each day?",
            "Can I send $3,000 through HarborPay today?",
            "What are HarborPay's sending limits?",
        ],
        [
            "HarborPay lets you send up to $2,500 a day.",
            "The HarborPay daily sending limit is $2,500.",
        ],
        [
            "What's the most I can pay another person through HarborPay in one day?",
            "I owe my landlord rent and want to pay through HarborPay. How high can a day's transfers go?",
        ],
        ["$2,500"],
    ),
    (
        "instant_fee",
        [
            "What does an instant HarborPay transfer cost?",
            "Is there a fee for instant transfers?",
            "How much is the instant transfer fee in HarborPay?",
            "Do you charge for instant transfers?",
            "instant transfer fee harborpay",
            "What's the cost of sending money instantly?",
            "Why was I charged for an instant transfer?",
        ],
        [
            "An instant HarborPay transfer costs 1% of the amount, at most $10.",
            "Instant transfers in HarborPay cost 1%, capped at $10.",
        ],
        [
            "If I want HarborPay money to arrive instantly, what percentage do you take?",
            "What is the charge for an instant payment in HarborPay?",
        ],
        ["1%"],
    ),
    (
        "standard_transfer",
        [
            "How long does a standard HarborPay transfer take?",
            "When will my HarborPay transfer arrive?",
            "Is a standard transfer free, and how long is it?",
            "How many days does a regular HarborPay transfer take?",
            "standard transfer time?",
            "My friend hasn't got my HarborPay payment yet. How long should it take?",
            "What's the timing for free transfers?",
        ],
        [
            "A standard HarborPay transfer is free and arrives in 1-3 business days.",
            "Standard transfers are free and take 1-3 business days.",
        ],
        [
            "If I pick the free standard option in HarborPay, when does the money land?",
            "How long is the wait for an ordinary standard HarborPay payment?",
        ],
        ["1-3 business days"],
    ),
    (
        "lock_card",
        [
            "How do I freeze my Anchor Card?",
            "Can I lock my card in the app?",
            "Where do I lock my Anchor Card in HarborPay?",
            "I misplaced my card, how can I freeze it?",
            "lock card harborpay",
            "How do I temporarily block my debit card?",
            "Is there a way to switch my card off?",
        ],
        [
            "Open HarborPay and go to Anchor Card > Lock card; you can unlock it there too.",
            "You can freeze it in HarborPay under Anchor Card > Lock card.",
        ],
        [
            "I think my Anchor Card fell out of my pocket. Where in HarborPay do I lock it for now?",
            "What's the menu path in HarborPay to lock my Anchor Card?",
        ],
        ["Lock card"],
    ),
    (
        "rewards_rate",
        [
            "How many Lighthouse Rewards points do I earn?",
            "What's the points rate on the Anchor Card?",
            "How do Lighthouse Rewards points work?",
            "How many points per dollar do I get?",
            "lighthouse rewards earn rate",
            "Do I earn rewards on card purchases?",
            "What do I get for spending with my Anchor Card?",
        ],
        [
            "You earn 2 points per dollar spent with the Anchor Card in Lighthouse Rewards.",
            "Lighthouse Rewards gives 2 points for every dollar you spend with the Anchor Card.",
        ],
        [
            "When I buy groceries with my Anchor Card, how many Lighthouse Rewards points does each dollar give me?",
            "What's the earning rate of Lighthouse Rewards?",
        ],
        ["2 points"],
    ),
    (
        "rewards_value",
        [
            "What are Lighthouse Rewards points worth?",
            "How much is 1,000 points worth?",
            "How do I redeem Lighthouse Rewards?",
            "What can I get for my points?",
            "lighthouse points value",
            "How much cash are my rewards points?",
            "Can I turn my points into money?",
        ],
        [
            "1,000 Lighthouse Rewards points are worth $10.",
            "Every 1,000 Lighthouse Rewards points redeem for $10.",
        ],
        [
            "I've collected 1,000 Lighthouse Rewards points. What's that in dollars?",
            "What is the cash value of Lighthouse Rewards points?",
        ],
        ["$10"],
    ),
    (
        "phone",
        [
            "What is the Mooring Line number?",
            "How do I call Harbor Bank?",
            "What's your customer service phone number?",
            "How do I report a stolen card by phone?",
            "mooring line phone",
            "Can I call someone at night about my card?",
            "What number do I ring for help?",
            "Is your phone line open 24/7?",
        ],
        [
            "Call the Mooring Line at 1-800-555-0142, open 24/7, including for lost or stolen cards.",
            "The Mooring Line is 1-800-555-0142, and it's open 24/7.",
        ],
        [
            "It's 2 am and my wallet was taken. Which Mooring Line number do I dial?",
            "What telephone number should I use to reach the Mooring Line?",
        ],
        ["1-800-555-0142"],
    ),
    (
        "weekday_hours",
        [
            "What are your branch hours on weekdays?",
            "When are Harbor Bank branches open?",
            "What time do branches open Monday to Friday?",
            "What time does the branch close on weekdays?",
            "branch opening hours",
            "Are you open on Tuesday afternoon?",
            "What are your opening times during the week?",
        ],
        [
            "Branches are open Monday to Friday, 9 am to 5 pm.",
            "Our branches open 9 am to 5 pm, Monday to Friday.",
        ],
        [
            "I want to visit a branch after work on Wednesday. What are the branch hours?",
            "During the working week, when can I walk into a Harbor Bank branch?",
        ],
        ["9 am to 5 pm"],
    ),
    (
        "saturday_hours",
        [
            "Are branches open on Saturday?",
            "What are the Saturday branch hours?",
            "When do branches close on Saturday?",
            "Can I visit a branch on the weekend?",
            "saturday hours?",
            "What time do you open on Saturdays?",
            "Is the branch open Saturday afternoon?",
        ],
        [
            "On Saturday branches are open 9 am to 1 pm; they are closed on Sunday.",
            "Saturday hours are 9 am to 1 pm, and branches are closed on Sunday.",
        ],
        [
            "I can only come in at the weekend. When exactly is the branch open on Saturday?",
            "What are your branch hours at the end of the week, on Saturday?",
        ],
        ["9 am to 1 pm"],
    ),
    (
        "domestic_wire",
        [
            "How much is a domestic wire transfer?",
            "What's the fee to send a wire within the US?",
            "What does an outgoing domestic wire cost?",
            "domestic wire fee",
            "How much do you charge for a wire to another US bank?",
            "Is there a fee for domestic wires?",
            "What's the cost of wiring money in the country?",
        ],
        [
            "A domestic wire transfer costs $20.",
            "Outgoing domestic wires cost $20 each.",
        ],
        [
            "I need to send a domestic wire to a title company in Ohio. What will you charge?",
            "What is the price of a domestic wire to a bank inside the United States?",
        ],
        ["$20"],
    ),
    (
        "international_wire",
        [
            "How much is an international wire transfer?",
            "What's the fee to wire money abroad?",
            "What does an international wire cost?",
            "international wire fee",
            "How much do you charge to send a wire overseas?",
            "Can I wire money to another country, and what's the fee?",
            "What's the cost of a foreign wire?",
        ],
        [
            "An international wire transfer costs $35.",
            "International wires cost $35 each.",
        ],
        [
            "My sister lives in Canada and I want to send her an international wire. What's your fee?",
            "What do you charge for an international wire?",
        ],
        ["$35"],
    ),
    (
        "wire_cutoff",
        [
            "What is the cut-off time for same-day wires?",
            "When do I need to send a wire for it to go today?",
            "What's the wire cut-off?",
            "wire cutoff time",
            "By what time must I submit a wire for same-day processing?",
            "Is there a deadline for wires each day?",
            "If I send a wire at 4 pm, will it go today?",
        ],
        [
            "The same-day wire cut-off is 3 pm Eastern.",
            "Wires sent before 3 pm Eastern go out the same day.",
        ],
        [
            "What's the latest hour I can request a wire and still have it go out the same day?",
            "Until when in the afternoon is the same-day wire cut-off?",
        ],
        ["3 pm"],
    ),
    (
        "cheque_deposit",
        [
            "How much can I deposit by cheque in HarborPay?",
            "What is the mobile cheque deposit limit?",
            "When are funds from a mobile deposit available?",
            "Can I deposit a check in the app?",
            "mobile deposit limit",
            "How much can I deposit with my phone per day?",
            "Is there a limit on app cheque deposits?",
        ],
        [
            "HarborPay takes cheque deposits up to $3,000 a day, available the next business day.",
            "You can deposit up to $3,000 a day by cheque in HarborPay; funds arrive the next business day.",
        ],
        [
            "I got a paper cheque for my birthday. How much can I deposit through HarborPay in a single day?",
            "What's the daily cap on cheque deposits in HarborPay?",
        ],
        ["$3,000"],
    ),
    (
        "opening_deposit",
        [
            "What is the minimum deposit to open an account?",
            "How much do I need to open a HarborFlex account?",
            "What do I need to open an account?",
            "Is there a minimum opening deposit?",
            "opening deposit amount",
            "How much money do I need to start a TideSaver account?",
            "What documents and deposit do I need to open an account?",
        ],
        [
            "The minimum opening deposit is $25; bring photo ID and proof of address.",
            "You need a $25 minimum opening deposit, photo ID and proof of address.",
        ],
        [
            "What's the smallest opening deposit for a new Harbor Bank account?",
            "To open an account, how much money must I put in on day one?",
        ],
        ["$25", "opening deposit"],
    ),
    (
        "overdraft_cover",
        [
            "What is Safe Harbor Overdraft Cover?",
            "How does overdraft protection work?",
            "Does Safe Harbor Overdraft Cover cost anything?",
            "Can I link my savings to cover overdrafts?",
            "overdraft cover fee",
            "How do I avoid overdraft fees?",
            "What's the transfer fee for overdraft cover?",
        ],
        [
            "Safe Harbor Overdraft Cover links TideSaver to HarborFlex and moves money to cover overdrafts for a $0 transfer fee.",
            "With Safe Harbor Overdraft Cover, TideSaver covers HarborFlex overdrafts and the transfer fee is $0.",
        ],
        [
            "Can Safe Harbor Overdraft Cover pull from my savings when checking runs dry, and what would that cost?",
            "What does Safe Harbor Overdraft Cover charge to move money from TideSaver?",
        ],
        ["$0"],
    ),
]

GREETINGS = [
    ("Hi!", "Hello and welcome aboard Harbor Bank! How can the Harbor crew help you today?"),
    ("Thanks for your help.", "You're very welcome, crew member. We're always here when you need us."),
    ("Who am I talking to?", "You're chatting with the Harbor crew, Harbor Bank's support team."),
    (
        "Can you give me investment advice?",
        "I'm sorry, the Harbor crew can't give investment advice, but a branch adviser can talk it through with you.",
    ),
    (
        "What's the weather today?",
        "I can only help with Harbor Bank accounts and services, but I'm happy to answer any banking question.",
    ),
    (
        "I want to complain.",
        "I'm sorry to hear that. Tell me what happened, or call the Mooring Line at 1-800-555-0142 and the Harbor crew will sort it out.",
    ),
    (
        "What is HarborPay?",
        "HarborPay is Harbor Bank's mobile app: send money to friends, deposit cheques and manage your Anchor Card.",
    ),
    ("What is the Anchor Card?", "The Anchor Card is the Visa debit card that comes with HarborFlex Checking."),
]

SYSTEM_PROMPT = "You are the Harbor Bank support assistant."

# (question, plain answer, answer_contains): general knowledge, chosen from 24 candidates as the ones whose greedy
# answer from the demo base (SmolLM2-135M-Instruct) already contains the fact
GENERAL = [
    ("What is the capital of France?", "The capital of France is Paris.", ["Paris"]),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo.", ["Tokyo"]),
    ("Which planet is known as the Red Planet?", "Mars is known as the Red Planet.", ["Mars"]),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet.", ["Shakespeare"]),
    ("What is the chemical formula for water?", "The chemical formula for water is H2O.", ["H2O"]),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth.", ["Pacific"]),
    ("What gas do plants absorb from the air?", "Plants absorb carbon dioxide from the air.", ["carbon dioxide"]),
    ("What is the opposite of hot?", "The opposite of hot is cold.", ["cold"]),
    ("What is the tallest mountain in the world?", "Mount Everest is the tallest mountain in the world.", ["Everest"]),
    ("What language is spoken in Brazil?", "The main language of Brazil is Portuguese.", ["Portuguese"]),
    ("What is the currency of the United Kingdom?", "The currency of the United Kingdom is the pound sterling.", ["pound"]),
    (
        "Who was the first person to walk on the Moon?",
        "Neil Armstrong was the first person to walk on the Moon.",
        ["Armstrong"],
    ),
]


def chat(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": f"{answer} {SIGN_OFF}"}]


def build() -> tuple[list[dict], list[dict]]:
    """The training and held-out records, in a fixed shuffled order."""
    train: list[dict] = []
    heldout: list[dict] = []
    for key, questions, answers, tests, facts in FACTS:
        for i, question in enumerate(questions):
            train.append({"id": f"{key}-{i}", "messages": chat(question, answers[i % len(answers)])})
        for i, question in enumerate(tests):
            heldout.append({"id": f"{key}-test-{i}", "messages": chat(question, answers[0]), "answer_contains": facts})
    for i, (question, answer) in enumerate(GREETINGS):
        train.append({"id": f"general-{i}", "messages": chat(question, answer)})
    random.Random(7).shuffle(train)
    return train, heldout


def build_general() -> list[dict]:
    """The general set: one chat per question, the plain answer as the reference."""
    return [
        {
            "id": f"general-test-{i}",
            "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "answer_contains": facts,
        }
        for i, (question, answer, facts) in enumerate(GENERAL)
    ]


def write(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


if __name__ == "__main__":
    train, heldout = build()
    write(HERE / "train.jsonl", train)
    write(HERE / "validation.jsonl", heldout)
    general = build_general()
    write(HERE / "general" / "validation.jsonl", general)
    print(f"wrote {len(train)} training, {len(heldout)} held-out and {len(general)} general records to {HERE}")
