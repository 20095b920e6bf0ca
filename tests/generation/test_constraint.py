"""Constrained decoding: sound byte-level masks on three tokenizers, schema-valid outputs from a random model, and
the engine's batching, streaming, stop strings and end-of-turn rules with a constraint on.

Validity must not depend on model quality, so most outputs come from random tiny models sampled at temperature 1.
"""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
import torch
from conftest import CONVERSATIONS, make_tokenizer, memorized_model

from chatforge.errors import ChatforgeError
from chatforge.generation.bot import Bot
from chatforge.generation.constraint import Constraint
from chatforge.generation.engine import Engine, SamplingParams
from chatforge.model.gpt import GPT, config_from_preset
from chatforge.tokenizer import Tokenizer, token_bytes

pytestmark = pytest.mark.usefixtures("one_thread")

CHOICES = ["你好", "再见", "hello", "你好世界", "ok 😀"]  # CJK and an emoji: tokens that end mid-character
SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                                  "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                 "required": ["name", "age"], "additionalProperties": False}},
        "required": ["user"], "additionalProperties": False},
    "enum": {"type": "object", "properties": {"colour": {"enum": ["red", "绿色", "blue"]}}, "required": ["colour"],
             "additionalProperties": False},
    "array": {"type": "object", "properties": {
        "xs": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 1,
               "maxItems": 3}}, "required": ["xs"], "additionalProperties": False},
    "bounds": {"type": "object", "properties": {
        "p": {"type": "number", "minimum": 0.5, "maximum": 2.5},
        "q": {"type": "integer", "exclusiveMinimum": 3, "exclusiveMaximum": 7},
        "flag": {"type": "boolean"}}, "required": ["p", "q"], "additionalProperties": False},
    "required": {"type": "object", "properties": {"a": {"type": "integer", "maximum": 99},
                                                  "b": {"type": "string", "maxLength": 3}},
                 "required": ["b"], "additionalProperties": False},
    "ref_anyof": {"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "integer", "maximum": 9}},
                                   "required": ["x"], "additionalProperties": False}},
                  "anyOf": [{"$ref": "#/$defs/pt"}, {"type": "null"}]},
}


