"""Generate tunelab's bundled example dataset, src/tunelab/datasets/support_tickets.jsonl.

The dataset is a structured-extraction task: a customer support message in, a compact JSON object
(intent, product, urgency, order_id) out. It is small enough to train on in minutes and hard enough that a
135M instruct model gets the exact schema and label set wrong zero-shot, so a demo shows a real gain.

Deterministic: stdlib only and a fixed seed, so rerunning the script rewrites the same bytes.

    python scripts/make_support_dataset.py [--out PATH] [--rows 600] [--seed 1234]
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

INSTRUCTION = "Extract the support ticket fields as JSON with keys intent, product, urgency, order_id."

PRODUCTS = [
    "wireless earbuds",
    "standing desk",
    "espresso machine",
    "yoga mat",
    "air fryer",
    "mechanical keyboard",
    "robot vacuum",
    "hiking backpack",
    "smart watch",
    "electric kettle",
    "office chair",
    "bluetooth speaker",
]

# {product} is the product name verbatim; {order} is an inline order reference or "" (templates without
# {order} never carry an order number). The remaining slots are filled from FILLERS.
TEMPLATES: dict[str, list[str]] = {
    "refund": [
        "I sent back the {product}{order} {when} and I still haven't received my refund.",
        "Can I get my money back for the {product}{order}? It just isn't what I expected.",
        "I'd like a refund on the {product}{order}, it stopped working after a week.",
        "The {product} I bought{order} doesn't suit me, so please refund me.",
        "You confirmed my return of the {product}{order} {when} but the refund never showed up on my card.",
        "Please process a refund for the {product}{order}. I've already shipped it back.",
        "I want to return the {product}{order} for a full refund.",
        "Still waiting on the refund for my {product}{order}, it's been {duration}.",
        "How do I get reimbursed for the {product}{order}? I'm not happy with it and want my money back.",
    ],
    "cancel_order": [
        "Please cancel my order for the {product}{order}, I ordered it by mistake.",
        "I need to cancel the {product}{order} before it ships.",
        "I changed my mind about the {product}{order}. Can you cancel it?",
        "Could you cancel the {product} I ordered{order}? I found it cheaper elsewhere.",
        "I placed an order for the {product}{order} {when} and would like to cancel it.",
        "Don't ship the {product}{order}, I want to cancel the whole order.",
        "I accidentally ordered two of the {product}{order}, please cancel the order so I can redo it.",
        "Cancel the {product}{order} please, I no longer need it.",
    ],
    "shipping_delay": [
        "My {product}{order} was supposed to arrive {when} and it still hasn't shown up.",
        "Where is my {product}{order}? The tracking hasn't updated in {duration}.",
        "The {product} I ordered{order} is way past the delivery date.",
        "I've been waiting {duration} for the {product}{order} and there's no sign of it.",
        "Tracking for the {product}{order} says it's stuck in transit. Is it lost?",
        "The {product}{order} still hasn't been delivered, what's going on?",
        "Delivery for my {product}{order} keeps getting pushed back.",
        "It's been {duration} since I ordered the {product}{order} and nothing has arrived.",
    ],
    "damaged_item": [
        "My {product}{order} {damage}.",
        "The {product}{order} {damage}, the box was completely crushed.",
        "Unfortunately the {product} I received{order} {damage}. Can you send a replacement?",
        "Just unboxed the {product}{order} and it's damaged, looks like it was dropped in transit.",
        "The packaging was torn and the {product} inside{order} {damage}.",
        "I received a damaged {product}{order}. There's a crack right down the side.",
        "Got my {product}{order} {when} but it {damage}.",
        "The {product}{order} is unusable, it {damage} and one part is snapped off.",
    ],
    "billing_error": [
        "I was charged twice for the {product}{order}.",
        "My card was billed {amount} for the {product}{order} but the price at checkout was lower.",
        "There's a charge on my statement for a {product}{order} that I never ordered.",
        "You charged me full price for the {product}{order} even though I used a discount code.",
        "The invoice for my {product}{order} shows the wrong amount.",
        "I see two payments for the same {product}{order}, please fix the double charge.",
        "I got billed for shipping on the {product}{order} even though it was supposed to be free.",
        "Why was I charged again for the {product}{order}? I already paid for it {when}.",
    ],
    "account_access": [
        "I can't log into my account to track the {product}{order}.",
        "I'm locked out of my account and need to check on the {product}{order}.",
        "The password reset email never arrives, so I can't see my order for the {product}{order}.",
        "My account got locked when I tried to check the status of the {product}{order}.",
        "I bought the {product}{order} but now the login page says my account doesn't exist.",
        "The two-factor code isn't coming through and I need to manage my purchase of the {product}{order}.",
        "I can't sign in to leave a review or start a return for the {product}{order}.",
        "Someone changed my account email and I can't access the order for my {product}{order}.",
    ],
    "product_question": [
        "Does the {product} come with a warranty?",
        "I just bought the {product}{order}. How long is the warranty?",
        "How do I clean the {product}{order} without damaging it?",
        "Is there a user manual for the {product}{order} somewhere online?",
        "Can the {product} be used outdoors, or is it indoor only?",
        "Does the {product} need any assembly when it arrives?",
        "Are replacement parts available for the {product}{order}?",
        "Before I buy the {product}, can you tell me how heavy it is?",
        "What colours does the {product} come in? I'm thinking of getting one as a gift.",
    ],
    "change_address": [
        "I moved recently and need the {product}{order} shipped to my new address.",
        "Can you change the delivery address for the {product}{order}? I typed the wrong street.",
        "Please update the shipping address for my {product}{order} to {address}.",
        "The {product}{order} is going to my old apartment, can it be redirected?",
        "I entered the wrong zip code for the {product}{order}, can you fix the address?",
        "Could the {product}{order} be delivered to my office instead of my home?",
        "I need to change where the {product}{order} is being sent.",
        "Wrong address on the {product}{order}! It should go to {address}.",
    ],
}

# Fillers must carry no urgency cue ("today", "asap", ...), or the urgency label would be ambiguous.
FILLERS: dict[str, list[str]] = {
    "when": [
        "last week",
        "on Monday",
        "on the 12th",
        "three days ago",
        "a week ago",
        "last Friday",
        "at the start of the month",
        "yesterday",
    ],
    "duration": ["two weeks", "ten days", "over a week", "almost a month", "5 days", "three weeks"],
    "damage": [
        "arrived broken",
        "showed up with a big dent",
        "came with a cracked panel",
        "arrived scratched all over",
        "was smashed in the box",
        "arrived bent out of shape",
    ],
    "amount": ["$89.99", "$249", "$54.50", "$120", "$37.25", "$310"],
    "address": ["42 Maple Street, Apt 3", "118 Harbor Rd", "7 Kingfisher Lane", "900 West 5th Ave, Unit 12"],
}

# Which share of each intent's messages mentions an order number: questions about a product are often
# asked before buying, while a cancellation nearly always names the order.
ORDER_RATE = {
    "refund": 0.65,
    "cancel_order": 0.75,
    "shipping_delay": 0.7,
    "damaged_item": 0.6,
    "billing_error": 0.65,
    "account_access": 0.4,
    "product_question": 0.25,
    "change_address": 0.7,
}

INLINE_ORDER = [" (order {id})", " (order #{id})", " (order no. {id})", " from order {id}", " on order #{id}"]
ORDER_SENTENCE = [
    "My order number is {id}.",
    "Order #{id}.",
    "The order number is {id} if that helps.",
    "Order ref: {id}.",
    "It's order {id}.",
]

URGENCY_CUES = {
    "high": [
        "This is urgent.",
        "Please sort this out ASAP.",
        "I need this fixed today.",
        "Please help, it's urgent!",
        "I need an answer today please.",
        "This needs to be resolved ASAP.",
        "Please respond as soon as possible, this is urgent.",
        "I need this handled immediately.",
    ],
    "medium": [
        "Please get back to me this week.",
        "A reply in the next couple of days would be appreciated.",
        "Let me know what the next steps are.",
    ],
    "low": [
        "No rush, whenever you get a chance.",
        "Not urgent at all.",
        "Whenever you get a chance is fine.",
        "No hurry on this.",
        "Just let me know when you have a moment.",
        "Not in a hurry, just wanted to flag it.",
    ],
}
HIGH_PREFIXES = ["URGENT: ", "Urgent - ", "ASAP: "]
URGENCY_WEIGHTS = {"high": 0.3, "medium": 0.4, "low": 0.3}

GREETINGS = ["", "", "Hi,", "Hello,", "Hey there,", "Hi team,", "Good morning,", "Hello support,", "Hi there!"]
NAMES = ["Maria", "James", "Priya", "Tom", "Aisha", "Lukas", "Chen", "Sofia", "Dev", "Grace", "Omar", "Elena"]
CLOSINGS = [
    "",
    "",
    "",
    "Thanks.",
    "Thank you!",
    "Thanks in advance.",
    "Appreciate it.",
    "Thanks, {name}",
    "- {name}",
    "Best, {name}",
    "Regards, {name}",
    "Really disappointed so far.",
    "cheers",
]

# Neutral sentences that carry no label information, for length and variety.
CONTEXT_SENTENCES = [
    "I've been a customer for years.",
    "I tried the help centre first but couldn't find an answer.",
    "I already tried the live chat but got no reply.",
    "Sorry if this is the wrong place to ask.",
    "First time writing in, hope this reaches the right person.",
    "I bought it with my own savings, so this matters to me.",
]

MIN_WORDS, MAX_WORDS = 15, 60
MAX_SENTENCES = 3
TYPO_RATE = 0.12


def make_order_id(rng: random.Random) -> str:
    """Returns an order number like "A-48213"."""
    return f"{rng.choice('ABCD')}-{rng.randint(10000, 99999)}"


def add_typo(text: str, protected: set[str], rng: random.Random) -> str:
    """Swaps two adjacent letters in one unprotected word, as a hurried customer would."""
    words = text.split(" ")
    candidates = [i for i, w in enumerate(words) if w.isalpha() and len(w) >= 5 and w.lower() not in protected]
    if not candidates:
        return text
    i = rng.choice(candidates)
    w = words[i]
    j = rng.randrange(1, len(w) - 2)
    words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2 :]
    return " ".join(words)


def make_message(intent: str, rng: random.Random) -> tuple[str, dict[str, str | None]]:
    """Returns one support message and the fields a perfect extractor reads from it."""
    template = rng.choice(TEMPLATES[intent])
    product = rng.choice(PRODUCTS)
    urgency = rng.choices(list(URGENCY_WEIGHTS), weights=list(URGENCY_WEIGHTS.values()))[0]
    has_order_slot = "{order}" in template
    order_id = make_order_id(rng) if has_order_slot and rng.random() < ORDER_RATE[intent] else None

    # Medium is mostly the absence of a cue; a third of medium messages state a moderate deadline.
    cue, prefix = "", ""
    if urgency == "high" and rng.random() < 0.25:
        prefix = rng.choice(HIGH_PREFIXES)
    elif urgency != "medium" or rng.random() < 0.35:
        cue = rng.choice(URGENCY_CUES[urgency])

    # At most MAX_SENTENCES sentences besides greeting and sign-off: an order number gets its own
    # sentence and a context sentence is added only while the budget allows.
    budget = MAX_SENTENCES - len(re.findall(r"[.?!](?: |$)", template)) - bool(cue)
    inline_order, order_sentence = "", ""
    if order_id is not None:
        if budget < 1 or rng.random() < 0.7:
            inline_order = rng.choice(INLINE_ORDER).format(id=order_id)
        else:
            order_sentence = rng.choice(ORDER_SENTENCE).format(id=order_id)
            budget -= 1
    context = rng.choice(CONTEXT_SENTENCES) if budget >= 1 and rng.random() < 0.2 else ""
    fills = {slot: rng.choice(options) for slot, options in FILLERS.items()}
    body = template.format(product=product, order=inline_order, **fills)

    sentences = [s for s in (body, order_sentence, context, cue) if s]
    if rng.random() < 0.3 and len(sentences) > 1 and (order_sentence or context):
        sentences[0], sentences[1] = sentences[1], sentences[0]
    text = prefix + " ".join(sentences)

    protected = {w.strip(".,!:-").lower() for w in f"{product} {cue} {prefix}".split()}
    if rng.random() < TYPO_RATE:
        text = add_typo(text, protected, rng)

    greeting = rng.choice(GREETINGS)
    closing = rng.choice(CLOSINGS).format(name=rng.choice(NAMES))
    if greeting.endswith(",") and not (text.startswith("I ") or text.startswith("I'") or text.split()[0].isupper()):
        text = text[0].lower() + text[1:]  # "Hi, the invoice ..." rather than "Hi, The invoice ..."
    message = " ".join(part for part in (greeting, text, closing) if part)
    if rng.random() < 0.1 and not message.split()[0].isupper():  # casual writers skip the capital letter
        message = message[0].lower() + message[1:]
    fields = {"intent": intent, "product": product, "urgency": urgency, "order_id": order_id}
    return message, fields


def make_rows(n_rows: int, seed: int) -> list[dict[str, str]]:
    """Returns n_rows unique instruction/input/output rows, intents balanced to within one row."""
    rng = random.Random(seed)
    intents = [list(TEMPLATES)[i % len(TEMPLATES)] for i in range(n_rows)]
    rng.shuffle(intents)
    rows, seen = [], set()
    for intent in intents:
        while True:
            message, fields = make_message(intent, rng)
            n_words = len(message.split())
            if message not in seen and MIN_WORDS <= n_words <= MAX_WORDS:
                break
        seen.add(message)
        output = json.dumps(fields, separators=(", ", ": "))
        rows.append({"instruction": INSTRUCTION, "input": message, "output": output})
    return rows


def check_row(row: dict[str, str]) -> None:
    """Fails loudly if a row's label contradicts its message, so a template bug cannot ship."""
    fields = json.loads(row["output"])
    text = row["input"]
    assert fields["product"] in text, row
    if fields["order_id"] is None:
        assert not re.search(r"\b[A-D]-\d{5}\b", text), row
    else:
        assert fields["order_id"] in text, row
    lowered = text.lower()
    without_negation = lowered.replace("not urgent", "")
    high = any(cue in without_negation for cue in ("asap", "urgent", "today", "immediately", "as soon as"))
    low = any(cue in lowered for cue in ("no rush", "not urgent", "no hurry", "when you", "whenever", "not in a hurry"))
    assert high == (fields["urgency"] == "high"), row
    assert low == (fields["urgency"] == "low"), row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(__file__).resolve().parents[1] / "src/tunelab/datasets/support_tickets.jsonl"
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()

    rows = make_rows(args.rows, args.seed)
    for row in rows:
        check_row(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
