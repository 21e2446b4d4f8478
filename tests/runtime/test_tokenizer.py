"""ringfuse.runtime.tokenizer vs HF transformers loading the same GGUF (the reference)."""

import json
import random
import re
import shutil
from collections import Counter
from pathlib import Path

import jinja2
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")

from ringfuse.runtime.tokenizer import LONG_TEXT, IncrementalDecoder, Tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def gguf_path(default_gguf_path) -> Path:
    """The default model's GGUF (RINGFUSE_TEST_GGUF overrides it; see conftest.py)."""
    return default_gguf_path


@pytest.fixture(scope="module")
def metadata(gguf_path):
    reader = gguf.GGUFReader(gguf_path)
    return {key: field.contents() for key, field in reader.fields.items()}


@pytest.fixture(scope="module")
def tok(metadata) -> Tokenizer:
    return Tokenizer.from_gguf(metadata)


@pytest.fixture(scope="module")
def hf(gguf_path):
    return transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. It's 3:45pm; isn't it?",
    "def add(a, b):\n\treturn a + b\n\n\nclass Foo:\n    pass  # comment\n",
    "12345",
    "Pi is 3.14159, e is 2.71828 and 1000000 is a million",
    "emoji 😀🎉👍🏽 and a family 👨‍👩‍👧",
    "中文字符，日本語のテキスト，한국어",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "a<|endoftext|>b <repo_name>x<file_sep>",
    " leading space",
    "   three leading spaces",
    "trailing spaces   ",
    "\n\nnewlines\r\nand\ttabs\t\t",
    "",
    "ünïcödé àccents ß",
    "<|im_start|>",
]
# Whitespace directly before a digit: the only place the "smollm" split (digits first, as
# SmolLM2's own tokenizer.json and llama.cpp do) and HF's GGUF loader (GPT-2 split) differ.
DIGIT_AFTER_SPACES = ["x  1", "    1. item", "total:\t\t42", "a \n 7"]


# -- encode / decode vs HF ------------------------------------------------------------------

@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_hf(tok, hf, add_special_tokens):
    for text in TEXTS:
        assert tok.encode(text, add_special_tokens) == hf.encode(text, add_special_tokens=add_special_tokens), text


def require_pre(metadata, pre):
    if (metadata.get("tokenizer.ggml.model"), metadata.get("tokenizer.ggml.pre")) != ("gpt2", pre):
        pytest.skip(f"needs a gpt2/{pre} GGUF tokenizer")


def test_smollm_digits_split_individually(tok, metadata):
    require_pre(metadata, "smollm")
    digits = [tok.token_to_id(d) for d in "12345"]
    assert tok.encode("12345") == digits
    assert tok.encode("x 12345")[-5:] == digits


def test_smollm_split_matches_original_tokenizer(tok, hf, metadata):
    """On whitespace before digits we follow SmolLM2's own pre-tokenizer (Digits, then
    ByteLevel with the GPT-2 regex), not HF's GGUF loader; everywhere else both agree."""
    require_pre(metadata, "smollm")
    original = tokenizers.Tokenizer.from_str(hf.backend_tokenizer.to_str())
    original.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Digits(individual_digits=True),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    for text in TEXTS + DIGIT_AFTER_SPACES:
        assert tok.encode(text, False) == original.encode(text, add_special_tokens=False).ids, text
    # "x  1": one "  " token, where the GPT-2 split would give " " + " " (no " 1" token exists)
    assert tok.encode("x  1") == [tok.token_to_id(t) for t in ("x", "ĠĠ", "1")]


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_matches_hf(tok, hf, skip_special_tokens):
    rng = random.Random(0)
    cases = [hf.encode(t) for t in TEXTS]
    cases += [[rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))] for _ in range(100)]
    cases += [[rng.choice([0, 1, 2, 5, 198, 216, rng.randrange(tok.vocab_size)]) for _ in range(12)]
              for _ in range(50)]
    for ids in cases:
        assert tok.decode(ids, skip_special_tokens) == hf.decode(ids, skip_special_tokens=skip_special_tokens)


