"""Tokenizer of the runtime: a `tokenizers.Tokenizer` built from GGUF metadata or loaded from
an HF folder, plus HF-compatible chat templates and a streaming decoder.

transformers is not needed at run time. The GGUF path rebuilds what transformers' GGUF loader
(integrations/gguf/gguf_tokenizer_mapping.py) builds, so the ids match HF's
``AutoTokenizer.from_pretrained(dir, gguf_file=...)``, with one deliberate difference: the
pre-tokenizer split follows ``tokenizer.ggml.pre`` for every type llama.cpp defines, where HF
falls back to GPT-2's split for the types it does not list. For "smollm" (and StarCoder-like
vocabularies) that means digits are split one by one first, as the original tokenizer.json
and llama.cpp do; HF's GGUF loader only differs from that on whitespace directly before a
digit ("x  1", "    1."), where it gives the tokenization the model never saw in training.
"""

from __future__ import annotations

import json
import numbers
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

__all__ = ["Tokenizer", "IncrementalDecoder", "SUPPORTED_GGUF_TOKENIZERS"]

# llama.cpp token types (tokenizer.ggml.token_type)
_CONTROL, _USER_DEFINED = 3, 4

# Pre-tokenizer splits of byte-level BPE vocabularies, by tokenizer.ggml.pre (llama.cpp's
# names, see llama-vocab.cpp): the splits applied one after the other before ByteLevel, and
# whether ByteLevel then runs its own GPT-2 regex. _DIGITS is the pinned SmolLM2 /
# StarCoder tokenizer.json step (llama.cpp writes it as a \p{N} split; Digits' is_numeric
# differs from \p{N} on a few obscure code points only, and it is what the vocab was trained with).
_DIGITS = "digits"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS: dict[str, tuple[tuple[str, ...], bool]] = {
    "gpt2": ((), True), "digits+gpt2": ((_DIGITS,), True),
    "llama3": ((_LLAMA3,), False), "qwen2": ((_QWEN2,), False),
}
_BPE_PRE_TYPES: dict[str, str] = {
    **dict.fromkeys(("default", "gpt-2", "gpt2", "mpt", "olmo"), "gpt2"),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell"), "digits+gpt2"),
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "falcon3", "smaug-bpe", "dbrx", "pixtral"),
                    "llama3"),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), "qwen2"),
}
# Texts from this many characters (and id lists from a quarter of it) go through the
# tokenizers library's batch calls, which release the GIL: a multi-MB prompt tokenized in a
# server's worker thread then no longer stalls its event loop (the single calls hold the GIL
# for the whole encode, ~2 s for 4 MB). Short ones keep the single calls: the batch ones
# start the library's thread pool, after which a fork prints its parallelism warning.
LONG_TEXT = 64 * 1024

SUPPORTED_GGUF_TOKENIZERS = {"gpt2": tuple(sorted(_BPE_PRE_TYPES)), "llama": ("(any pre)",)}

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable char table that byte-level BPE vocabularies are spelled in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_OF_CHAR = {c: b for b, c in _bytes_to_unicode().items()}  # byte-level piece char -> byte


def _required(metadata: Mapping[str, Any], key: str) -> Any:
    if key not in metadata or metadata[key] is None:
        raise ValueError(f"GGUF metadata has no {key!r}: cannot build the tokenizer")
    return metadata[key]


