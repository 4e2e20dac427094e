"""Synthesise the Larkspur Pharmacy call-centre speech set, a speech domain polyadapt was never tuned on.

    python benchmarks/unseen/make_speech.py

Writes benchmarks/unseen/speech/{train,test}/ (16 kHz mono 16-bit wav clips and metadata.csv, the audiofolder layout
of sample_data/speech) and glossary.txt. Larkspur Pharmacy is fictional; its medicines (Zorvexa, Quilomet...) and its
refill app RefillPal are invented names that Whisper cannot know how to spell. Needs the Debian packages ``espeak-ng``
and ``sox`` (only to regenerate; the wav files are committed). Each sentence is spoken once, by an espeak-ng voice,
pitch and speed picked from its index (voices unlike those of sample_data/speech), so the output is the same on every
run of the same espeak-ng and sox versions.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parent / "speech"

GLOSSARY = [
    "Larkspur Pharmacy",
    "Zorvexa",
    "Quilomet",
    "Brevantil",
    "Nysolide",
    "Pheracor",
    "Valtrimine",
    "Cordelix",
    "Ombrasol",
    "Tessamyd",
    "RefillPal",
]

TRAIN = [
    "Good afternoon, Larkspur Pharmacy, how can I help?",
    "I need a refill of my Zorvexa tablets.",
    "Is Quilomet safe to take with food?",
    "My doctor prescribed Brevantil for my blood pressure.",
    "Do you have Nysolide cream in stock?",
    "Pheracor should be taken twice a day.",
    "Can I order Valtrimine through RefillPal?",
    "Cordelix drops are kept in the fridge.",
    "Ombrasol spray is out of stock this week.",
    "The pharmacist will call you about Tessamyd.",
    "RefillPal sends a reminder before your pills run out.",
    "Larkspur Pharmacy is open late on Thursdays.",
    "Zorvexa may make you feel a little sleepy.",
    "I was told to stop taking Quilomet.",
    "How long does Brevantil take to work?",
    "Please apply Nysolide to the rash at night.",
    "My Pheracor prescription has expired.",
    "Valtrimine comes in a blue box.",
    "Can children use Cordelix?",
    "Shake the Ombrasol bottle before each use.",
    "Tessamyd is a generic version of the old brand.",
    "I forgot my RefillPal password again.",
    "Thank you for calling Larkspur Pharmacy.",
    "Is there a cheaper alternative to Zorvexa?",
    "Quilomet and Brevantil should not be mixed.",
    "The Nysolide tube says apply sparingly.",
    "I get headaches from Pheracor.",
    "Valtrimine is ready for collection at the counter.",
    "Cordelix helped my dry eyes a lot.",
    "We deliver Ombrasol to your door.",
    "Tessamyd must be taken on an empty stomach.",
    "Add my husband to RefillPal please.",
    "Larkspur Pharmacy has a new branch downtown.",
    "My Zorvexa dose was increased last month.",
    "Does Quilomet interact with alcohol?",
    "I left my Brevantil at the hotel.",
    "Nysolide has stopped the itching.",
    "Swap Pheracor for the slow release version.",
    "How many Valtrimine can I take in a day?",
    "The Cordelix bottle lasts one month once opened.",
    "Ombrasol is not suitable during pregnancy.",
    "Please check whether Tessamyd is covered by my plan.",
    "RefillPal shows my order as dispatched.",
    "Welcome to Larkspur Pharmacy, you're speaking with Dana.",
    "I would like to transfer my Zorvexa prescription.",
    "Quilomet gave me a dry mouth.",
    "Brevantil should be taken in the morning.",
    "Can I buy Nysolide without a prescription?",
    "Pheracor is now available in liquid form.",
    "I missed two doses of Valtrimine.",
    "Keep Cordelix away from direct sunlight.",
    "My son is allergic to Ombrasol.",
    "Tessamyd arrived in a damaged package.",
    "Turn on notifications in RefillPal.",
    "Larkspur Pharmacy can post your medicine today.",
    "Zorvexa and Tessamyd are on the same repeat.",
    "Order Quilomet and Cordelix together in RefillPal.",
    "The Brevantil leaflet is inside the box.",
    "Nysolide and Ombrasol are both for the skin.",
    "Valtrimine replaced Pheracor on my list.",
]

TEST = [
    "Hello, this is Larkspur Pharmacy, how may I help you?",
    "When will my Zorvexa be ready?",
    "I'd like to renew my Quilomet please.",
    "Brevantil makes me dizzy in the evening.",
    "Is Nysolide suitable for a baby?",
    "Can I split a Pheracor tablet in half?",
    "Valtrimine is cheaper in the larger pack.",
    "I dropped my Cordelix bottle on the floor.",
    "Ombrasol worked better than the last spray.",
    "Do I need to see a doctor for Tessamyd?",
    "RefillPal will not accept my card.",
    "Larkspur Pharmacy called about my order.",
    "Take Zorvexa with a full glass of water.",
    "Quilomet is on back order until Friday.",
    "My mother takes Brevantil and Valtrimine.",
    "Put Nysolide on clean dry skin.",
    "Pheracor can be collected after lunch.",
    "How do I store Cordelix when travelling?",
    "The Ombrasol nozzle is blocked.",
    "Tessamyd comes in two strengths.",
    "I reordered everything through RefillPal.",
    "Does Larkspur Pharmacy stock Cordelix?",
    "Send my Tessamyd and Zorvexa to my work address.",
    "Ask the pharmacist about Quilomet and Ombrasol.",
]

# (espeak-ng voice, pitch 0-99, words per minute): none of them a voice of sample_data/speech. Picked from 21
# candidates as those whisper-tiny.en transcribes plain English from best (word error rate 0 to 0.13 on six everyday
# sentences), so what is hard in this set is the invented names, not the synthesiser: Lancaster, Received
# Pronunciation, British, American, Scottish and New York English, one of them a female variant.
VOICES = [
    ("en-gb-x-gbclan", 50, 165),
    ("en-us+m7", 40, 165),
    ("en-gb+f5", 60, 165),
    ("en-us-nyc", 45, 172),
    ("en-gb-x-rp+m1", 45, 165),
    ("en-us+m6", 45, 175),
    ("en-gb-scotland+m1", 52, 168),
    ("en-gb+m4", 42, 172),
]


def synthesise(text: str, voice: tuple[str, int, int], target: Path, scratch: Path) -> None:
    name, pitch, speed = voice
    raw = scratch / "raw.wav"
    subprocess.run(["espeak-ng", "-v", name, "-p", str(pitch), "-s", str(speed), "-w", str(raw), text], check=True)
    # 16 kHz mono 16-bit; leading and trailing silence trimmed (then a short pad) to keep the set small; -R seeds
    # sox's dither the same on every run, so the bytes are reproducible
    trim = ["silence", "1", "0.02", "0.5%"]
    subprocess.run(
        ["sox", "-R", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(target), "gain", "-1",
         *trim, "reverse", *trim, "reverse", "pad", "0.1", "0.15"],
        check=True,
    )  # fmt: skip


def write_split(split: str, sentences: list[str], offset: int) -> None:
    folder = OUT / split
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for i, text in enumerate(sentences):
            name = f"{split}_{i:03d}.wav"
            synthesise(text, VOICES[(i + offset) % len(VOICES)], folder / name, Path(scratch))
            rows.append({"file_name": name, "transcription": text})
    with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file_name", "transcription"])
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    if set(TRAIN) & set(TEST):
        raise SystemExit("train and test must hold different sentences")
    unused = [term for term in GLOSSARY if not any(term in s for s in TEST)]
    if unused:
        raise SystemExit(f"glossary terms no test sentence uses: {unused}")
    write_split("train", TRAIN, 0)
    write_split("test", TEST, 5)
    (OUT / "glossary.txt").write_text("\n".join(GLOSSARY) + "\n", encoding="utf-8")
    total = sum(p.stat().st_size for p in OUT.rglob("*.wav"))
    print(f"{len(TRAIN)} train + {len(TEST)} test clips, {total / 1e6:.1f} MB of wav in {OUT}")


if __name__ == "__main__":
    main()