def test_roundtrip_and_input_types(tok):
    for text in TEXTS + DIGIT_AFTER_SPACES:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("Hello world")
    assert tok.decode(tuple(ids)) == tok.decode(iter(ids)) == "Hello world"
    np = pytest.importorskip("numpy")
    assert tok.decode(np.array(ids)) == "Hello world"
    assert tok.decode(ids[0]) == "Hello"


def test_attributes(tok, hf):
    assert tok.vocab_size == len(hf)
    assert tok.bos_token_id == hf.bos_token_id and tok.eos_token_ids[0] == hf.eos_token_id
    assert tok.add_bos == hf.add_bos_token
    assert tok.chat_template == hf.chat_template


# -- chat template ----------------------------------------------------------------------------

CHATS = {
    "user": [{"role": "user", "content": "Hi there!"}],
    "system+user": [{"role": "system", "content": "You are terse."},
                    {"role": "user", "content": "Name a color. 中文 😀"}],
    "multi-turn": [{"role": "user", "content": "What is 2+2?"},
                   {"role": "assistant", "content": "4"},
                   {"role": "user", "content": "And 3+3?"}],
}


@pytest.mark.parametrize("name", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_hf(tok, hf, name, add_generation_prompt):
    messages = CHATS[name]
    text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    ids = tok.encode_chat(messages, add_generation_prompt=add_generation_prompt)
    assert ids == hf.apply_chat_template(messages, tokenize=True, return_dict=False,
                                         add_generation_prompt=add_generation_prompt)


def test_encode_chat_of_a_string_is_one_user_message(tok):
    assert tok.encode_chat("Hi there!") == tok.encode_chat(CHATS["user"])


def test_chat_template_environment_as_hf(tok, hf):
    """raise_exception, tojson (no HTML escaping), loopcontrols, strftime_now, trim/lstrip blocks
    and {% generation %} render as in HF."""
    template = (
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}{% endif %}\n"
        "  {% if loop.index > 2 %}{% break %}{% endif %}\n"
        "{{ bos_token }}{{ m | tojson }}{% generation %}{{ m['content'] }}{% endgeneration %}{{ eos_token }}\n"
        "{% endfor %}{{ strftime_now('%Y') | length }}")
    messages = [{"role": "user", "content": "<a href='x'>&</a> ü"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}]
    custom = Tokenizer(tok._tok, vocab_size=tok.vocab_size, bos_token_id=1, eos_token_ids=[2],
                       chat_template=template, special_tokens={"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"})
    expected = hf.apply_chat_template(messages, chat_template=template, tokenize=False)
    assert custom.apply_chat_template(messages, add_generation_prompt=False) == expected
    with pytest.raises(jinja2.exceptions.TemplateError, match="no tools"):
        custom.apply_chat_template([{"role": "tool", "content": "x"}])


# -- streaming decode -------------------------------------------------------------------------

def stream(decoder: IncrementalDecoder, ids) -> str:
    return "".join(decoder.push(i) for i in ids) + decoder.flush()


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_incremental_decoder_on_text(tok, skip_special_tokens):
    text = "".join(TEXTS + DIGIT_AFTER_SPACES) + "🏳️‍🌈 终于 ́"
    ids = tok.encode_chat(text)
    dec = tok.decoder(skip_special_tokens=skip_special_tokens)
    pieces = [dec.push(i) for i in ids]
    # a character split across byte-level tokens never comes out as U+FFFD
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) + dec.flush() == tok.decode(ids, skip_special_tokens=skip_special_tokens)
    # the decoder is reusable after flush()
    assert stream(dec, tok.encode("😀 ok")) == "😀 ok"


def test_incremental_decoder_holds_split_characters(tok):
    ids = tok.encode("😀")
    assert len(ids) > 1  # the emoji's 4 bytes span several tokens
    dec = tok.decoder()
    assert [dec.push(i) for i in ids] == [""] * (len(ids) - 1) + ["😀"]
    dec = tok.decoder()
    dec.push(ids[0])
    assert dec.flush() == tok.decode(ids[:1]) == "\ufffd"  # incomplete at the end: as decode()