def _token_ids(ids: Any, what: str) -> list[int]:
    """``ids`` (an int, a sequence, a numpy array or a tensor) as a list of ints in [0, 2**32):
    a str is not a sequence of ids, a float is not an id (int() would truncate it), and a
    negative id is a ValueError naming ``what``, not the tokenizers library's OverflowError.
    A list of plain ints (the common case) is checked with C-speed passes (type, min, max):
    long decodes run off the GIL (decode_batch), and a per-id Python check took most of it."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)):
        raise TypeError(f"{what} must be token ids (ints), got a {type(ids).__name__}")
    try:
        ids = [ids] if isinstance(ids, numbers.Integral) else list(ids)
    except TypeError:
        raise TypeError(f"{what} must be an int or a sequence of ints, got {type(ids).__name__}") from None
    if not all(type(i) is int for i in ids):  # numpy / other Integral ids, or something wrong
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, numbers.Integral):
                raise TypeError(f"{what} must be ints, got {i!r}")
        ids = [int(i) for i in ids]
    if ids and (min(ids) < 0 or max(ids) >= 1 << 32):
        bad = next(i for i in ids if not 0 <= i < 1 << 32)
        raise ValueError(f"{what} must be >= 0 (and < 2**32), got {bad}")
    return ids


def _token_id(token_id: Any, what: str) -> int:
    """One token id: an int, or a 0-d tensor / numpy scalar (``logits.argmax()``)."""
    if hasattr(token_id, "tolist"):
        token_id = token_id.tolist()
    if isinstance(token_id, bool) or not isinstance(token_id, numbers.Integral):
        raise TypeError(f"{what} must be an int, got {token_id!r}")
    return _token_ids([int(token_id)], what)[0]


def _as_list(value: Any) -> list:
    return value.tolist() if hasattr(value, "tolist") else list(value)


def _sentencepiece_merges(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """Merges implied by a SentencePiece vocabulary (transformers' ``generate_merges``): every
    split of a token into two vocabulary tokens, ranked by the merged token's score, so BPE
    reproduces SentencePiece's highest-score-first merging."""
    vocab = {t: i for i, t in enumerate(tokens)}
    scored = dict(zip(tokens, scores))
    merges = []
    for merge, score in scored.items():
        local = [(merge[:k], merge[k:], score) for k in range(1, len(merge))
                 if merge[:k] in vocab and merge[k:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _generation_tag():
    """Jinja extension for the ``{% generation %}`` blocks some templates mark assistant text
    with (HF uses them for training masks); rendering only needs the block's body."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class GenerationTag(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    return GenerationTag


@lru_cache(maxsize=1)
def _chat_template_error() -> type:
    """The error of a template that refuses or fails on its messages: a jinja2 TemplateError
    (as HF raises) that is also a ValueError (a bad input, as callers catch it)."""
    import jinja2

    return type("ChatTemplateError", (jinja2.exceptions.TemplateError, ValueError), {})


def _check_text(text: str, what: str) -> None:
    """A str the tokenizer can take: lone surrogates (undecodable bytes that Python kept with
    surrogateescape, from argv or a pipe) have no UTF-8 form and the backend refuses them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode text: it holds the lone surrogate {text[e.start]!r} at index "
                         f"{e.start} (bytes that were not UTF-8?); decode such bytes with errors='replace' "
                         "first") from None  # fmt: skip


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Messages as a template may index them: each a dict with a str "role" and a str
    "content" (an assistant's tool-call message may leave content out); None values dropped
    as HF does, since templates test for a missing key, not a literal None."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    chat = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TypeError(f"messages[{i}] must be a dict with 'role' and 'content', got {m!r}")
        m = {k: v for k, v in m.items() if v is not None}
        for key in ("role", "content"):
            if key not in m:
                if key == "content" and "tool_calls" in m:
                    continue
                raise ValueError(f"messages[{i}] has no {key!r}: each message needs 'role' and 'content' "
                                 f"strings, got keys {sorted(map(str, m))}")  # fmt: skip
            if not isinstance(m[key], str):
                raise TypeError(f"messages[{i}][{key!r}] must be a str, got {type(m[key]).__name__}")
            _check_text(m[key], f"messages[{i}][{key!r}]")
        chat.append(m)
    return chat


@lru_cache(maxsize=16)
def _compile_template(source: str):
    """Compile a chat template in the environment HF renders it in (sandboxed, trim/lstrip
    blocks, loopcontrols, raise_exception, strftime_now, non-HTML-escaping tojson)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise _chat_template_error()(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters, which would change the prompt
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _generation_tag()])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class Tokenizer:
    """Text <-> token ids for one model; see the module docstring for where it comes from."""

    def __init__(self, backend: tokenizers.Tokenizer, *, vocab_size: int,
                 bos_token_id: int | None, eos_token_ids: Iterable[int],
                 chat_template: str | None = None,
                 special_tokens: Mapping[str, str | None] | None = None) -> None:
        self._tok = backend
        self.vocab_size = int(vocab_size)
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(dict.fromkeys(int(i) for i in eos_token_ids))
        self.chat_template = chat_template
        # bos_token / eos_token / unk_token / pad_token strings the template may refer to
        self._special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        # Probe the post-processor rather than trusting a flag: it is what encode() runs.
        probe = backend.encode("", add_special_tokens=True).ids
        self.add_bos = bos_token_id is not None and probe[:1] == [bos_token_id]
        self._special_ids = frozenset(
            i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        # ByteFallback decoding turns a run of <0xXX> tokens into text as a whole (one U+FFFD
        # per byte if the run is invalid UTF-8), so the streaming decoder must see whole runs.
        decoder_state = backend.decoder.__getstate__() if backend.decoder is not None else b""
        byte_fallback = b'"ByteFallback"' in decoder_state
        self._byte_level = b'"ByteLevel"' in decoder_state  # pieces spell bytes (GPT-2's byte alphabet)
        self._added_ids = frozenset(backend.get_added_tokens_decoder())
        self._byte_ids = frozenset(
            i for t, i in backend.get_vocab().items() if byte_fallback and _BYTE_TOKEN.fullmatch(t))

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build from GGUF metadata as ``weights.read_gguf_header`` gives it (the values of
        ``gguf.GGUFReader``'s ``field.contents()``)."""
        model = _required(metadata, "tokenizer.ggml.model")
        tokens = [str(t) for t in _as_list(_required(metadata, "tokenizer.ggml.tokens"))]
        file_tokens = tokens  # as spelled in the file (Gemma's are respelled below), as HF reads user-defined ones
        types = _as_list(metadata.get("tokenizer.ggml.token_type") or [])
        pre = metadata.get("tokenizer.ggml.pre") or "default"

        def token_of(key: str) -> tuple[int | None, str | None]:
            i = metadata.get(f"tokenizer.ggml.{key}")
            return (int(i), tokens[int(i)]) if i is not None and 0 <= int(i) < len(tokens) else (None, None)

        (bos_id, bos), (eos_id, eos) = token_of("bos_token_id"), token_of("eos_token_id")
        unk, pad = token_of("unknown_token_id")[1], token_of("padding_token_id")[1]

        if model == "gpt2":
            if pre not in _BPE_PRE_TYPES:
                raise ValueError(
                    f"GGUF tokenizer model 'gpt2' with pre-tokenizer (tokenizer.ggml.pre) {pre!r} "
                    f"is not supported; supported pre types: {sorted(_BPE_PRE_TYPES)}")
            backend, alphabet = cls._byte_level_bpe(tokens, metadata, pre), set(_bytes_to_unicode().values())
            # A control token outside the byte alphabet is a llama.cpp mislabel of an ordinary
            # token (as transformers reasons): making it special would change the tokenization.
            spelled = lambda t: set(t) <= alphabet  # noqa: E731
            add_bos_default = False
        elif model == "llama":
            # Gemma files (transformers' gemma_tokenizer): a token of spaces is stored as real
            # spaces but looked up as ▁s, and merges follow the tokens' order in the file,
            # which Gemma's scores do not
            file_order = metadata.get("general.architecture") in ("gemma", "gemma2", "gemma3")
            if file_order:
                tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
            backend = cls._sentencepiece_bpe(tokens, metadata, file_order)
            spelled = lambda t: True  # noqa: E731
            # Older llama files lack the flag, and llama.cpp adds BOS to SentencePiece vocabs
            add_bos_default = True
        else:
            raise ValueError(
                f"GGUF tokenizer model (tokenizer.ggml.model) {model!r} is not supported; "
                f"supported: {SUPPORTED_GGUF_TOKENIZERS}")

        # Control tokens (and the bos/eos/unk/pad ones, as HF adds them) are matched whole in
        # the text and skipped by decode(skip_special_tokens=True); user-defined ones (e.g.
        # <think>) are matched whole but are ordinary text otherwise.
        special = [t for t, ty in zip(tokens, types) if ty == _CONTROL and spelled(t)]
        special += [t for t in (unk, bos, eos, pad) if t is not None]
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                    for t in dict.fromkeys(special)])
        vocab = backend.get_vocab()
        backend.add_tokens([AddedToken(t, normalized=False, special=False)
                            for t, ty in zip(file_tokens, types) if ty == _USER_DEFINED and t in vocab])

        add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos_default))
        add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
        backend.post_processor = cls._bos_eos_processor(bos if add_bos else None, bos_id,
                                                        eos if add_eos else None, eos_id)
        # eot/eom: llama.cpp's end-of-turn / end-of-message ids also end generation
        eos_ids = [i for i in (eos_id, token_of("eot_token_id")[0], token_of("eom_token_id")[0])
                   if i is not None]
        template = metadata.get("tokenizer.chat_template")
        return cls(backend, vocab_size=len(tokens), bos_token_id=bos_id, eos_token_ids=eos_ids,
                   chat_template=str(template) if template else None,
                   special_tokens={"bos_token": bos, "eos_token": eos, "unk_token": unk,
                                   "pad_token": pad})

    @staticmethod
    def _byte_level_bpe(tokens: list[str], metadata: Mapping[str, Any], pre: str) -> tokenizers.Tokenizer:
        merges = _as_list(_required(metadata, "tokenizer.ggml.merges"))
        byte_char = _bytes_to_unicode()
        alphabet = set(byte_char.values())
        # Tokens are stored in the byte alphabet, except some added ones written as plain text
        # (e.g. with spaces): respell those so every vocab entry is in BPE's alphabet.
        vocab = {t if set(t) <= alphabet else "".join(byte_char[b] for b in t.encode()): i
                 for i, t in enumerate(tokens)}
        pairs = [tuple(m.split(" ")) if isinstance(m, str) else () for m in merges]
        bad = [m for m, p in zip(merges, pairs) if len(p) != 2 or not all(p)]
        if bad:
            raise ValueError(f"tokenizer.ggml.merges: each merge must be two tokens separated by one space, "
                             f"got {bad[:3]}")  # fmt: skip
        try:
            bpe = models.BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="",
                             end_of_word_suffix="", fuse_unk=False)
        except Exception as e:  # the tokenizers library raises a bare Exception (e.g. a merge of unknown tokens)
            raise ValueError(f"tokenizer.ggml.merges: {e}") from None
        tok = tokenizers.Tokenizer(bpe)
        splits, gpt2_regex = _PRE_SPLITS[_BPE_PRE_TYPES[pre]]
        steps = [pre_tokenizers.Digits(individual_digits=True) if r == _DIGITS
                 else pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=gpt2_regex)
        tok.pre_tokenizer = pre_tokenizers.Sequence([*steps, byte_level]) if steps else byte_level
        tok.decoder = decoders.ByteLevel()
        return tok

    @staticmethod
    def _sentencepiece_bpe(tokens: list[str], metadata: Mapping[str, Any],
                           file_order: bool = False) -> tokenizers.Tokenizer:
        """SentencePiece BPE (Llama 2, TinyLlama, Mistral, Gemma) as transformers rebuilds it:
        BPE over the ▁-spelled vocab with byte fallback, merges from the file or from the
        scores (``file_order``: from the tokens' order in the file instead)."""
        if metadata.get("tokenizer.ggml.merges") is not None:
            merges = [tuple(str(m).split(" ", 1)) for m in _as_list(metadata["tokenizer.ggml.merges"])]
        else:
            scores = [-float(i) for i in range(len(tokens))] if file_order else \
                [float(s) for s in _as_list(_required(metadata, "tokenizer.ggml.scores"))]  # fmt: skip
            merges = _sentencepiece_merges(tokens, scores)
        vocab = {t: i for i, t in enumerate(tokens)}
        tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True,
                                              byte_fallback=True, dropout=None))
        prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
        # "first": only the start of the text gets the ▁, not text after a special token
        # (transformers' non-legacy LlamaTokenizer)
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first" if prefix else "never", split=False)
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if prefix:
            steps.append(decoders.Strip(content=" ", left=1))
        tok.decoder = decoders.Sequence(steps)
        return tok

    @staticmethod
    def _bos_eos_processor(bos: str | None, bos_id: int | None, eos: str | None,
                           eos_id: int | None) -> processors.TemplateProcessing:
        """The post-processor HF's update_post_processor() installs for add_bos/add_eos."""
        add_bos, add_eos = bos is not None and bos_id is not None, eos is not None and eos_id is not None
        single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
        pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
        specials = ([(bos, bos_id)] if add_bos else []) + ([(eos, eos_id)] if add_eos else [])
        return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> Tokenizer:
        """Load an HF model folder: tokenizer.json, with tokenizer_config.json (special tokens,
        add_bos/eos_token, chat_template), chat_template.jinja/.json and generation_config.json
        (eos_token_id, int or list) when present."""
        folder = Path(path)
        if not (folder / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{folder} has no tokenizer.json")
        try:
            backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # the tokenizers library raises a bare Exception for a malformed file
            raise ValueError(f"{folder / 'tokenizer.json'}: not a tokenizers file: {e}") from None
        # The runtime never wants silent truncation or padding from the saved settings
        backend.no_truncation()
        backend.no_padding()

        def load(name: str) -> dict:
            f = folder / name
            if not f.is_file():
                return {}
            try:
                obj = json.loads(f.read_text(encoding="utf-8"))
            except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
                raise ValueError(f"{f}: not valid JSON: {e}") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{f}: must hold a JSON object, got {type(obj).__name__}")
            return obj

        config, gen_config = load("tokenizer_config.json"), load("generation_config.json")

        def token(name: str) -> str | None:
            value = config.get(name)
            value = value.get("content") if isinstance(value, dict) else value
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{folder / 'tokenizer_config.json'}: {name} must be a string or "
                                 f"{{'content': string}}, got {value!r}")  # fmt: skip
            return value

        def _flag(config: dict, name: str) -> bool:  # a JSON boolean ("false" would be truthy)
            value = config.get(name)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{folder / 'tokenizer_config.json'}: {name} must be true or false, got {value!r}")
            return bool(value)

        def ids(key: str) -> list[int]:
            value = gen_config.get(key)
            values = [] if value is None else value if isinstance(value, list) else [value]
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
                raise ValueError(f"{folder / 'generation_config.json'}: {key} must be a token id or a list of "
                                 f"them, got {value!r}")  # fmt: skip
            return values

        bos, eos = token("bos_token"), token("eos_token")
        bos_id = backend.token_to_id(bos) if bos is not None else None
        if bos_id is None:
            bos_id = (ids("bos_token_id") or [None])[0]
        eos_id = backend.token_to_id(eos) if eos is not None else None
        eos_ids = ([eos_id] if eos_id is not None else []) + ids("eos_token_id")
        # As transformers 4.x's LlamaTokenizerFast: an explicit add_bos/eos_token (or no
        # post-processor at all) means a TemplateProcessing built from the flags; otherwise
        # tokenizer.json's own one stays. (transformers 5 drops the two flags whenever there is
        # a tokenizer.json; the two differ only when the files disagree.)
        if "add_bos_token" in config or "add_eos_token" in config or backend.post_processor is None:
            backend.post_processor = cls._bos_eos_processor(
                bos if _flag(config, "add_bos_token") else None, bos_id,
                eos if _flag(config, "add_eos_token") else None, eos_id)

        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            if not all(isinstance(t, dict) and isinstance(t.get("name"), str) and "template" in t for t in template):
                raise ValueError(f"{folder / 'tokenizer_config.json'}: chat_template as a list must hold "
                                 "{'name': ..., 'template': ...} objects")  # fmt: skip
            template = {t["name"]: t["template"] for t in template}.get("default")
        where = "tokenizer_config.json"
        if (folder / "chat_template.json").is_file():
            where = "chat_template.json"
            template = load(where).get("chat_template", template)
        if (folder / "chat_template.jinja").is_file():  # transformers >= 4.43 saves it here
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        elif template is not None and not isinstance(template, str):
            raise ValueError(f"{folder / where}: chat_template must be a string (a Jinja template), "
                             f"got {type(template).__name__}")  # fmt: skip
        return cls(backend, vocab_size=backend.get_vocab_size(with_added_tokens=True),
                   bos_token_id=bos_id, eos_token_ids=eos_ids, chat_template=template or None,
                   special_tokens={"bos_token": bos, "eos_token": eos, "unk_token": token("unk_token"),
                                   "pad_token": token("pad_token")})

    # -- text <-> ids ---------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; special-token strings in it become their ids (as HF does).
        With ``add_special_tokens``, bos (and eos) are added as the model's config asks."""
        if not isinstance(text, str):
            hint = ": decode bytes first, e.g. data.decode('utf-8', errors='replace')" * isinstance(text, bytes)
            raise TypeError(f"encode() takes a str, got {type(text).__name__}{hint}")
        if not isinstance(add_special_tokens, bool):
            raise TypeError(f"encode(): add_special_tokens must be True or False, got {add_special_tokens!r}")
        _check_text(text, "the text")
        if len(text) >= LONG_TEXT:  # the same ids; encode_batch lets other threads run meanwhile
            return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: int | Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (ints, a list, a numpy array or a tensor). Ids past the vocabulary
        (a model's padding rows) decode to nothing, as in HF."""
        ids = _token_ids(ids, "decode: ids")
        if len(ids) >= LONG_TEXT // 4:
            return self._tok.decode_batch([ids], skip_special_tokens=skip_special_tokens)[0]
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for. A piece of a multi-byte character (byte-level BPE
        pieces of an emoji, <0xXX> byte-fallback tokens) is part of a UTF-8 sequence, which
        decode() alone turns into U+FFFD. SentencePiece's ▁ is a space here."""
        token_id = _token_id(token_id, "token_bytes: token_id")
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id in self._added_ids:  # added tokens are their own text
            return piece.encode()
        if self._byte_level and all(c in _BYTE_OF_CHAR for c in piece):
            return bytes(_BYTE_OF_CHAR[c] for c in piece)
        if _BYTE_TOKEN.fullmatch(piece):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(_token_id(token_id, "id_to_token: token_id"))

    # -- chat -----------------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                            add_generation_prompt: bool = True) -> str:
        """Render ``messages`` ([{"role": ..., "content": ...}, ...]) with the model's chat
        template, as HF ``apply_chat_template(tokenize=False)`` renders it."""
        if not self.chat_template:
            raise ValueError("this model has no chat template (no tokenizer.chat_template in the GGUF, "
                             "no chat_template in the folder); use encode() on a plain prompt instead")
        import jinja2

        chat = _check_messages(messages)
        try:
            return _compile_template(self.chat_template).render(
                messages=chat, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                **self._special_tokens)
        except jinja2.exceptions.TemplateError as e:  # a key the template wants, a syntax error, ...
            if isinstance(e, ValueError):  # the template's own raise_exception: its message says it
                raise
            raise _chat_template_error()(f"the chat template cannot render these messages: "
                                         f"{type(e).__name__}: {e}") from e  # fmt: skip

    def encode_chat(self, messages_or_prompt: str | Sequence[Mapping[str, Any]],
                    add_generation_prompt: bool = True) -> list[int]:
        """Ids of the rendered chat. A plain string is one user message. The template already
        writes the special tokens, so none are added (HF apply_chat_template(tokenize=True))."""
        if isinstance(messages_or_prompt, str):
            _check_text(messages_or_prompt, "the prompt")
        messages = ([{"role": "user", "content": messages_or_prompt}]
                    if isinstance(messages_or_prompt, str) else messages_or_prompt)
        return self.encode(self.apply_chat_template(messages, add_generation_prompt),
                           add_special_tokens=False)

    def decoder(self, skip_special_tokens: bool = True) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_token_id={self.bos_token_id}, "
                f"eos_token_ids={self.eos_token_ids}, add_bos={self.add_bos}, "
                f"chat_template={'yes' if self.chat_template else 'no'})")


