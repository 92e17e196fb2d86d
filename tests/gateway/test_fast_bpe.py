"""gateway/fast_bpe.py gives exactly the ids `tokenizers` gives, or steps aside."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from gateway import fast_bpe
from gateway.fast_bpe import FastBpeEncoder, UnsupportedPattern, ascii_pattern
from gateway.text import GatewayTokenizer

# The pre-tokenizer regexes of Llama-3 and Qwen2 tokenizer.json files (a Split before a
# ByteLevel that only maps bytes).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_FRAGMENTS = ["'s", "'T", "'ll", "  ", "\n\n", "\r\n", " \t", "12345", "Hello", " world", "_x", "{}", "--"]
ascii_text = st.lists(
    st.one_of(st.characters(max_codepoint=127), st.sampled_from(_FRAGMENTS)), max_size=40
).map("".join)
# Text the Unicode path takes: ASCII with Latin, Greek, Cyrillic, Arabic..., typographic
# quotes and dashes, currency signs.
_COVERED = st.one_of(
    st.characters(min_codepoint=0x80, max_codepoint=0x7FF),
    st.characters(min_codepoint=0x2000, max_codepoint=0x206F),
    st.characters(min_codepoint=0x20A0, max_codepoint=0x20BF),
)
covered_text = st.lists(
    st.one_of(
        st.characters(max_codepoint=127), _COVERED, st.sampled_from([*_FRAGMENTS, "caf\u00e9", "\u2019s"])
    ),
    max_size=40,
).map("".join)


def _split_tokenizer(pattern: str, **bpe: object) -> Tokenizer:
    """A small byte-level BPE trained here, with Llama-3's (or Qwen2's) pre-tokenizer shape."""
    tokenizer = Tokenizer(models.BPE(**bpe))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    corpus = [
        f"Hello world, it's {n} o'clock. DON'T panic:\n\n  def f(x): return x*{n}  # done\r\n"
        for n in range(200)
    ]
    trainer = trainers.BpeTrainer(
        vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer


@pytest.fixture(scope="module")
def smollm2(smollm2_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def llama3_like() -> Tokenizer:
    return _split_tokenizer(LLAMA3_PATTERN, ignore_merges=True)


@pytest.fixture(scope="module")
def qwen2_like() -> Tokenizer:
    return _split_tokenizer(QWEN2_PATTERN)


def _encoder(tokenizer: Tokenizer) -> FastBpeEncoder:
    encoder = FastBpeEncoder.for_tokenizer(tokenizer)
    assert encoder is not None
    return encoder


# Built (and self-checked, ~0.5 s) once per module.
@pytest.fixture(scope="module")
def smollm2_encoder(smollm2: Tokenizer) -> FastBpeEncoder:
    return _encoder(smollm2)


@pytest.fixture(scope="module")
def split_encoders(llama3_like: Tokenizer, qwen2_like: Tokenizer) -> list[tuple[Tokenizer, FastBpeEncoder]]:
    return [(tokenizer, _encoder(tokenizer)) for tokenizer in (llama3_like, qwen2_like)]


@pytest.fixture(scope="module")
def gateway_tokenizer(smollm2_dir: Path) -> GatewayTokenizer:
    return GatewayTokenizer(smollm2_dir)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(ascii_text, covered_text))
def test_the_gpt2_pattern_encodes_as_tokenizers_does(
    smollm2: Tokenizer, smollm2_encoder: FastBpeEncoder, text: str
) -> None:
    assert smollm2_encoder.encode(text) == smollm2.encode(text, add_special_tokens=False).ids


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(ascii_text, covered_text))
def test_llama3_and_qwen2_split_patterns_encode_as_tokenizers_does(
    split_encoders: list[tuple[Tokenizer, FastBpeEncoder]], text: str
) -> None:
    for tokenizer, encoder in split_encoders:
        assert encoder.encode(text) == tokenizer.encode(text, add_special_tokens=False).ids


def test_both_paths_pass_the_start_up_check_and_other_scripts_are_left_to_tokenizers(
    smollm2: Tokenizer, smollm2_encoder: FastBpeEncoder
) -> None:
    encoder = smollm2_encoder
    assert encoder._ascii_split is not None and encoder._unicode_split is not None
    for text in (
        "plain ascii",
        "caf\u00e9 \u201cquoted\u201d \u2014 \u20ac5",
        "\u041f\u0440\u0438\u0432\u0435\u0442",
    ):
        assert encoder.encode(text) == smollm2.encode(text, add_special_tokens=False).ids
    assert encoder.encode("\u4f60\u597d") is None  # CJK
    assert encoder.encode("ok \U0001f600") is None  # an emoji
    assert encoder.encode("") == []


def test_a_long_document_seen_twice_gives_the_same_ids_from_the_word_cache(smollm2: Tokenizer) -> None:
    encoder = _encoder(smollm2)  # a fresh one: its cache starts empty
    document = Path(fast_bpe.__file__).read_text()
    expected = smollm2.encode(document, add_special_tokens=False).ids
    assert encoder.encode(document) == expected
    assert encoder.encode(document) == expected  # now every piece comes from the cache
    encoder.forget_words()
    assert encoder.encode(document) == expected


def test_the_word_cache_stays_within_its_bound_on_endless_new_words(
    smollm2: Tokenizer, smollm2_encoder: FastBpeEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoder = smollm2_encoder
    encoder.forget_words()
    monkeypatch.setattr(fast_bpe, "WORD_CACHE_ENTRIES", 64)
    for number in range(1_000):
        text = f"ticket {number} word{number}x"
        assert encoder.encode(text) == smollm2.encode(text, add_special_tokens=False).ids
        assert len(encoder._words) <= 64
    encoder.forget_words()


@pytest.mark.parametrize("pattern", [r"\w+", r"\p{M}+|\s+", r"[^\S\p{L}]+", r"[a[b]]", r"\d+"])
def test_constructs_without_a_spelled_out_ascii_meaning_are_refused(pattern: str) -> None:
    with pytest.raises(UnsupportedPattern):
        ascii_pattern(pattern)


def test_tokenizers_of_other_shapes_are_not_taken(smollm2: Tokenizer) -> None:
    with_normalizer = Tokenizer.from_str(smollm2.to_str())
    with_normalizer.normalizer = normalizers.NFC()
    assert FastBpeEncoder.for_tokenizer(with_normalizer) is None
    prefix_space = Tokenizer.from_str(smollm2.to_str())
    prefix_space.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    assert FastBpeEncoder.for_tokenizer(prefix_space) is None
    assert FastBpeEncoder.for_tokenizer(_split_tokenizer(r"\w+|\s+")) is None
    config = json.loads(smollm2.to_str())
    config["model"]["dropout"] = 0.1
    assert FastBpeEncoder.for_tokenizer(Tokenizer.from_str(json.dumps(config))) is None


def test_the_start_up_check_switches_off_what_would_differ(
    smollm2: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deliberate slips in the rewritten classes: each is caught at start, and only what it
    broke is given up (a character, a path, the encoder)."""
    # No-break space left out of the Unicode \s: that one character is left to tokenizers.
    nbsp_forgotten = fast_bpe._UNICODE_SPACE.replace("\\xa0", "")
    assert nbsp_forgotten != fast_bpe._UNICODE_SPACE
    in_class, outside = fast_bpe._UNICODE_CLASSES
    monkeypatch.setattr(
        fast_bpe,
        "_UNICODE_CLASSES",
        (
            {**in_class, r"\s": nbsp_forgotten},
            {**outside, r"\s": f"[{nbsp_forgotten}]", r"\S": f"[^{nbsp_forgotten}]"},
        ),
    )
    encoder = FastBpeEncoder.for_tokenizer(smollm2)
    assert encoder is not None and encoder._unicode_split is not None
    assert encoder.encode("a\xa0b") is None
    assert encoder.encode("caf\u00e9") == smollm2.encode("caf\u00e9", add_special_tokens=False).ids
    # Vertical tab left out of the ASCII \s: the ASCII path is off, ASCII text goes to tokenizers.
    space = "\\t\\n\\x0c\\r "
    vt_forgotten = (
        {r"\p{L}": "A-Za-z", r"\p{N}": "0-9", r"\s": space},
        {r"\p{L}": "[A-Za-z]", r"\p{N}": "[0-9]", r"\s": f"[{space}]", r"\S": f"[^{space}]"},
    )
    monkeypatch.setattr(fast_bpe, "_ASCII_CLASSES", vt_forgotten)
    encoder = FastBpeEncoder.for_tokenizer(smollm2)
    assert encoder is not None and encoder._ascii_split is None and encoder._unicode_split is not None
    assert encoder.encode("a\x0b!") is None
    # The same slip on the Unicode side too: both paths off, no encoder.
    in_class, outside = fast_bpe._UNICODE_CLASSES
    monkeypatch.setattr(
        fast_bpe,
        "_UNICODE_CLASSES",
        ({**in_class, r"\s": space}, {**outside, r"\s": f"[{space}]", r"\S": f"[^{space}]"}),
    )
    assert FastBpeEncoder.for_tokenizer(smollm2) is None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.lists(
        st.one_of(
            st.text(max_size=8), ascii_text, covered_text, st.sampled_from(["<|im_start|>", "<|im_end|>"])
        ),
        max_size=6,
    ).map("".join)
)
def test_the_gateway_tokenizer_encodes_any_text_as_tokenizers_does(
    gateway_tokenizer: GatewayTokenizer, text: str
) -> None:
    assert gateway_tokenizer._fast is not None  # the fast path is on for the embedded model
    expected = gateway_tokenizer.tokenizer.encode(text, add_special_tokens=False).ids
    assert gateway_tokenizer.encode(text, add_special_tokens=False) == expected


