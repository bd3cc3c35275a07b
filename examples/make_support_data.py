"""Write the quickstart data set: customer-support answers in one company's house format.

Every answer of "Acme Cloud" support follows the same shape, which a general chat model does not
produce by itself:

    Summary: <one sentence>
    Steps:
    1. <step>
    2. <step>
    3. <step>            (two or three steps)
    - Acme Support

The questions are built from topics x phrasings x products, and the validation split holds out
whole (topic, product) combinations, so the held-out score measures whether the model learned
the *format* for questions it has not seen, not whether it memorised answers.

    python examples/make_support_data.py --out examples/data
"""
from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

FORMAT_PATTERN = re.compile(
    r"^Summary: [^\n]+\nSteps:\n1\. [^\n]+\n2\. [^\n]+(\n3\. [^\n]+)?\n- Acme Support\s*$"
)

PRODUCTS = ["Acme Drive", "Acme Mail", "Acme Meet", "Acme Sheets", "Acme Backup", "Acme Photos"]

TOPICS = {
    "password": (
        ["I forgot my password for {p}.", "How do I reset my {p} password?",
         "My {p} password doesn't work anymore, what can I do?", "Can't log in to {p}, I think I lost my password."],
        "You can reset your {p} password yourself in a minute.",
        ["Open the {p} sign-in page and choose \"Forgot password\".",
         "Enter your account email and open the reset link we send you.",
         "Pick a new password of at least 12 characters."],
    ),
    "refund": (
        ["I want a refund for {p}.", "How do I get my money back for {p}?",
         "I was charged for {p} but I don't use it. Refund please.", "Can I get a refund on my {p} plan?"],
        "Refunds for {p} are available within 30 days of a charge.",
        ["Go to Billing > Invoices in your {p} account.",
         "Select the charge and choose \"Request refund\".",
         "You will get an email when the refund is approved, usually within 3 days."],
    ),
    "cancel": (
        ["How do I cancel {p}?", "Please cancel my {p} subscription.",
         "I want to stop paying for {p}.", "Where can I end my {p} plan?"],
        "You can cancel {p} at any time from your account.",
        ["Open Settings > Subscription in {p}.",
         "Choose \"Cancel plan\" and confirm.",
         "Your data stays available until the end of the billing period."],
    ),
    "export": (
        ["How can I export my data from {p}?", "I need a copy of everything in {p}.",
         "Can I download all my {p} files at once?", "Is there a way to back up my {p} data to my computer?"],
        "{p} lets you download a full export of your data.",
        ["Open Settings > Privacy > Export data in {p}.",
         "Choose the items to include and start the export.",
         "Download the archive from the link we email you within 24 hours."],
    ),
    "two_factor": (
        ["How do I turn on two-factor authentication in {p}?", "I want 2FA on my {p} account.",
         "Can I make my {p} login more secure?", "Set up an authenticator app for {p}?"],
        "Two-factor authentication protects your {p} account with a second code.",
        ["Open Settings > Security in {p} and choose \"Two-factor authentication\".",
         "Scan the QR code with your authenticator app and enter the code it shows.",
         "Save the backup codes somewhere safe."],
    ),
    "slow": (
        ["{p} is really slow today.", "Why is {p} so slow?",
         "{p} keeps loading forever.", "Pages in {p} take ages to open, help."],
        "Slow loading in {p} is usually fixed on your side in a few steps.",
        ["Check status.acme.example for any ongoing incident.",
         "Clear your browser cache or update the {p} app.",
         "If it is still slow, reply with the time and your region so we can investigate."],
    ),
    "invoice": (
        ["Where do I find my {p} invoices?", "I need an invoice for {p} for my company.",
         "Can you send me last month's {p} invoice?", "How do I add my VAT number to {p} invoices?"],
        "All {p} invoices are in your billing settings.",
        ["Go to Billing > Invoices in {p}.",
         "Add your company name and VAT number under Billing details if needed.",
         "Download any invoice as a PDF."],
    ),
    "storage": (
        ["My {p} storage is full.", "How do I get more space in {p}?",
         "{p} says I am out of storage, what now?", "Can I free up space in {p}?"],
        "You can free space in {p} or move to a larger plan.",
        ["Open Storage in {p} to see what uses the most space.",
         "Empty the trash, which still counts toward your quota."],
    ),
    "share": (
        ["How do I share something from {p} with a colleague?", "Can I give my team access to {p} items?",
         "Sharing in {p} isn't obvious, how does it work?", "I want to send a {p} link to a client."],
        "Sharing in {p} works with links or named people.",
        ["Select the item in {p} and choose \"Share\".",
         "Add people by email or create a link with view-only access."],
    ),
    "delete_account": (
        ["How do I delete my {p} account?", "Please remove my {p} account and data.",
         "I want to close my {p} account for good.", "Delete everything you have about me in {p}."],
        "Deleting your {p} account removes all of its data permanently.",
        ["Export anything you want to keep first (Settings > Privacy > Export data).",
         "Go to Settings > Account > Delete account in {p} and confirm with your password.",
         "The deletion is complete within 30 days."],
    ),
}


def answer_text(summary: str, steps: list[str]) -> str:
    lines = [f"Summary: {summary}", "Steps:"] + [f"{i}. {step}" for i, step in enumerate(steps, 1)]
    return "\n".join(lines + ["- Acme Support"])


def build(seed: int = 0, validation_pairs: int = 10):
    rng = random.Random(seed)
    combos = [(topic, product) for topic in TOPICS for product in PRODUCTS]
    rng.shuffle(combos)
    held_out = set(combos[:validation_pairs])
    train, validation = [], []
    for topic, product in sorted(combos):
        phrasings, summary, steps = TOPICS[topic]
        answer = answer_text(summary.format(p=product), [s.format(p=product) for s in steps])
        for phrasing in phrasings:
            row = {"messages": [{"role": "user", "content": phrasing.format(p=product)},
                                {"role": "assistant", "content": answer}],
                   "topic": topic, "product": product}
            (validation if (topic, product) in held_out else train).append(row)
    rng.shuffle(train)
    return train, validation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="examples/data")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, validation = build(args.seed)
    for name, rows in (("support_train.jsonl", train), ("support_valid.jsonl", validation)):
        with (out / name).open("w") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    print(f"wrote {len(train)} training and {len(validation)} held-out rows to {out}/")


if __name__ == "__main__":
    main()