class IncrementalDecoder:
    """Streaming detokenizer: push ids one at a time, get the text they complete.

    Decoding token by token is wrong for byte-level vocabularies (a character can span tokens)
    and for SentencePiece ones (a leading ▁ decodes differently at the start of a text). So each
    step decodes a short window that starts at a point where the text was complete:
    text(window + new ids) minus text(window). Text whose bytes end inside a character (it
    decodes to a trailing U+FFFD) is held back until the character completes or flush() is
    called (a U+FFFD the model wrote itself is text), and so is a trailing run of
    <0xXX> byte-fallback tokens, which decodes as a whole. Windows start only at such complete
    points, so everything returned adds up to exactly ``decode(all ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._window: list[int] = []  # starts where the text was complete
        self._read = 0  # window[:read] has been returned as text
        self._in_byte_run = False

    def push(self, token_id: int) -> str:
        token_id = _token_id(token_id, "IncrementalDecoder.push: token_id")
        self._window.append(token_id)
        if token_id in self._tok._byte_ids:
            self._in_byte_run = True
        elif not (self._skip and token_id in self._tok._special_ids):  # skipped ids do not end a run
            self._in_byte_run = False
        return "" if self._in_byte_run else self._advance(final=False)

    def _split_character(self) -> bool:
        """Whether the window's bytes end inside a UTF-8 character, which a later token may
        complete (a U+FFFD the model wrote, or bytes that can never be valid, is text now)."""
        tail = b""
        for t in reversed(self._window):  # the last bytes: a split character has at most 3
            if self._skip and t in self._tok._special_ids:
                continue
            tail = self._tok.token_bytes(t) + tail
            if len(tail) >= 4:
                break
        for back in range(1, min(4, len(tail)) + 1):
            lead = tail[-back]
            if lead & 0xC0 == 0x80:  # a continuation byte: look further back
                continue
            need = 4 if lead >= 0xF0 else 3 if lead >= 0xE0 else 2 if lead >= 0xC0 else 1
            return back < need
        return False

    def flush(self) -> str:
        """The text still held back (an incomplete character comes out as U+FFFD, as in
        decode()); the decoder is then empty and can be reused."""
        text = self._advance(final=True)
        self._window, self._read, self._in_byte_run = [], 0, False
        return text

    def _advance(self, final: bool) -> str:
        decode = self._tok._tok.decode
        done = decode(self._window[:self._read], skip_special_tokens=self._skip)
        text = decode(self._window, skip_special_tokens=self._skip)
        if len(text) <= len(done) or (text.endswith("\ufffd") and not final and self._split_character()):
            return ""
        # The ids returned before this step end at a complete point: the next window starts
        # there (keeping this step's ids, whose text the next step subtracts).
        del self._window[:self._read]
        self._read = len(self._window)
        return text[len(done):]