def _wrapped_tokenizer_folder(folder: Path, single: str) -> Path:
    """A Llama-3-shaped tokenizer whose post-processor wraps a text in special tokens."""
    tokenizer = _split_tokenizer(LLAMA3_PATTERN, ignore_merges=True)
    tokenizer.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    specials = [(name, tokenizer.token_to_id(name)) for name in ("<|begin_of_text|>", "<|end_of_text|>")]
    tokenizer.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def wrapping_tokenizers(tmp_path_factory: pytest.TempPathFactory) -> list[GatewayTokenizer]:
    root = tmp_path_factory.mktemp("wrapping")
    return [
        GatewayTokenizer(_wrapped_tokenizer_folder(root / "bos", "<|begin_of_text|> $A")),
        GatewayTokenizer(_wrapped_tokenizer_folder(root / "bos-eos", "<|begin_of_text|> $A <|end_of_text|>")),
    ]


def test_a_prompt_with_special_tokens_is_encoded_in_pieces_with_the_post_processors_wrap(
    wrapping_tokenizers: list[GatewayTokenizer],
) -> None:
    bos_only, bos_eos = wrapping_tokenizers
    assert all(t._fast is not None and t._pieces is not None for t in wrapping_tokenizers)
    assert bos_only._special_wrap is not None and bos_only._special_wrap[0] and not bos_only._special_wrap[1]
    assert bos_eos._special_wrap is not None and bos_eos._special_wrap[0] and bos_eos._special_wrap[1]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.lists(
        st.one_of(ascii_text, covered_text, st.text(max_size=6), st.sampled_from(["<|begin_of_text|>"])),
        max_size=5,
    ).map("".join)
)
def test_completions_prompts_with_special_tokens_encode_as_tokenizers_does(
    wrapping_tokenizers: list[GatewayTokenizer], text: str
) -> None:
    for gateway_tokenizer in wrapping_tokenizers:
        for special in (True, False):
            expected = gateway_tokenizer.tokenizer.encode(text, add_special_tokens=special).ids
            assert gateway_tokenizer.encode(text, add_special_tokens=special) == expected


def test_a_tokenizer_json_that_truncates_does_not_cut_prompts(tmp_path: Path) -> None:
    """Truncation saved in tokenizer.json (for training) must not cut a prompt on any path."""
    tokenizer = _split_tokenizer(LLAMA3_PATTERN, ignore_merges=True)
    tokenizer.enable_truncation(8)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    text = "Hello world, it's a long prompt that runs well past eight tokens. " * 4
    untruncated = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    untruncated.no_truncation()
    expected = untruncated.encode(text, add_special_tokens=False).ids
    assert len(expected) > 8
    gateway_tokenizer = GatewayTokenizer(tmp_path)
    for special in (True, False):
        assert gateway_tokenizer.encode(text, add_special_tokens=special) == expected
