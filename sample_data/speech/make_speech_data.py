"""Synthesise the Harbor Bank call-centre speech sample set with espeak-ng and sox.

    python sample_data/speech/make_speech_data.py                 # train/, test/, general/test/ and glossary.txt
    python sample_data/speech/make_speech_data.py --only general  # only the named parts

Needs the Debian packages ``espeak-ng`` and ``sox`` (only to regenerate; the generated 16 kHz wav files are committed).
Each sentence is spoken once, by a voice/pitch/speed picked deterministically from its index, so the output is the
same on every run of the same espeak-ng version, up to sox's dither (at most one least significant bit). train/ and
test/ hold different sentences that share the bank's product names and jargon (see glossary.txt); general/test/
holds everyday sentences with none of them, the forgetting check (``eval.general_data: auto``).
"""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

GLOSSARY = [
    "Harbor Bank",
    "HarborFlex Checking",
    "TideSaver",
    "Anchor Card",
    "HarborPay",
    "Lighthouse Rewards",
    "Safe Harbor Overdraft Cover",
    "Mooring Line",
    "Harbor crew",
]

TRAIN = [
    "Thank you for calling Harbor Bank, how can I help you today?",
    "I would like to open a HarborFlex Checking account.",
    "Your TideSaver account earns interest every month.",
    "Please lock your Anchor Card in the HarborPay app.",
    "I sent money to my sister with HarborPay yesterday.",
    "How many Lighthouse Rewards points do I have?",
    "Safe Harbor Overdraft Cover links your savings to checking.",
    "You can call the Mooring Line at any time of day.",
    "A member of the Harbor crew will call you back.",
    "My Anchor Card was declined at the grocery store.",
    "Can I move money from TideSaver to HarborFlex Checking?",
    "The HarborPay transfer should arrive within three days.",
    "I lost my Anchor Card on the train this morning.",
    "Is there a monthly fee on HarborFlex Checking?",
    "Lighthouse Rewards gives you points for every purchase.",
    "I want to turn on Safe Harbor Overdraft Cover.",
    "The Mooring Line is open all night for lost cards.",
    "Welcome to Harbor Bank, you are speaking with the Harbor crew.",
    "How do I deposit a cheque with HarborPay?",
    "My TideSaver balance looks wrong this week.",
    "Please send me a new Anchor Card by express mail.",
    "Does HarborFlex Checking come with a debit card?",
    "I redeemed my Lighthouse Rewards for a statement credit.",
    "Harbor Bank branches close at one on Saturday.",
    "Can you explain how Safe Harbor Overdraft Cover works?",
    "I called the Mooring Line to report a stolen card.",
    "The Harbor crew helped me reset my HarborPay password.",
    "I want to close my TideSaver and open a new one.",
    "Why was my Anchor Card charged a fee abroad?",
    "HarborPay says my instant transfer is pending.",
    "Do Lighthouse Rewards points ever expire?",
    "I need a statement for my HarborFlex Checking account.",
    "Harbor Bank sent me a letter about my account.",
    "Is Safe Harbor Overdraft Cover free to use?",
    "Thanks for calling the Mooring Line, please hold.",
    "Your Anchor Card has been frozen for your safety.",
    "I would like to add my partner to TideSaver.",
    "The Harbor crew at the branch were very friendly.",
    "HarborPay will not let me send more money today.",
    "Can I earn Lighthouse Rewards with HarborFlex Checking?",
    "Please confirm your address before we mail the Anchor Card.",
    "My paycheck goes straight into HarborFlex Checking.",
    "How do I set up a transfer to TideSaver every month?",
    "Harbor Bank does not charge for a replacement card.",
    "I turned off Safe Harbor Overdraft Cover by mistake.",
    "The Mooring Line agent unlocked my online banking.",
    "Please update the phone number on my HarborPay profile.",
    "Lighthouse Rewards points were added to my account.",
    "Our Harbor crew can help you open an account today.",
    "I want a second Anchor Card for my husband.",
    "TideSaver lets me make six free withdrawals a month.",
    "Is HarborFlex Checking a good account for students?",
    "Harbor Bank is closed on Sunday.",
    "My HarborPay payment went to the wrong person.",
    "Safe Harbor Overdraft Cover saved me from a fee.",
    "Call the Mooring Line if you see a strange charge.",
]

