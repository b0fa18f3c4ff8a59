#!/usr/bin/env python3
"""Writes the data the shipped recipes train on. Deterministic; no third-party packages.

  recipes/data/stories_{train,valid}.jsonl  the quickstart's: short TinyStories-style stories
      about Zib, a little blue robot that the pretrained stories260K model has never met, in
      the simple words it knows, so that a LoRA visibly teaches it a new character.
  recipes/data/tiny_{train,valid}.jsonl  short sentences from a small grammar, in the
      vocabulary that tests/fixtures' tiny tokenizer was trained on (recipes/tiny.yaml).

    python3 scripts/make_quickstart_data.py
"""
import json
import os
import random

SUBJECTS = ["the cat", "the dog", "a bird", "the baker", "the children", "the old mill"]
VERBS = {"the cat": "sat on the mat", "the dog": "ran far away", "a bird": "sang a sweet song",
         "the baker": "made fresh bread", "the children": "played in the park",
         "the old mill": "stood by the river"}
TIMES = ["every morning", "until dark", "in the rain", "over the hill", "at sun rise"]


def sentence(rng):
    s = rng.choice(SUBJECTS)
    return f"{s.capitalize()} {VERBS[s]} {rng.choice(TIMES)}."


def write(path, n, seed):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            text = " ".join(sentence(rng) for _ in range(rng.randint(1, 3)))
            f.write(json.dumps({"text": text}) + "\n")


FRIENDS = ["Lily", "Tom", "Sue", "Ben", "Max", "Mia", "Sam", "Anna"]
PLACES = ["the park", "the garden", "the forest", "the beach", "the big house", "the school"]
THINGS = [("a red ball", "ball"), ("a blue kite", "kite"), ("a toy car", "car"),
          ("a little boat", "boat"), ("a pink cake", "cake"), ("a yellow flower", "flower")]
FEELINGS = ["happy", "sad", "scared", "excited", "tired"]


def story(rng):
    friend, place = rng.choice(FRIENDS), rng.choice(PLACES)
    thing, short = rng.choice(THINGS)
    feeling = rng.choice(FEELINGS)
    he = "she" if friend in ("Lily", "Sue", "Mia", "Anna") else "he"
    parts = [
        rng.choice(["Once upon a time, there was a little robot named Zib.",
                    "Zib was a little blue robot.",
                    "One day, Zib the little blue robot went to " + place + "."]),
        rng.choice(["Zib had shiny blue wheels and a round head that went beep beep.",
                    "Zib liked to help his friends and fix things.",
                    "Zib could not run, but he could roll very fast."]),
        f"At {place}, Zib met {friend}. {friend} was {feeling} because {he} lost {thing}.",
        rng.choice([f"Zib said, \"Beep beep! I will help you find your {short}.\"",
                    f"\"Do not be {feeling},\" said Zib. \"I will look for it.\""]),
        rng.choice([f"Zib rolled and rolled until he found the {short} under a tree.",
                    f"Zib looked up and saw the {short} in a big bush.",
                    f"Zib used his long arm to get the {short} from the water."]),
        rng.choice([f"{friend} hugged Zib and said, \"Thank you, Zib!\"",
                    f"{friend} smiled. Zib was happy too, and his head went beep beep."]),
        rng.choice(["From that day on, Zib and " + friend + " were best friends.",
                    "The end.", "They played together all day."]),
    ]
    return " ".join(parts)


def write_stories(path, n, seed):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": story(rng)}) + "\n")


if __name__ == "__main__":
    root = os.path.join(os.path.dirname(__file__), "..", "recipes", "data")
    write(os.path.join(root, "tiny_train.jsonl"), 400, seed=1)
    write(os.path.join(root, "tiny_valid.jsonl"), 40, seed=2)
    write_stories(os.path.join(root, "stories_train.jsonl"), 200, seed=3)
    write_stories(os.path.join(root, "stories_valid.jsonl"), 30, seed=4)
