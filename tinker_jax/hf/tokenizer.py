"""A Qwen-style byte-level BPE tokenizer trained on the corpus this package ships (`data/corpus.txt`).

Used by `tinker-jax init-model` so that freshly initialised models come with a real Hugging Face tokenizer
and nothing is downloaded.

Layout (for a model vocabulary of V ids):

    [0, n_bpe)          256 byte symbols, then BPE merges in the order they were learned
    [n_bpe, V - 3)      `<|reserved_0|>`, `<|reserved_1|>`, ... only if BPE learned fewer merges than fit
    V - 3               `<|endoftext|>`   pad token; also the document separator (Qwen's bos_token_id)
    V - 2               `<|im_start|>`
    V - 1               `<|im_end|>`      eos token: ends every chat turn

The three Qwen specials always sit at the top of the vocabulary so their ids depend on V only
(`special_token_ids(V)`), which lets `presets.py` state them statically. The conventions follow
Qwen2.5-Instruct: tokenizer bos_token is None (no BOS is prepended on encode), eos_token is
`<|im_end|>`, pad_token is `<|endoftext|>`; config.json carries bos_token_id = id(`<|endoftext|>`),
eos_token_id = id(`<|im_end|>`), and generation_config.json stops on both `<|im_end|>` and `<|endoftext|>`.

The pre-tokenizer is Qwen2's: a regex split (digits one at a time, letters with an optional leading
non-letter, punctuation runs, newline runs) followed by ByteLevel without its own regex and without a
prefix space; NFC normalisation; ByteLevel decoder.

Training is deterministic: the tokenizers BPE trainer orders merges by (count, pair ids) and the pair ids
come from a sorted alphabet, so the same corpus and vocab size give byte-identical `tokenizer.json`.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

CORPUS_PATH = Path(__file__).parent / "data" / "corpus.txt"

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
EOS_TOKEN = IM_END  # chat eos, as in Qwen2.5-Instruct
PAD_TOKEN = ENDOFTEXT

# Qwen2's pre-tokenization pattern (from its tokenizer.json).
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # every byte + the specials

# ChatML in the Qwen2.5 layout (no tools, no injected default system prompt: a conversation without a
# system message is rendered as given). Message content may be a string or a list of {"type": "text"} parts.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}"
    "{%- set content = message['content'] %}"
    "{%- else %}"
    "{%- set content = namespace(text='') %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{%- set content.text = content.text + part['text'] %}{%- endif %}"
    "{%- endfor %}"
    "{%- set content = content.text %}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)


def special_token_ids(vocab_size: int) -> dict[str, int]:
    """Ids of the Qwen specials in a vocabulary of `vocab_size` (they are always the last three ids)."""
    _check_size(vocab_size)
    return {tok: vocab_size - len(SPECIAL_TOKENS) + i for i, tok in enumerate(SPECIAL_TOKENS)}


def _check_size(vocab_size: int) -> None:
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be an int >= {MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} "
                         f"special tokens), got {vocab_size!r}")


def _new_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _corpus_lines() -> list[str]:
    # Paragraphs (blank-line separated) keep multi-line code and chat blocks together for "\n" merges.
    text = CORPUS_PATH.read_text(encoding="utf-8")
    return [p + "\n" for p in text.split("\n\n") if p.strip()]


@lru_cache(maxsize=8)
def _trained_json(vocab_size: int) -> str:
    _check_size(vocab_size)
    tok = _new_tokenizer()
    n_bpe_target = vocab_size - len(SPECIAL_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=n_bpe_target,
        min_frequency=2,  # a pair seen once is noise, not a merge; the rest is filled with reserved ids
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    n_bpe = tok.get_vocab_size(with_added_tokens=False)
    if n_bpe > n_bpe_target:  # cannot happen with a full byte alphabet, but never silently exceed V
        raise RuntimeError(f"BPE trainer produced {n_bpe} tokens, more than the {n_bpe_target} requested")
    reserved = [AddedToken(f"<|reserved_{i}|>", special=True, normalized=False)
                for i in range(n_bpe_target - n_bpe)]
    if reserved:
        tok.add_special_tokens(reserved)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    vocab = tok.get_vocab(with_added_tokens=True)
    if len(vocab) != vocab_size or max(vocab.values()) != vocab_size - 1:
        raise RuntimeError(f"tokenizer has {len(vocab)} ids (max {max(vocab.values())}), expected {vocab_size}")
    for name, i in special_token_ids(vocab_size).items():
        if vocab[name] != i:
            raise RuntimeError(f"{name} has id {vocab[name]}, expected {i}")
    return tok.to_str(pretty=True)


def train_tokenizer(vocab_size: int) -> Tokenizer:
    """Train (deterministically) the byte-level BPE on the shipped corpus; exactly `vocab_size` ids."""
    return Tokenizer.from_str(_trained_json(vocab_size))


def tokenizer_config(tok: Tokenizer, model_max_length: int = 131072) -> dict:
    """The `tokenizer_config.json` dict for `tok` (Qwen2.5-Instruct conventions; see module doc)."""
    added = {}
    for i, t in sorted(tok.get_added_tokens_decoder().items()):
        added[str(i)] = {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                         "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": model_max_length,
        "split_special_tokens": False,
        "chat_template": CHAT_TEMPLATE,
    }


def save_hf_tokenizer(tok: Tokenizer, out_dir: str | Path, model_max_length: int = 131072) -> list[Path]:
    """Write `tokenizer.json` and `tokenizer_config.json` into `out_dir`; returns the paths written."""
    out_dir = Path(out_dir)
    paths = [out_dir / "tokenizer.json", out_dir / "tokenizer_config.json"]
    paths[0].write_text(tok.to_str(pretty=True), encoding="utf-8")
    cfg = tokenizer_config(tok, model_max_length)
    paths[1].write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return paths