TEST = [
    "Good morning and welcome to Harbor Bank.",
    "I need help with my HarborFlex Checking statement.",
    "How much interest does TideSaver pay right now?",
    "My Anchor Card stopped working at the gas station.",
    "Can I pay my rent with HarborPay?",
    "I want to check my Lighthouse Rewards balance.",
    "Please add Safe Harbor Overdraft Cover to my account.",
    "The Mooring Line told me to visit a branch.",
    "Someone from the Harbor crew emailed me today.",
    "I forgot the PIN for my Anchor Card.",
    "Move fifty dollars from TideSaver to checking please.",
    "HarborPay asked me to verify my identity.",
    "Can Lighthouse Rewards pay for my flight?",
    "Harbor Bank approved my new account.",
    "Is there a fee for Safe Harbor Overdraft Cover transfers?",
    "I called the Mooring Line last night.",
    "Open a TideSaver for my daughter please.",
    "The HarborFlex Checking fee was waived this month.",
    "Where can I use my Anchor Card abroad?",
    "The Harbor crew fixed my HarborPay problem quickly.",
    "How do I close my HarborFlex Checking account?",
    "Lighthouse Rewards points are worth ten dollars per thousand.",
    "My TideSaver withdrawal was declined.",
    "Does HarborPay work with my Anchor Card?",
]

# everyday speech with no bank term, product name or banking word: what whisper-tiny.en already transcribes and
# adaptation should not break
GENERAL = [
    "The weather is lovely this afternoon.",
    "Could you pass me the salt, please?",
    "We are going to the park after lunch.",
    "My brother plays the guitar every evening.",
    "Please close the window before you leave.",
    "The children read a story before bed.",
]

# (espeak-ng voice, pitch 0-99, words per minute): varied accents, genders and speeds
VOICES = [
    ("en-us", 50, 180),
    ("en-gb", 40, 170),
    ("en-us+f3", 60, 185),
    ("en-gb-x-rp+m3", 35, 175),
    ("en-029", 55, 165),
    ("en-gb-scotland+f2", 65, 175),
    ("en-us+m5", 45, 185),
    ("en+f4", 58, 172),
]


def synthesise(text: str, voice: tuple[str, int, int], target: Path, scratch: Path) -> None:
    name, pitch, speed = voice
    raw = scratch / "raw.wav"
    subprocess.run(["espeak-ng", "-v", name, "-p", str(pitch), "-s", str(speed), "-w", str(raw), text], check=True)
    # 16 kHz mono 16-bit, leading/trailing silence trimmed to keep the set small
    subprocess.run(
        [
            "sox",
            str(raw),
            "-r",
            "16000",
            "-c",
            "1",
            "-b",
            "16",
            str(target),
            "gain",
            "-1",
            "silence",
            "1",
            "0.02",
            "0.5%",
            "reverse",
            "silence",
            "1",
            "0.02",
            "0.5%",
            "reverse",
            "pad",
            "0.1",
            "0.15",
        ],
        check=True,
    )


def write_split(split: str, sentences: list[str], offset: int, prefix: str | None = None) -> None:
    folder = HERE / split
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for i, text in enumerate(sentences):
            name = f"{prefix or split}_{i:03d}.wav"
            synthesise(text, VOICES[(i + offset) % len(VOICES)], folder / name, Path(scratch))
            rows.append({"file_name": name, "transcription": text})
    with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file_name", "transcription"])
        writer.writeheader()
        writer.writerows(rows)


PARTS = ("train", "test", "general", "glossary")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), help="the parts to (re)write")
    parts = parser.parse_args().only
    assert not set(TRAIN) & set(TEST), "train and test must hold different sentences"
    words = {w.lower() for term in GLOSSARY for w in term.split()} | {"bank", "card", "account", "checking"}
    assert not any(w.strip(".,?!").lower() in words for s in GENERAL for w in s.split()), "general speech has no jargon"
    if "train" in parts:
        write_split("train", TRAIN, 0)
    if "test" in parts:
        write_split("test", TEST, 3)
    if "general" in parts:
        write_split("general/test", GENERAL, 5, prefix="general")
    if "glossary" in parts:
        (HERE / "glossary.txt").write_text("\n".join(GLOSSARY) + "\n", encoding="utf-8")
    total = sum(p.stat().st_size for p in HERE.rglob("*.wav"))
    print(f"{len(TRAIN)} train + {len(TEST)} test + {len(GENERAL)} general clips, {total / 1e6:.1f} MB of wav")


if __name__ == "__main__":
    main()