@settings(max_examples=300, deadline=None)
@given(data=st.data(), skip=st.booleans())
def test_incremental_decoder_property(tok, data, skip):
    special = list(range(17))
    ids = data.draw(st.lists(st.one_of(st.integers(0, tok.vocab_size - 1), st.sampled_from(special),
                                       st.integers(100, 300)),  # the single-byte tokens
                             max_size=40))
    assert stream(tok.decoder(skip), ids) == tok.decode(ids, skip)


# -- from_folder --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folder(hf, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf_tokenizer")
    hf.save_pretrained(path)
    return path


def test_from_folder_matches_gguf(tok, hf, folder):
    ft = Tokenizer.from_folder(folder)
    assert (ft.vocab_size, ft.bos_token_id, ft.eos_token_ids, ft.add_bos, ft.chat_template) == \
        (tok.vocab_size, tok.bos_token_id, tok.eos_token_ids, tok.add_bos, tok.chat_template)
    for text in TEXTS:
        assert ft.encode(text) == tok.encode(text), text
    for text in TEXTS + DIGIT_AFTER_SPACES:  # the folder holds HF's own pre-tokenizer
        assert ft.encode(text) == hf.encode(text), text
    for messages in CHATS.values():
        assert ft.encode_chat(messages) == tok.encode_chat(messages)
    ids = tok.encode("".join(TEXTS))
    assert ft.decode(ids, True) == tok.decode(ids, True)
    assert stream(ft.decoder(), ids) == ft.decode(ids, True)


def test_from_folder_config_variants(folder, tmp_path):
    """generation_config eos lists, a template inside tokenizer_config.json, add_bos_token."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folder / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    template = (folder / "chat_template.jinja").read_text()
    config.update(chat_template=template, add_bos_token=True)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0], "bos_token_id": 1}))
    ft = Tokenizer.from_folder(tmp_path)
    assert ft.eos_token_ids == (2, 0)
    assert ft.chat_template == template
    assert ft.add_bos and ft.encode("Hi") == [1] + ft.encode("Hi", add_special_tokens=False)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}))
    assert Tokenizer.from_folder(tmp_path).eos_token_ids == (2, 0)


@pytest.mark.parametrize("name,content,match", [
    ("tokenizer_config.json", "[]", "tokenizer_config.json: must hold a JSON object, got list"),
    ("tokenizer_config.json", "{oops", "tokenizer_config.json: not valid JSON"),
    ("generation_config.json", '{"eos_token_id": "x"}', "eos_token_id must be a token id or a list of them, got 'x'"),
    ("generation_config.json", '{"eos_token_id": 1.5}', "eos_token_id must be a token id"),
    ("tokenizer_config.json", '{"bos_token": 5}', "bos_token must be a string or"),
    ("tokenizer_config.json", '{"chat_template": [{"template": "x"}]}', "chat_template as a list must hold"),
    ("tokenizer_config.json", '{"chat_template": 5}', "chat_template must be a string"),
    ("chat_template.json", "[1]", "chat_template.json: must hold a JSON object"),
    ("tokenizer.json", "[1]", "tokenizer.json: not a tokenizers file"),
    ("tokenizer_config.json", '{"add_bos_token": "false"}', "add_bos_token must be true or false, got 'false'"),
    ("tokenizer_config.json", '{"add_eos_token": 1}', "add_eos_token must be true or false, got 1"),
])  # fmt: skip
def test_from_folder_malformed_files_are_named(folder, tmp_path, name, content, match):
    """These gave AttributeError, KeyError, JSONDecodeError, a jinja TypeError or the
    tokenizers library's bare Exception, none naming the file."""
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folder / f, tmp_path / f)
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path)) + ".*" + match):
        Tokenizer.from_folder(tmp_path)


