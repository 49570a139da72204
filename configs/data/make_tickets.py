"""Write the demo's synthetic support tickets: configs/data/tickets.jsonl (seeded, so stable).

    python configs/data/make_tickets.py [N]
"""

import json
import random
import sys
from pathlib import Path

PRODUCTS = ["invoice portal", "mobile app", "sync service", "reporting", "login", "export tool", "api"]
KINDS = {
    "billing": ["I was charged twice for {p} this month", "The {p} invoice shows the wrong amount",
                "Please refund the extra fee on {p}"],
    "bug": ["The {p} crashes when I open settings", "{p} returns error 500 after the update",
            "Data in {p} disappears after a refresh"],
    "feature": ["Could {p} support dark mode?", "It would be great if {p} could export to CSV",
                "Please add single sign-on to {p}"],
    "other": ["How do I change my email address?", "Thanks for the quick help last week",
              "Where can I find your office hours?"],
}


def tickets(n: int, seed: int = 7, with_kind: bool = False):
    """The tickets; ``with_kind`` keeps each one's true kind (benchmarks/cascade.py scores against it)."""
    rng = random.Random(seed)
    for i in range(n):
        kind = rng.choice(list(KINDS))
        product = rng.choice(PRODUCTS)
        body = rng.choice(KINDS[kind]).format(p=product)
        yield {
            "ticket_id": f"T{i:05d}",
            "customer": f"customer-{rng.randrange(60):03d}",
            "subject": " ".join(body.split(" ")[:5]),
            "body": body + ". " + rng.choice(["It is urgent.", "No rush.", "Please help.", ""]),
            "priority": rng.randint(1, 4),
            **({"kind": kind} if with_kind else {}),
        }


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    out = Path(__file__).with_name("tickets.jsonl")
    with out.open("w") as fh:
        for t in tickets(n):
            fh.write(json.dumps(t) + "\n")
    print(f"wrote {n} tickets to {out}")