def gpt2_style_tokenizer() -> Tokenizer:
    """GPT-2's shape: byte-level BPE with only <|endoftext|> and a trimming post-processor; ChatML added on top."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(["hello world 你好世界 再见", '{"name": "x", "age": 12}'] * 30, trainer)
    tok = Tokenizer(hf, "", eos_token="<|endoftext|>", pad_token=None)
    tok.add_chat_tokens()
    return tok


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return GPT(config_from_preset("nano", vocab_size=tok.vocab_size, max_seq_len=512, n_layer=2, init_std=0.1)).eval()


def free(**kw) -> SamplingParams:
    return SamplingParams(temperature=1.0, top_p=1.0, **kw)


def allowed_ids(matcher) -> set[int]:
    return set(torch.nonzero(matcher.allowed()).flatten().tolist())


def check_masks(tok: Tokenizer, options: list[str], walks: int = 30) -> None:
    """Random walks through a choice constraint: every offered id keeps the bytes a prefix of some option, special
    tokens never appear, end-of-turn ids only once an option is complete, and each option's own encoding is offered
    token by token."""
    constraint = Constraint.choices(options)
    targets = [o.encode() for o in options]
    pieces = [token_bytes(tok, i) for i in range(tok.vocab_size)]
    special = set(tok.hf.get_added_tokens_decoder()) - tok.stop_ids
    rng = random.Random(0)
    mid_character = 0
    for _ in range(walks):
        m, prefix = constraint.matcher(tok), b""
        while not m.done:
            allowed = allowed_ids(m)
            assert not allowed & special
            assert (allowed & tok.stop_ids == tok.stop_ids) == (prefix in targets)
            text_ids = allowed - tok.stop_ids
            assert all(any(t.startswith(prefix + pieces[i]) for t in targets) for i in text_ids), prefix
            mid_character += any(_ends_mid_character(prefix + pieces[i]) for i in text_ids)
            if not text_ids:
                break
            token = rng.choice(sorted(text_ids))
            m.advance(token)
            prefix += pieces[token]
        assert prefix in targets
    assert mid_character  # ids that stop inside a character were offered (and taken)
    for option in options:
        m = constraint.matcher(tok)
        for token in tok.encode(option):
            assert token in allowed_ids(m)
            m.advance(token)
        assert m.accepting


def _ends_mid_character(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_masks_on_chatforge_and_gpt2_style_tokenizers(tok):
    check_masks(tok, CHOICES)
    gpt2 = gpt2_style_tokenizer()
    assert gpt2.stop_ids == {gpt2.hf.token_to_id("<|endoftext|>"), gpt2.hf.token_to_id("<|im_end|>")}
    check_masks(gpt2, CHOICES)


@pytest.mark.slow
def test_masks_on_smollm2s_tokenizer():
    from chatforge.weights.loader import load_tokenizer

    smol = load_tokenizer("smollm2-135m-instruct")
    check_masks(smol, CHOICES, walks=10)
    c = Constraint.json_schema(SCHEMAS["nested"])  # the canonical encoding of a valid document is always offered
    m = c.matcher(smol)
    for token in smol.encode('{"user": {"name": "你好", "age": 42}}'):
        assert token in allowed_ids(m)
        m.advance(token)
    assert m.done


def test_every_output_of_a_random_model_validates(tok, model):
    engine = Engine(model, tok, max_batch_size=8)
    prompt = tok.render([{"role": "user", "content": "hello"}], add_generation_prompt=True)[0]
    for name, schema in SCHEMAS.items():
        constraint = Constraint.json_schema(schema)
        params = [free(max_new_tokens=300, seed=s, constraint=constraint) for s in range(8)]
        for c in engine.generate_batch([prompt] * 8, params):
            assert c.finish_reason == "stop", (name, c.text)
            jsonschema.validate(json.loads(c.text), schema)
            assert tok.decode(c.token_ids) == c.text  # finished by the grammar: no end-of-turn id was sampled
    bounds = Constraint.json_schema(SCHEMAS["bounds"])
    texts = {c.text for c in engine.generate_batch([prompt] * 8, [free(seed=s, constraint=bounds) for s in range(8)])}
    assert len(texts) > 4  # sampling still samples: the mask removes choices, not randomness


def test_end_of_turn_is_forced_or_left_to_the_model(tok, model):
    engine = Engine(model, tok)
    prompt = [5, 6, 7]
    three = engine.generate_batch([prompt], free(seed=1, constraint=Constraint.regex("[0-9]{3}")))[0]
    assert len(three.text) == 3 and three.text.isdigit() and three.finish_reason == "stop"
    assert not set(three.token_ids) & tok.stop_ids  # nothing could follow: finished without another forward
    # "[0-9]+" accepts after every digit, so the model decides when to end the turn (among digits and end-of-turn)
    for seed in range(6):
        c = engine.generate_batch([prompt], free(seed=seed, max_new_tokens=60, constraint=Constraint.regex("[0-9]+")))[0]
        assert c.text.isdigit()
        assert c.finish_reason == "length" or c.token_ids[-1] in tok.stop_ids


def test_constrained_and_free_requests_share_a_batch(tok, model):
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    schemas = [SCHEMAS["nested"], None, SCHEMAS["array"], None]
    params = [free(max_new_tokens=80, seed=i, constraint=Constraint.json_schema(s) if s else None)
              for i, s in enumerate(schemas)]
    alone = [Engine(model, tok, max_batch_size=1).generate_batch([p], sp)[0] for p, sp in zip(prompts, params)]
    together = Engine(model, tok, max_batch_size=4).generate_batch(prompts, params)
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    for c, s in zip(together, schemas):
        if s:
            jsonschema.validate(json.loads(c.text), s)
    assert together[1].token_ids == Engine(model, tok).generate_batch([prompts[1]], free(max_new_tokens=80, seed=1))[0].token_ids


def test_streaming_gives_the_same_text_piece_by_piece(tok, model):
    engine = Engine(model, tok)
    schema = SCHEMAS["enum"]
    params = free(seed=3, max_new_tokens=100, constraint=Constraint.json_schema(schema))
    deltas = list(engine.generate([5, 6, 7], params))
    text = "".join(d.text for d in deltas)
    assert deltas[-1].finish_reason == "stop" and all(d.finish_reason is None for d in deltas[:-1])
    assert "\ufffd" not in text
    jsonschema.validate(json.loads(text), schema)
    assert text == engine.generate_batch([[5, 6, 7]], params)[0].text


def test_stop_strings_and_the_length_limit_still_apply(tok, model):
    engine = Engine(model, tok)
    stopped = engine.generate_batch([[5]], free(seed=0, stop=["STOP"], constraint=Constraint.choices(["ok STOP then"])))[0]
    assert (stopped.text, stopped.finish_reason) == ("ok ", "stop")
    cut = engine.generate_batch([[5]], free(seed=0, max_new_tokens=3, constraint=Constraint.json_schema(SCHEMAS["nested"])))[0]
    assert cut.finish_reason == "length" and len(cut.token_ids) == 3 and cut.text.startswith('{"')


def test_refusals_name_the_feature():
    cases = [
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
         "json_schema: unsupported JSON schema feature: uniqueItems"),
        ({"if": {"required": ["a"]}, "then": {"required": ["b"]}}, "json_schema: unsupported JSON schema feature: if, then"),
        ({"type": "integer", "minimum": 5, "maximum": 1},
         "json_schema: unsatisfiable schema: minimum (5) is greater than maximum (1)"),
        ({"type": "string", "minLength": 5, "maxLength": 2},
         "json_schema: unsatisfiable schema: minLength (5) is greater than maxLength (2)"),
        ({"type": "strin"}, "json_schema: Invalid type: strin"),
        ({"$ref": "#/nope"}, "json_schema: Pointer '/nope' does not exist"),
    ]
    for schema, message in cases:
        with pytest.raises(ChatforgeError) as e:
            Constraint.json_schema(schema)
        assert str(e.value) == message
    with pytest.raises(ChatforgeError, match=r"^json_schema:1: not valid JSON"):
        Constraint.json_schema("{nope")
    with pytest.raises(ChatforgeError, match=r"^regex: .*unclosed character class"):
        Constraint.regex("([")
    with pytest.raises(ChatforgeError, match=r"^choices: must be a list of non-empty strings, got 'yes'"):
        Constraint.choices("yes")
    with pytest.raises(ChatforgeError, match=r"^sampling: constraint must be None or a generation.constraint"):
        SamplingParams(constraint={"type": "object"}).validate()


def test_bot_takes_json_schema_regex_and_choices(tok):
    bot = Bot(memorized_model(tok, CONVERSATIONS), tok, defaults={"temperature": 0.0})
    hello = [{"role": "user", "content": "hello"}]
    schema = {"type": "object", "properties": {"greeting": {"type": "string", "maxLength": 20}},
              "required": ["greeting"], "additionalProperties": False}
    reply = bot.chat(hello, json_schema=schema)
    jsonschema.validate(json.loads(reply), schema)
    assert bot.chat(hello, choices=["yes", "no", "Hello there"]) == "Hello there"  # the model's own reply wins
    assert bot.chat(hello, regex="Hel+o [a-z]+!") == "Hello there!"  # the grammar ends the turn after the '!'
    assert bot.chat_batch([hello, hello], choices=["yes", "no"]) in (["yes"] * 2, ["no"] * 2)
    with pytest.raises(ChatforgeError, match="^sampling: give one of json_schema, regex, choices, not regex and choices$"):
        bot.chat(hello, regex="a", choices=["a"])


def test_step_masks_are_the_row_masks_and_leave_the_logits_alone(tok):
    """The engine's per-step masks (computed beside the forward, applied in one op) equal Matcher.mask_logits row by
    row, in every state along a walk, with unconstrained rows in between; the model's logits stay unmasked."""
    from chatforge.generation.constraint import StepMasks

    constraints = [Constraint.json_schema(SCHEMAS["nested"]), None, Constraint.choices(CHOICES),
                   Constraint.regex("[0-9]{2,4}"), None]
    matchers = [c.matcher(tok) if c else None for c in constraints]
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(12):
        logits = torch.randn(len(matchers), tok.vocab_size, generator=gen)
        before = logits.clone()
        masked = StepMasks.start(matchers).apply(logits)
        assert sorted(masked) == [i for i, m in enumerate(matchers) if m is not None]
        assert torch.equal(logits, before)
        for i, m in enumerate(matchers):
            if m is None:
                continue
            assert torch.equal(masked[i], m.mask_logits(logits[i]))
            text_ids = sorted(allowed_ids(m) - tok.stop_ids)
            if not m.done and text_ids:
                m.advance(rng.choice(text_ids))
    assert StepMasks.start([None, None]) is None


def test_step_masks_give_the_tokens_of_per_row_masking(tok, model, monkeypatch):
    """Greedy and seeded sampling give the same tokens through the step masks as through per-row masking."""
    from chatforge.generation import constraint as cmod

    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    schemas = [SCHEMAS["nested"], None, SCHEMAS["array"], SCHEMAS["bounds"]]
    params = [SamplingParams(temperature=t, max_new_tokens=60, seed=i,
                             constraint=Constraint.json_schema(s) if s else None)
              for t in (0.0, 1.0) for i, s in enumerate(schemas)]
    prompts = prompts * 2
    new = Engine(model, tok, max_batch_size=8).generate_batch(prompts, params)
    monkeypatch.setattr(cmod.StepMasks, "start", classmethod(lambda cls, matchers: None))  # the old per-row path
    old = Engine(model, tok, max_batch_size=8).generate_batch(prompts, params)
    assert [c.token_ids for c in new] == [c.token_ids for c in old]
    assert [c.text for c in new] == [c.text for c in old]