@pytest.mark.parametrize("call,exc,match", [
    (lambda t: t.decode("12"), TypeError, "decode: ids must be token ids \\(ints\\), got a str"),  # was 2 ids
    (lambda t: t.decode([1.7]), TypeError, "decode: ids must be ints, got 1.7"),  # was truncated to 1
    (lambda t: t.decode([[1, 2]]), TypeError, "decode: ids must be ints, got \\[1, 2\\]"),
    (lambda t: t.decode(None), TypeError, "decode: ids must be an int or a sequence of ints"),
    (lambda t: t.decode([-1]), ValueError, "decode: ids must be >= 0"),  # was OverflowError
    (lambda t: t.decode([2**70]), ValueError, "decode: ids must be >= 0 \\(and < 2\\*\\*32\\)"),
    (lambda t: t.token_bytes(-1), ValueError, "token_bytes: token_id must be >= 0"),
    (lambda t: t.decoder().push(-1), ValueError, "IncrementalDecoder.push: token_id must be >= 0"),
    (lambda t: t.decoder().push([5]), TypeError, "IncrementalDecoder.push: token_id must be an int, got \\[5\\]"),
    (lambda t: t.token_bytes(2.0), TypeError, "token_bytes: token_id must be an int, got 2.0"),
    (lambda t: t.id_to_token(-3), ValueError, "id_to_token: token_id must be >= 0"),  # was OverflowError
    (lambda t: t.decode([5, 7, True]), TypeError, "decode: ids must be ints, got True"),
    (lambda t: t.decode(np.array([5, -2])), ValueError, "decode: ids must be >= 0 \\(and < 2\\*\\*32\\), got -2"),
    (lambda t: t.encode("hi", add_special_tokens="no"), TypeError, "add_special_tokens must be True or False"),
])  # fmt: skip
def test_bad_ids_are_clear_errors(tok, call, exc, match):
    with pytest.raises(exc, match=match):
        call(tok)


def test_one_id_may_be_a_0d_tensor_or_numpy_scalar(tok):
    # push(logits.argmax()) is the natural call; int() accepted these before ids were checked
    ids = tok.encode("hello world", add_special_tokens=False)
    dec = tok.decoder()
    text = "".join(dec.push(torch.tensor(i) if k % 2 else np.int64(i)) for k, i in enumerate(ids)) + dec.flush()
    assert text == tok.decode(ids)
    assert tok.token_bytes(torch.tensor(ids[0])) == tok.token_bytes(ids[0])
    assert tok.id_to_token(np.int32(ids[0])) == tok.id_to_token(ids[0])
    assert tok.decode(torch.tensor(ids)) == tok.decode(np.array(ids)) == tok.decode(ids)


def test_ids_past_the_vocabulary_decode_to_nothing(tok):
    # a model's padding rows (vocab_size above the tokenizer's) can be sampled: as in HF
    assert tok.decode([tok.vocab_size, tok.vocab_size + 5]) == "" and tok.token_bytes(tok.vocab_size) == b""


def test_streaming_emits_a_replacement_character_the_model_wrote(tok):
    """Text ending in U+FFFD was always held back as a split character: a model writing the
    character itself streamed nothing until flush(), re-decoding an ever longer window."""
    (fffd,) = tok.encode("\ufffd", add_special_tokens=False)
    dec = tok.decoder()
    assert [dec.push(fffd) for _ in range(3)] == ["\ufffd"] * 3 and dec.flush() == ""
    emoji = tok.encode("🙂", add_special_tokens=False)  # byte-level pieces of one character
    assert len(emoji) > 1
    dec = tok.decoder()
    assert [dec.push(t) for t in emoji] == [""] * (len(emoji) - 1) + ["🙂"]  # held until complete


