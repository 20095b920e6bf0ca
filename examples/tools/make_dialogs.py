"""Writes the tool-use training dialogs of examples/tools: train.jsonl and heldout.jsonl (a split of the same
generator with its own slot values), deterministic for a seed.

Forge Foods' customer service (the tools of tools.json): order status, store opening hours, table booking, each as
the round trip the server sees (user -> assistant `tool_calls` -> `tool` result -> assistant reply, sometimes a
"thanks" after it), and dialogs that need no tool at all (greetings, thanks, what the bot can do, a request that
lacks the order number or the date), so that `tool_choice: auto` learns when not to call. Records are in the
messages format with a `tools` field, as an OpenAI client sends them; the renderer puts the tools into the prompt
the way the server does. No user text of the benchmark set (prompts.jsonl) and none of its order numbers occurs.

    python examples/tools/make_dialogs.py [--seed 0] [--train 400] [--heldout 60]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SYSTEMS = [
    "You are the customer-service assistant of Forge Foods: you look up orders, tell store opening hours and book "
    "tables. Use the tools.",
    "You are Forge Foods' helpful support assistant. Use the tools when a customer asks about an order, store hours "
    "or a table reservation.",
    "You work at the Forge Foods help desk. Answer politely; call a tool only when you need one.",
]
STORES = {"downtown": ["downtown store", "downtown shop", "downtown branch", "store downtown", "downtown location"],
          "airport": ["airport store", "airport shop", "airport branch", "store at the airport", "airport location"],
          "harbour": ["harbour store", "harbour shop", "harbour branch", "store by the harbour", "harbour location"]}
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]

ORDER_ASKS = [
    "Where is my order {id}?", "Can you tell me the status of order {id}?", "Has my order {id} been shipped yet?",
    "order {id} status", "I'm still waiting for order {id}. Any news?", "Could you look up order {id} for me?",
    "When will order {id} be delivered?", "What's happening with my order {id}?", "Please check order {id}.",
    "Hello, my order number is {id}. Where is it?", "Is {id} on its way?", "track {id}",
    "I placed order {id} a few days ago. When does it arrive?", "Any update on {id}?",
    "My delivery {id} is late, can you check?", "Could you find out where parcel {id} is?",
]
HOURS_ASKS = [
    "What are the opening hours of the {store} on {Day}?", "Is the {store} open on {Day}?",
    "When does the {store} close on {Day}?", "{store} hours {day}", "What time does the {store} open on {Day}?",
    "Can I come to the {store} on {Day}? When are you open?", "How late is the {store} open on {Day}?",
    "Opening times for the {store} this {Day}, please.", "I'd like to visit the {store} on {Day}. What are the hours?",
    "Are you open on {Day} at the {store}?", "When can I shop at the {store} on {Day}?",
    "hours of the {store} on {Day}?",
]
BOOK_ASKS = [
    "Book a table for {n} on {date} at {time}.", "I'd like to reserve a table for {words} on {date} at {time}.",
    "Can I get a table for {n} people at {time} on {date}?", "Reservation please: {date}, {time}, {n} guests.",
    "We are {words}. Table on {date} at {time}, please.", "table for {n} at {time} on {date}",
    "Please reserve a table on {date} at {time} for {words} people.",
    "Could you book us a table for {n} on {date}, around {time}?", "Dinner for {words} on {date} at {time}?",
    "I want to book a table: {n} people, {date}, {time}.", "Reserve for {n} guests on {date} at {time}.",
    "Is there a table for {words} on {date} at {time}? Please book it.",
]
CHAT = [  # (user, assistant): no tool needed
    ("Hi!", "Hello! How can I help you today? I can check an order, tell you store opening hours or book a table."),
    ("Hello there", "Hi! What can I do for you today?"),
    ("Good morning!", "Good morning! How can I help you?"),
    ("How are you?", "I'm doing well, thank you! How can I help you today?"),
    ("Thanks!", "You're welcome! Is there anything else I can do for you?"),
    ("Thank you so much.", "You're very welcome! Have a great day."),
    ("thanks, that's all", "You're welcome. Have a nice day!"),
    ("Bye!", "Goodbye! Thanks for contacting Forge Foods."),
    ("What can you do?", "I can look up the status of an order, tell you the opening hours of our downtown, airport "
                         "and harbour stores, and book a table at the restaurant."),
    ("Who are you?", "I'm the Forge Foods customer-service assistant."),
    ("Are you a robot?", "I'm an automated assistant for Forge Foods. I can help with orders, store hours and table "
                         "bookings."),
    ("Tell me a joke.", "Why did the baker go to work? Because he kneaded the dough! Can I help you with anything "
                        "else?"),
    ("Which stores do you have?", "We have three stores: downtown, at the airport and by the harbour."),
    ("Do you deliver?", "Yes, we deliver groceries to your door. If you already have an order, give me its number "
                        "and I can check its status."),
    ("I want to check my order.", "Of course! What is your order number? It has two letters and four digits, like "
                                  "AB1234."),
    ("Where is my package?", "I can check that for you. Could you give me the order number?"),
    ("I'd like to book a table.", "Happy to help! For which date and time, and for how many people?"),
    ("Can I reserve a table for 4?", "Sure! On which date and at what time would you like the table?"),
    ("Are your stores open on weekends?", "Our stores open on weekends too. Which store and which day would you like "
                                          "the hours for?"),
    ("What's the weather like today?", "I'm sorry, I can't check the weather. I can help with orders, store hours "
                                       "and table bookings."),
    ("Can you recommend a good dish?", "Our fresh bread and the soup of the day are customer favourites! Would you "
                                       "like to book a table?"),
    ("ok", "Is there anything else I can help you with?"),
    ("That's great, thank you!", "You're welcome! Enjoy your day."),
    ("Do you have vegan options?", "Yes, our menu has several vegan dishes. Would you like me to book a table?"),
    ("How do I return an item?", "You can bring it back to any of our stores with the receipt within 30 days."),
]
STATUSES = [("shipped", "has shipped"), ("out_for_delivery", "is out for delivery"),
            ("processing", "is being prepared"), ("delivered", "has been delivered"), ("delayed", "is delayed")]


def order_id(rng: random.Random, taken: set[str]) -> str:
    while True:
        oid = "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(2)) + f"{rng.randrange(10000):04d}"
        if oid not in taken:
            taken.add(oid)
            return oid


def call(name: str, arguments: dict, k: int) -> dict:
    return {"role": "assistant", "content": "", "tool_calls": [
        {"id": f"call_{k}", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}]}


def result(content: dict, k: int) -> dict:
    return {"role": "tool", "tool_call_id": f"call_{k}", "content": json.dumps(content)}


def order_dialog(rng: random.Random, taken: set[str]) -> tuple[list[dict], dict]:
    oid = order_id(rng, taken)
    status, said = rng.choice(STATUSES)
    eta = f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    info = {"order_id": oid, "status": status} | ({} if status == "delivered" else {"eta": eta})
    reply = f"Your order {oid} {said}" + ("." if status == "delivered" else f" and should arrive on {eta}.")
    msgs = [{"role": "user", "content": rng.choice(ORDER_ASKS).format(id=oid)},
            call("get_order_status", {"order_id": oid}, 0), result(info, 0), {"role": "assistant", "content": reply}]
    return msgs, {"name": "get_order_status", "arguments": {"order_id": oid}}


def hours_dialog(rng: random.Random) -> tuple[list[dict], dict]:
    store, day = rng.choice(list(STORES)), rng.choice(DAYS)
    opens, closes = rng.choice(["07:00", "08:00", "09:00", "10:00"]), rng.choice(["18:00", "20:00", "21:00", "22:00"])
    closed = day == "sunday" and store == "harbour"
    info = {"store": store, "day": day} | ({"open": False} if closed else {"opens": opens, "closes": closes})
    reply = (f"The {store} store is closed on {day.capitalize()}." if closed else
             f"On {day.capitalize()} the {store} store is open from {opens} to {closes}.")
    ask = rng.choice(HOURS_ASKS).format(store=rng.choice(STORES[store]), day=day, Day=day.capitalize())
    msgs = [{"role": "user", "content": ask[0].upper() + ask[1:]},
            call("get_opening_hours", {"store": store, "day": day}, 0), result(info, 0),
            {"role": "assistant", "content": reply}]
    return msgs, {"name": "get_opening_hours", "arguments": {"store": store, "day": day}}


def book_dialog(rng: random.Random) -> tuple[list[dict], dict]:
    month, day = rng.randint(1, 12), rng.randint(1, 28)
    date = f"2026-{month:02d}-{day:02d}"
    time = f"{rng.choice(range(11, 23)):02d}:{rng.choice(['00', '15', '30', '45'])}"
    people = rng.choice([1, 2, 2, 2, 3, 4, 4, 5, 6, 7, 8, 10, 12])
    args = {"date": date, "time": time, "people": people}
    code = f"BK{rng.randrange(100000):05d}"
    reply = (f"Your table for {people} on {day} {MONTHS[month - 1]} 2026 at {time} is booked. "
             f"Your confirmation number is {code}.")
    ask = rng.choice(BOOK_ASKS).format(n=people, words=NUMBERS[people - 1], date=date, time=time)
    msgs = [{"role": "user", "content": ask[0].upper() + ask[1:]}, call("book_table", args, 0),
            result({"booked": True, "confirmation": code} | args, 0), {"role": "assistant", "content": reply}]
    return msgs, {"name": "book_table", "arguments": args}


def dialogs(seed: int, n: int, taken: set[str]) -> list[dict]:
    """n distinct conversations: a quarter each order, hours, booking and no-tool; some with a turn before/after."""
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        kind = len(out) % 4
        if kind == 3:  # one or two exchanges that need no tool
            pairs = rng.sample(CHAT, rng.choice([1, 1, 2]))
            msgs = [{"role": r, "content": t} for u, a in pairs for r, t in (("user", u), ("assistant", a))]
            expected = None
        else:
            msgs, expected = order_dialog(rng, taken) if kind == 0 else hours_dialog(rng) if kind == 1 else \
                book_dialog(rng)
            r = rng.random()
            if r < 0.2:  # a greeting first
                user, reply = rng.choice(CHAT[:4])
                msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}] + msgs
            elif r < 0.4:  # thanks after the answer: no second call
                user, reply = rng.choice(CHAT[4:7])
                msgs = msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        msgs = [{"role": "system", "content": rng.choice(SYSTEMS)}] + msgs
        key = json.dumps(msgs)
        if key in seen:
            continue
        seen.add(key)
        out.append({"messages": msgs, "expected": expected})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--heldout", type=int, default=60)
    args = ap.parse_args(argv)
    tools = json.loads((HERE / "tools.json").read_text())
    bench = [json.loads(line) for line in (HERE / "prompts.jsonl").read_text().splitlines() if line.strip()]
    taken = {r["expected"]["arguments"]["order_id"] for r in bench if r["expected"]["name"] == "get_order_status"}
    bench_texts = {r["messages"][-1]["content"] for r in bench}
    train = dialogs(args.seed, args.train, taken)
    held = dialogs(args.seed + 1, args.heldout, taken)  # `taken` grows: no order number is shared between splits
    texts = {m["content"] for r in train for m in r["messages"] if m["role"] == "user"}
    for split, rows in (("train", train), ("heldout", held)):
        users = {m["content"] for r in rows for m in r["messages"] if m["role"] == "user"}
        assert not users & bench_texts, f"{split}: a benchmark prompt leaked in"
    with open(HERE / "train.jsonl", "w", encoding="utf-8") as f:  # training records: tools + messages
        f.writelines(json.dumps({"tools": tools, "messages": r["messages"]}, ensure_ascii=False) + "\n" for r in train)
    with open(HERE / "heldout.jsonl", "w", encoding="utf-8") as f:
        for r in held:  # benchmark rows (prompts.jsonl's shape): the conversation up to the first reply, what to call
            first = next(i for i, m in enumerate(r["messages"]) if m["role"] == "assistant"
                         and (m.get("tool_calls") or r["expected"] is None))
            f.write(json.dumps({"messages": r["messages"][:first], "expected": r["expected"],
                                "dialog": r["messages"]}, ensure_ascii=False) + "\n")
    overlap = sum(m["content"] in texts for r in held for m in r["messages"] if m["role"] == "user")
    print(f"train {len(train)}, heldout {len(held)} (user texts also in train: {overlap})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
