"""Write the Bramblecote Vets support corpus, a text domain polyadapt was never tuned on: text/train.jsonl and
text/validation.jsonl, in the same chat format as sample_data/text (see benchmarks/unseen/README.md).

Bramblecote Vets is a fictional chain of veterinary clinics. Each of its 25 facts has 7 to 9 training questions, two
answers in the clinic's voice (the fact in the first sentence, a practical tip after it, the sign-off last) and two
held-out questions that ask for the fact in words no training question uses, each with ``answer_contains``.
Deterministic: ``python benchmarks/unseen/make_text.py`` writes the same bytes every time.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

OUT = Path(__file__).resolve().parent / "text"
SIGN_OFF = "Happy tails from the Bramblecote team!"


@dataclass(frozen=True)
class Fact:
    key: str
    asked: tuple[str, ...]  # training questions
    said: tuple[str, str]  # two answers, used in turn
    held_out: tuple[str, str]  # questions for validation.jsonl only
    contains: tuple[str, ...]  # what a correct answer must state


FACTS = [
    Fact(
        "pawpath_dog",
        (
            "How much is the PawPath Plan for a dog?",
            "What does PawPath cost per month for dogs?",
            "dog wellness plan price",
            "Is the PawPath Plan expensive for my labrador?",
            "What's the monthly PawPath fee if I sign up my puppy?",
            "Could you quote me the PawPath Plan for a canine?",
            "How much will I pay each month to put my dog on PawPath?",
            "PawPath monthly cost dog?",
        ),
        (
            "The PawPath Plan for dogs is $34 a month. It is billed on the 1st and you can join at any Bramblecote clinic.",
            "Dogs join the PawPath Plan for $34 a month, taken by direct debit on the 1st.",
        ),
        (
            "My spaniel needs regular care and I'm weighing up your wellness membership. What would that run me monthly for him?",
            "For a canine member, what is the monthly subscription price of PawPath?",
        ),
        ("$34",),
    ),
    Fact(
        "pawpath_cat",
        (
            "How much is the PawPath Plan for a cat?",
            "What does PawPath cost for cats?",
            "cat wellness plan price per month",
            "Is PawPath cheaper for a kitten?",
            "What's the feline PawPath fee?",
            "How much do I pay monthly to put my cat on the PawPath Plan?",
            "Price of PawPath for my moggy?",
            "Is there a PawPath Plan price just for cats?",
        ),
        (
            "The PawPath Plan for cats is $27 a month. Kittens can join from 8 weeks old.",
            "Cats join the PawPath Plan for $27 a month, and kittens are welcome from 8 weeks.",
        ),
        (
            "We've just adopted a tabby. If we enrol her in your wellness membership, what's the monthly charge?",
            "What monthly amount does Bramblecote ask for a cat's PawPath membership?",
        ),
        ("$27",),
    ),
    Fact(
        "pawpath_checkups",
        (
            "How many check-ups does PawPath include?",
            "What health checks come with the PawPath Plan?",
            "Does PawPath cover check-ups?",
            "pawpath checkups per year",
            "How often can I bring my pet for a check on PawPath?",
            "What's included in PawPath apart from vaccines?",
            "Do PawPath members get free examinations?",
            "Are yearly check-ups part of the PawPath Plan?",
        ),
        (
            "PawPath includes 2 check-ups a year with a vet, plus every core vaccine. Book them through the VetLink app.",
            "Every PawPath member gets 2 check-ups a year and all core vaccines at no extra cost.",
        ),
        (
            "On the wellness membership, how many times a year is a vet health examination covered?",
            "I'm trying to plan my rabbit's visits. How many routine examinations are bundled into his PawPath membership?",
        ),
        ("2 check-ups",),
    ),
    Fact(
        "consultation",
        (
            "How much is a standard consultation?",
            "What do you charge for a vet appointment?",
            "consultation fee",
            "What's the price of seeing a vet at Bramblecote?",
            "How much does a normal appointment cost if I'm not on PawPath?",
            "What is the fee for a regular consult?",
            "How much to have my dog looked at?",
            "Cost of a 15-minute vet consultation?",
        ),
        (
            "A standard consultation is $58 and lasts 15 minutes. PawPath members pay nothing for their 2 yearly check-ups.",
            "Our standard 15-minute consultation costs $58.",
        ),
        (
            "My hamster seems off colour and I'd like a vet to take a look during the day. What will the visit itself be billed at?",
            "Without any membership, what does one daytime appointment with a Bramblecote vet set me back?",
        ),
        ("$58",),
    ),
    Fact(
        "out_of_hours",
        (
            "How much is an emergency consultation at night?",
            "What do out-of-hours appointments cost?",
            "emergency vet fee after hours",
            "What's the price if I need a vet on a Sunday night?",
            "Is it more expensive to see a vet outside opening hours?",
            "How much is the after-hours emergency consult?",
            "What will a 2 am emergency visit cost me?",
            "Out of hours consult price?",
        ),
        (
            "An out-of-hours emergency consultation is $145. Call the NightPaw line first so the vet is ready for you.",
            "Emergency consultations outside opening hours cost $145.",
        ),
        (
            "My cat ate a lily late in the evening and every clinic is closed. What is the fee to have her seen urgently tonight?",
            "What is charged for an urgent visit after the clinic has shut for the day?",
        ),
        ("$145",),
    ),
    Fact(
        "nightpaw_number",
        (
            "What is the NightPaw number?",
            "How do I call your emergency line?",
            "emergency phone number",
            "Which number do I ring if my pet is ill at night?",
            "What's the out-of-hours phone line?",
            "Is there a number for pet emergencies?",
            "How can I reach a vet by phone in an emergency?",
            "NightPaw line?",
        ),
        (
            "The NightPaw emergency line is 1-888-555-0193, answered by a vet nurse 24 hours a day.",
            "Call NightPaw on 1-888-555-0193 at any hour; a vet nurse answers.",
        ),
        (
            "My dog has collapsed and it's midnight. What digits do I dial to get Bramblecote's urgent help?",
            "Can you give me the telephone number of the NightPaw service?",
        ),
        ("1-888-555-0193",),
    ),
    Fact(
        "booster",
        (
            "How much is an annual booster?",
            "What does a yearly vaccination cost?",
            "booster jab price",
            "How much do you charge for my dog's booster?",
            "What's the cost of a vaccine booster without PawPath?",
            "Price of the yearly cat vaccination?",
            "How much for annual jabs?",
            "Do you charge much for a booster if I pay as I go?",
        ),
        (
            "An annual booster vaccination is $49, or free on the PawPath Plan.",
            "Yearly boosters cost $49; PawPath members pay nothing for them.",
        ),
        (
            "My collie's yearly shots are due and we aren't members. How much are they?",
            "What is the charge for the once-a-year top-up vaccination?",
        ),
        ("$49",),
    ),
    Fact(
        "microchip",
        (
            "How much does microchipping cost?",
            "What's the fee to microchip my puppy?",
            "microchip price",
            "Do you microchip cats, and for how much?",
            "How much to chip my dog?",
            "What does it cost to get a microchip fitted?",
            "Is microchipping expensive at Bramblecote?",
            "How much is it to put a chip in my rabbit?",
        ),
        (
            "Microchipping costs $22, including registration on the national database.",
            "We fit a microchip for $22, and that includes registering it.",
        ),
        (
            "I'd like a tiny ID implanted in my new kitten so she can be traced if she wanders. What's your price for that?",
            "How much does Bramblecote charge to implant an identification chip?",
        ),
        ("$22",),
    ),
    Fact(
        "dental",
        (
            "How much is a dental clean for my dog?",
            "What does a scale and polish cost?",
            "pet dental cleaning price",
            "How much do you charge for teeth cleaning?",
            "What's the cost of a dental under anaesthetic?",
            "My cat needs her teeth done, how much is it?",
            "Price of a dental scale?",
            "Can you give me a price for a dog teeth clean?",
        ),
        (
            "A dental scale and polish starts at $289, anaesthetic included. Extractions are priced after the vet's exam.",
            "Our scale and polish is from $289, including the anaesthetic.",
        ),
        (
            "The vet says my terrier has tartar build-up and needs a professional clean. Roughly what will that cost?",
            "What is the starting price for having a pet's teeth cleaned under general anaesthetic?",
        ),
        ("$289",),
    ),
    Fact(
        "weekday_hours",
        (
            "What are your opening hours on weekdays?",
            "When do the clinics close Monday to Friday?",
            "clinic hours weekdays",
            "How late are you open on a Wednesday?",
            "What time do Bramblecote clinics open during the week?",
            "Are you open in the evening?",
            "What are your weekday times?",
            "Can I come in after work on a Thursday?",
        ),
        (
            "Our clinics are open 8 am to 7:30 pm, Monday to Friday. Evening slots go quickly, so book ahead in VetLink.",
            "Monday to Friday we are open from 8 am to 7:30 pm.",
        ),
        (
            "I finish my shift at six on Tuesdays. Until what time could I still walk in, and when do your doors open in the morning?",
            "During the working week, between which times can I visit a Bramblecote clinic?",
        ),
        ("7:30 pm",),
    ),
    Fact(
        "sunday_hours",
        (
            "Are you open on Sundays?",
            "What are the Sunday hours?",
            "sunday opening times",
            "Can I see a vet on a Sunday?",
            "Which clinic opens on Sunday?",
            "Is any Bramblecote clinic open at the weekend?",
            "When can I come in on Sunday?",
            "Sunday vet near me, what time?",
        ),
        (
            "On Sundays only our Riverside clinic is open, from 10 am to 2 pm. For emergencies outside that, call NightPaw.",
            "Riverside is our Sunday clinic, open 10 am to 2 pm.",
        ),
        (
            "My only free day is the Sabbath. Is there anywhere in your group I can take my parrot then, and at what times?",
            "At the end of the weekend, when are your doors open and where?",
        ),
        ("10 am to 2 pm",),
    ),
    Fact(
        "repeat_rx",
        (
            "How do I order a repeat prescription?",
            "Where do I reorder my dog's medication in the app?",
            "repeat prescription vetlink",
            "Can I request more tablets online?",
            "How do I get a refill of my cat's medicine?",
            "Where in VetLink are prescriptions?",
            "Is there a way to reorder flea treatment in the app?",
            "Which app tab is for repeat medicine?",
        ),
        (
            "Open the VetLink app and tap the Repeat Rx tab, then choose the medicine to reorder.",
            "In VetLink, the Repeat Rx tab lets you reorder any current prescription.",
        ),
        (
            "My greyhound's arthritis pills are running low. Which part of your app do I use to ask for more?",
            "What's the name of the VetLink section for asking for more of an ongoing medicine?",
        ),
        ("Repeat Rx",),
    ),
    Fact(
        "rx_turnaround",
        (
            "How long does a repeat prescription take?",
            "When will my pet's medication be ready?",
            "prescription ready time",
            "How soon can I collect a refill?",
            "How long do you need to prepare a prescription?",
            "If I order tablets today, when can I pick them up?",
            "What's the wait for repeat medication?",
            "How many days until a repeat prescription is ready?",
        ),
        (
            "Repeat prescriptions are ready to collect within 48 hours. You get a VetLink notification when they are.",
            "Allow 48 hours for a repeat prescription to be ready.",
        ),
        (
            "I've just asked for more of my dog's heart medicine. How many hours should I wait before coming to fetch it?",
            "Once I place a refill request, what is the usual turnaround before it's waiting at the desk?",
        ),
        ("48 hours",),
    ),
    Fact(
        "bramble_points_earn",
        (
            "How many Bramble Points do I earn?",
            "What's the points rate for spending at the clinic?",
            "bramble points per dollar",
            "Do I get loyalty points on vet bills?",
            "How does Bramble Points earning work?",
            "How many points for every dollar I spend?",
            "Do food purchases earn Bramble Points?",
            "What do I earn in Bramble Points on a $100 bill?",
        ),
        (
            "You earn 5 points for every dollar spent at Bramblecote, on treatment and food alike.",
            "Bramble Points gives 5 points per dollar you spend with us.",
        ),
        (
            "If I spend a dollar on my budgie's check-up, how many loyalty points land in my account?",
            "What is the earning rate of the clinic's reward scheme?",
        ),
        ("5 points",),
    ),
    Fact(
        "bramble_points_value",
        (
            "What are Bramble Points worth?",
            "How do I redeem my Bramble Points?",
            "bramble points value",
            "How much is 1,000 points worth?",
            "Can I pay a bill with my points?",
            "What can I get with Bramble Points?",
            "How many points make a dollar?",
            "Redeem bramble points for money?",
        ),
        (
            "Every 1,000 Bramble Points are worth $4 off any bill. Redeem them at the desk or in VetLink.",
            "1,000 Bramble Points take $4 off your bill.",
        ),
        (
            "I've built up a thousand loyalty points. What discount does that give me?",
            "In cash terms, what is a block of 1,000 reward points worth at your clinics?",
        ),
        ("$4 off",),
    ),
    Fact(
        "referral",
        (
            "Do you have a refer-a-friend offer?",
            "What do I get for recommending Bramblecote?",
            "referral reward",
            "Is there a bonus if my friend registers her dog?",
            "How does the referral scheme work?",
            "Can I earn credit by referring someone?",
            "What's the reward for a referral?",
            "Do I get money off for bringing in a new client?",
        ),
        (
            "Refer a friend and you both get $20 credit once their pet has its first visit.",
            "Our referral offer gives you and your friend $20 credit each after their pet's first appointment.",
        ),
        (
            "My neighbour is looking for a new vet for her ferret. If she joins because of me, what's in it for us?",
            "What credit does a recommendation earn when a new client signs up?",
        ),
        ("$20 credit",),
    ),
    Fact(
        "cancellation",
        (
            "How much notice do I need to cancel an appointment?",
            "What is your cancellation policy?",
            "cancel appointment notice",
            "Can I cancel on the same day?",
            "When is the latest I can cancel without paying?",
            "How late can I rearrange my booking?",
            "Is there a deadline for cancelling a visit?",
            "Do you charge if I cancel my appointment?",
        ),
        (
            "Please cancel at least 12 hours before your appointment; later cancellations are charged $18.",
            "Cancellations need 12 hours' notice, otherwise an $18 fee applies.",
        ),
        (
            "Something came up for tomorrow morning's booking. By when must I call off my visit so that I'm not billed?",
            "What's the minimum warning you need before I drop an appointment?",
        ),
        ("12 hours",),
    ),
    Fact(
        "missed_fee",
        (
            "What is the late cancellation fee?",
            "How much do you charge for a missed appointment?",
            "no-show fee",
            "What's the charge if I forget my booking?",
            "Is there a penalty for not turning up?",
            "How much if I cancel too late?",
            "What do I pay for a missed vet slot?",
            "I missed my appointment, is there a charge?",
        ),
        (
            "A missed appointment or late cancellation is charged $18.",
            "We charge $18 for a no-show or a cancellation with under 12 hours' notice.",
        ),
        (
            "I completely forgot my cat's booking yesterday. How much will appear on my account for that?",
            "What amount is billed when a client doesn't show up for their slot?",
        ),
        ("$18",),
    ),
    Fact(
        "boarding",
        (
            "How much is boarding at Snug Kennels?",
            "What do you charge per night for boarding?",
            "kennel price per night",
            "Can my dog stay with you while I'm away, and how much?",
            "What's the nightly rate at Snug Kennels?",
            "How much does it cost to board a cat?",
            "Snug Kennels price?",
            "How much is overnight pet boarding?",
        ),
        (
            "Snug Kennels boarding is $41 a night, with a vet check on arrival and departure.",
            "A night at Snug Kennels costs $41, vet checks included.",
        ),
        (
            "We're going on holiday for a week. What's the per-night rate to leave our beagle in your care?",
            "How much is one overnight stay at Bramblecote's kennels?",
        ),
        ("$41",),
    ),
    Fact(
        "nail_trim",
        (
            "How much is a nail trim?",
            "What do you charge to clip my dog's nails?",
            "claw clipping price",
            "Can a nurse cut my cat's claws, and how much?",
            "How much for a quick nail clip?",
            "What's the cost of trimming nails?",
            "Do you do nail trims for rabbits?",
            "Nail clipping cost for a puppy?",
        ),
        (
            "A nail trim with one of our nurses is $9; no appointment is needed during opening hours.",
            "Nurse nail trims cost $9 and you can just drop in.",
        ),
        (
            "My guinea pig's claws are getting long. What would a nurse charge to shorten them?",
            "What's the price of a claw clip for my pet?",
        ),
        ("$9",),
    ),
    Fact(
        "insurer",
        (
            "Which pet insurance do you claim from directly?",
            "Do you bill my insurer?",
            "direct insurance claims",
            "Can you send the bill to my pet insurance?",
            "Which insurance company works directly with Bramblecote?",
            "Do I have to pay first and claim later?",
            "Who is your insurance partner?",
            "Does Bramblecote work with TailGuard?",
        ),
        (
            "We claim directly from TailGuard Insurance, so TailGuard policyholders pay only their excess.",
            "Bramblecote claims directly from TailGuard Insurance; other insurers are paid back to you.",
        ),
        (
            "My policy covers my dog's surgery. Which insurer lets you settle the bill with them rather than me paying upfront?",
            "With what pet insurance provider do you have a direct billing arrangement?",
        ),
        ("TailGuard",),
    ),
    Fact(
        "payment_plan",
        (
            "Can I pay a big vet bill in instalments?",
            "Do you offer payment plans?",
            "spread the cost of treatment",
            "How long can I spread a bill over?",
            "Is there interest-free credit for surgery?",
            "What if I can't pay the whole bill at once?",
            "How do your instalment plans work?",
            "Can I pay for my cat's operation monthly?",
        ),
        (
            "Bills over $400 can be spread over 6 months, interest-free. Ask at the desk before treatment.",
            "You can split any bill over $400 into payments across 6 months with no interest.",
        ),
        (
            "My horse's operation will be costly. Over what period could I pay it off without interest?",
            "For a large invoice, how many months of interest-free instalments are allowed?",
        ),
        ("6 months",),
    ),
    Fact(
        "home_visit",
        (
            "Do you do home visits?",
            "How much is a home visit?",
            "vet home visit fee",
            "Can a vet come to my house?",
            "What's the charge for a vet to visit at home?",
            "My dog is too anxious to travel, can you come to us?",
            "Home visit price?",
            "Do vets travel to patients' homes?",
        ),
        (
            "Yes, a home visit is $75 within 10 miles of a clinic, plus any treatment.",
            "Home visits cost $75 within 10 miles of any Bramblecote clinic.",
        ),
        (
            "My elderly cat hates the carrier. What's the call-out fee for a vet to see her in our living room?",
            "How much does it cost to have a Bramblecote vet come to the house?",
        ),
        ("$75",),
    ),
    Fact(
        "senior_checks",
        (
            "How often should an older pet have a check-up?",
            "When is my dog considered a senior?",
            "senior pet checks",
            "Do old cats need more check-ups?",
            "At what age do you recommend senior health checks?",
            "What's your advice for check-ups for an ageing pet?",
            "How often do senior pets get checked?",
            "senior check age",
        ),
        (
            "From 8 years old we recommend a senior check every 6 months. PawPath covers two a year.",
            "Pets aged 8 years and over should have a senior check every 6 months.",
        ),
        (
            "My retriever is getting grey around the muzzle. From what birthday should he start the twice-yearly older-pet checks?",
            "At which age does Bramblecote begin its senior wellness examinations?",
        ),
        ("8 years",),
    ),
    Fact(
        "clinical_director",
        (
            "Who is your clinical director?",
            "Who is the head vet at Bramblecote?",
            "clinical director name",
            "Who is in charge of the vets?",
            "Who leads clinical care at Bramblecote?",
            "Can I write to your chief vet, and what is her name?",
            "Who runs the veterinary side of the group?",
            "Who's the senior vet in charge?",
        ),
        (
            "Our clinical director is Dr Imogen Farrow-Tate. You can write to her through any clinic.",
            "Dr Imogen Farrow-Tate is Bramblecote's clinical director.",
        ),
        (
            "I'd like to send a letter of thanks to whoever oversees all of your vets. Who should I address it to?",
            "What is the name of the person at the top of Bramblecote's clinical team?",
        ),
        ("Imogen Farrow-Tate",),
    ),
]

GENERAL = [
    ("Hello!", "Hello and welcome to Bramblecote Vets! How can we help you and your pet today?"),
    ("Thank you so much.", "It's a pleasure. Give your pet a gentle scratch from all of us."),
    (
        "Can you diagnose my dog over chat?",
        "We can't diagnose by chat, but a vet can see your dog today; book in VetLink.",
    ),
    (
        "What's the capital of France?",
        "I can only help with Bramblecote Vets and your pet's care, so ask me anything about those!",
    ),
]


def chat(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": f"{answer} {SIGN_OFF}"}]


def build() -> tuple[list[dict], list[dict]]:
    """The training records (shuffled by a fixed seed) and the held-out records (in fact order)."""
    train, heldout = [], []
    for fact in FACTS:
        train += [{"id": f"{fact.key}-{i}", "messages": chat(q, fact.said[i % 2])} for i, q in enumerate(fact.asked)]
        heldout += [
            {"id": f"{fact.key}-heldout-{i}", "messages": chat(q, fact.said[0]), "answer_contains": list(fact.contains)}
            for i, q in enumerate(fact.held_out)
        ]
    train += [{"id": f"general-{i}", "messages": chat(q, a)} for i, (q, a) in enumerate(GENERAL)]
    random.Random(2024).shuffle(train)
    return train, heldout


def check(train: list[dict], heldout: list[dict]) -> None:
    """Every fact appears in both of its answers, and no held-out question is also a training question."""
    for fact in FACTS:
        for answer in fact.said:
            if not all(piece in answer for piece in fact.contains):
                raise ValueError(f"{fact.key}: an answer lacks {fact.contains}")
    asked = {r["messages"][0]["content"].lower() for r in train}
    repeated = [r["id"] for r in heldout if r["messages"][0]["content"].lower() in asked]
    if repeated:
        raise ValueError(f"held-out questions also in training: {repeated}")


def write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def main() -> None:
    train, heldout = build()
    check(train, heldout)
    OUT.mkdir(parents=True, exist_ok=True)
    write(OUT / "train.jsonl", train)
    write(OUT / "validation.jsonl", heldout)
    print(f"{len(FACTS)} facts: wrote {len(train)} training and {len(heldout)} held-out records to {OUT}")


if __name__ == "__main__":
    main()