def test_gemma_gguf_vocabularies_match_transformers():
    """transformers reads Gemma GGUFs with two fixes (gemma_tokenizer): space-only tokens
    stored as real spaces are looked up as ▁s, and merges follow the file order, not the
    scores. Without them runs of spaces and many words tokenized differently. The space
    tokens are user-defined (type 4), as in Gemma files: HF looks those up as spelled in the
    file, so the respelled ▁ runs must not become added tokens."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    md = synthetic_sentencepiece_metadata()
    n = len(md["tokenizer.ggml.tokens"])
    md.update({"general.architecture": "gemma2", "tokenizer.ggml.add_space_prefix": False,
               "tokenizer.ggml.tokens": list(md["tokenizer.ggml.tokens"]) + ["  ", "    "],
               # scores that disagree with the file order
               "tokenizer.ggml.scores": [0.0] * 259 + [float(-(i % 7)) for i in range(n - 260)] + [0.0] * 3,
               "tokenizer.ggml.token_type": list(md["tokenizer.ggml.token_type"]) + [4, 4]})  # fmt: skip
    ours = Tokenizer.from_gguf(md)
    d = hf_tokenizer_dict(md)
    d["add_prefix_space"] = False
    ref, _ = convert_gguf_tokenizer("gemma2", d)
    for text in ["the  dog", "x    y", "the quick brown fox", "hello world", "the lazy dog sleeps", "a\u2581\u2581b"]:
        assert ours.encode(text, False) == ref.encode(text, add_special_tokens=False).ids, text
    assert ours.token_bytes(n) == b"  " and ours.decode([n]) == "  "


def test_long_texts_let_other_threads_run(tok):
    """A server tokenizes in a worker thread; the single encode call held the GIL for the
    whole text (~2 s for 4 MB), stalling its event loop. Long texts go through the batch call,
    which releases it: the same ids, and a thread counting meanwhile gets far further."""
    import threading

    text = "Hello wörld, 12 tokens! " * 12000  # ~290 KB

    def counted_while(fn):
        state = {"on": False, "done": False}

        def worker():
            state["on"] = True
            fn()
            state["done"] = True

        t, n = threading.Thread(target=worker), 0
        t.start()
        while not state["done"]:
            n += state["on"]
        t.join()
        return n

    assert len(text) >= LONG_TEXT and tok.encode(text) == tok._tok.encode(text).ids
    ids = tok.encode(text)
    assert tok.decode(ids) == tok._tok.decode(ids)
    holding = counted_while(lambda: tok._tok.encode(text))  # the GIL held throughout
    releasing = counted_while(lambda: tok.encode(text))
    assert releasing > 5 * max(holding, 1000), (releasing, holding)


def test_from_folder_without_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_folder(tmp_path)


# -- other GGUF tokenizer types -----------------------------------------------------------------

def hf_tokenizer_dict(md: dict) -> dict:
    """transformers' renaming of the tokenizer.ggml.* keys (get_gguf_tokenizer)."""
    renames = {"model": "tokenizer_type", "pre": "pre_tokenizer_type", "tokens": "tokens", "scores": "scores",
               "token_type": "token_type", "merges": "merges", "bos_token_id": "bos_token_id",
               "eos_token_id": "eos_token_id", "unknown_token_id": "unk_token_id"}
    return {new: md[f"tokenizer.ggml.{old}"] for old, new in renames.items() if f"tokenizer.ggml.{old}" in md}


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt-2"])
def test_bpe_pre_types_match_hf_converter(metadata, pre):
    """Llama-3 / Qwen2 / GPT-2 splits, checked with the SmolLM2 vocab against the backend
    transformers' GGUF loader builds for that pre type."""
    if metadata["tokenizer.ggml.model"] != "gpt2":
        pytest.skip("needs a byte-level BPE vocabulary")
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    md = {**metadata, "tokenizer.ggml.pre": pre}
    ref, _ = convert_gguf_tokenizer("llama", hf_tokenizer_dict(md))
    ours = Tokenizer.from_gguf(md)
    for text in TEXTS + DIGIT_AFTER_SPACES + ["I'M HERE's 1234567 abc\n\n  \n x"]:
        assert ours.encode(text, False) == ref.encode(text, add_special_tokens=False).ids, (pre, text)


def synthetic_sentencepiece_metadata() -> dict:
    """A tiny Llama-2-style vocabulary: <unk> <s> </s>, 256 byte tokens, pieces ranked by score,
    a user-defined token, no merges (they come from the scores, as in Llama 2 GGUFs)."""
    corpus = "the quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs! hello world " * 3
    text = "▁" + corpus.replace(" ", "▁")
    counts = Counter(text[i:i + n] for n in (2, 3, 4, 5) for i in range(len(text) - n + 1))
    pieces = list(dict.fromkeys(sorted(set(text)) + [p for p, c in counts.most_common(300) if c >= 3]))
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + ["<|user|>"]
    return {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0],
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces) + [4],
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.eot_token_id": len(tokens) - 1,
    }


SP_TEXTS = ["the quick fox", " hello  world", "Hello 中文 😀 x", "<s>the dog</s>", "dog<|user|>fox", "\n\tzz", ""]


def test_sentencepiece_matches_hf_converter():
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    md = synthetic_sentencepiece_metadata()
    ours = Tokenizer.from_gguf(md)
    ref, _ = convert_gguf_tokenizer("llama", hf_tokenizer_dict(md))
    assert ours.add_bos and ours.bos_token_id == 1  # llama files without the flag add BOS
    assert ours.eos_token_ids == (2, len(md["tokenizer.ggml.tokens"]) - 1)  # eos + eot
    for text in SP_TEXTS:
        ids = ref.encode(text, add_special_tokens=False).ids
        assert ours.encode(text, add_special_tokens=False) == ids, text
        assert ours.encode(text) == [1] + ids
        for skip in (True, False):
            assert ours.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip)
    assert ours.decode(ours.encode("the dog"), skip_special_tokens=True) == "the dog"


@pytest.fixture(scope="module")
def sp_tok() -> Tokenizer:
    return Tokenizer.from_gguf(synthetic_sentencepiece_metadata())


@settings(max_examples=300, deadline=None)
@given(data=st.data(), skip=st.booleans())
def test_sentencepiece_incremental_decoder_property(sp_tok, data, skip):
    """Byte-fallback runs (<0xE4><0xB8><0xAD> = 中, or invalid ones) and the leading-space strip."""
    ids = data.draw(st.lists(st.one_of(st.integers(0, sp_tok.vocab_size - 1), st.integers(0, 2),
                                       st.integers(3 + 0x20, 3 + 0x7F), st.integers(3 + 0x80, 3 + 0xFF)),
                             max_size=30))
    assert stream(sp_tok.decoder(skip), ids) == sp_tok.decode(ids, skip)


def test_sentencepiece_incremental_decoder_on_text(sp_tok):
    ids = sp_tok.encode("the dog 中文 😀 fox</s> hello")
    dec = sp_tok.decoder()
    pieces = [dec.push(i) for i in ids]
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) + dec.flush() == sp_tok.decode(ids, True) == "the dog 中文 😀 fox hello"


@pytest.mark.parametrize("text", ["Hi 😀 🌟 日本", " hello  world", "the dog 中文 😀 fox", "\n\tzz"])
def test_token_bytes_add_up_to_the_text(tok, sp_tok, text):
    """token_bytes (what a server's logprobs carry): a piece of a multi-byte character is its
    bytes (byte-level BPE pieces, SentencePiece <0xXX> fallbacks), not U+FFFD's."""
    ids = tok.encode(text, add_special_tokens=False)
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode()
    assert tok.token_bytes(tok.encode("<|im_end|>", add_special_tokens=False)[0]) == b"<|im_end|>"
    sp_ids = sp_tok.encode(text, add_special_tokens=False)  # "▁" is a space; decode() strips the leading one
    assert b"".join(sp_tok.token_bytes(i) for i in sp_ids).decode().removeprefix(" ") == sp_tok.decode(sp_ids)
    assert any(len(sp_tok.token_bytes(i)) == 1 and sp_tok.token_bytes(i)[0] >= 0x80 for i in sp_ids) == (
        not text.isascii())  # the byte fallbacks of 中文 😀: one byte each


# -- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("merges,match", [
    (["abc"], "each merge must be two tokens separated by one space"),
    (["a b c"], "each merge must be two tokens separated by one space"),
    ([7], "each merge must be two tokens"),
    (["zz qq"], "out of vocabulary"),
])  # fmt: skip
def test_malformed_merges_name_the_key(metadata, merges, match):
    with pytest.raises(ValueError, match=f"tokenizer.ggml.merges: .*{match}"):
        Tokenizer.from_gguf(dict(metadata, **{"tokenizer.ggml.merges": merges}))


def test_unsupported_tokenizer_model(metadata):
    with pytest.raises(ValueError, match="'bert'.*supported"):
        Tokenizer.from_gguf({**metadata, "tokenizer.ggml.model": "bert"})


def test_unsupported_pre_type(metadata):
    with pytest.raises(ValueError, match="'chameleon'.*llama-bpe"):
        Tokenizer.from_gguf({**metadata, "tokenizer.ggml.pre": "chameleon"})


@pytest.mark.parametrize("key", ["tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.model"])
def test_missing_metadata_key(metadata, key):
    if key.endswith("merges") and metadata["tokenizer.ggml.model"] != "gpt2":
        pytest.skip("merges are optional for SentencePiece vocabularies")
    md = {k: v for k, v in metadata.items() if k != key}
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        Tokenizer.from_gguf(md)


def test_sentencepiece_without_scores_or_merges():
    md = synthetic_sentencepiece_metadata()
    del md["tokenizer.ggml.scores"]
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.scores"):
        Tokenizer.from_gguf(md)


def test_no_chat_template(metadata):
    md = {k: v for k, v in metadata.items() if k != "tokenizer.chat_template"}
    t = Tokenizer.from_gguf(md)
    assert t.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        t.apply_chat_template(CHATS["user"])
    with pytest.raises(ValueError, match="no chat template"):
        t.encode_chat("hi")


def test_bad_inputs(tok):
    for bad in (b"bytes", None, 12, ["a"]):
        with pytest.raises(TypeError):
            tok.encode(bad)
    with pytest.raises(ValueError):
        tok.apply_chat_template([])
    with pytest.raises(TypeError):
        tok.apply_chat_template(["hi"])


@pytest.mark.parametrize("messages, exc, match", [
    ([{"role": "user"}], ValueError, r"messages\[0\] has no 'content'"),
    ([{"role": "system", "content": "x"}, {"content": "hi"}], ValueError, r"messages\[1\] has no 'role'"),
    ([{"role": "user", "content": None}], ValueError, r"messages\[0\] has no 'content'"),
    ([{"role": "user", "content": b"hi"}], TypeError, r"messages\[0\]\['content'\] must be a str, got bytes"),
    ([{"role": 3, "content": "hi"}], TypeError, r"messages\[0\]\['role'\] must be a str, got int"),
    ([{"role": "user", "content": "a\udcffb"}], ValueError, r"messages\[0\]\['content'\] is not valid Unicode"),
    (["hi"], TypeError, r"messages\[0\] must be a dict"),
])  # fmt: skip
def test_bad_chat_messages_are_clear_errors(tok, messages, exc, match):
    with pytest.raises(exc, match=match):
        tok.apply_chat_template(messages)


def test_template_failures_are_value_errors(tok):
    """A template refusing its messages (raise_exception) or needing a key they lack is a
    ValueError (and still jinja2's TemplateError, as HF raises)."""
    custom = Tokenizer(tok._tok, vocab_size=tok.vocab_size, bos_token_id=1, eos_token_ids=[2],
                       chat_template="{{ raise_exception('no') }}", special_tokens={})  # fmt: skip
    with pytest.raises(ValueError, match="no") as e:
        custom.apply_chat_template([{"role": "user", "content": "x"}])
    assert isinstance(e.value, jinja2.exceptions.TemplateError)
    custom.chat_template = "{{ messages[0]['name'] + 'x' }}"
    with pytest.raises(ValueError, match="cannot render"):
        custom.apply_chat_template([{"role": "user", "content": "x"}])
    tool_call = {"role": "assistant", "tool_calls": [{"name": "f"}]}  # content may be left out here...
    with pytest.raises(ValueError, match="cannot render.*content"):  # ...but SmolLM2's template wants it
        tok.apply_chat_template([tool_call])


def test_text_with_lone_surrogates_is_a_clear_error(tok):
    bad = b"caf\xe9".decode("utf-8", "surrogateescape")  # latin-1 bytes read as UTF-8 with surrogateescape
    for call in (tok.encode, tok.encode_chat):
        with pytest.raises(ValueError, match=r"not valid Unicode.*index 3"):
            call(bad)
    with pytest.raises(TypeError, match="decode bytes first"):
        tok.encode(b"hi")
