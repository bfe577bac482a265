"""The tokenizer part of a GGUF: which llama.cpp pre-tokenizer splits text as the HF tokenizer does,
and the vocabulary written through gguf-py's own readers (``gguf.BpeVocab``, ``gguf.SpecialVocab``).

llama.cpp does not read ``tokenizer.json``'s pre-tokenizer: it picks its own split rules from the
name in ``tokenizer.ggml.pre``. llama.cpp's converter finds that name by hashing the token ids of a
check text; we find it from the tokenizer itself: the list of split regexes the HF pre-tokenizer
applies (``Split`` patterns, ``Digits``, and ByteLevel's own GPT-2 regex when ``use_regex`` is on) is
compared with the regex lists llama.cpp uses for each name (``src/llama-vocab.cpp``), together with
the flags that change token ids (BPE ``ignore_merges``) or decoding (``clean_spaces``, from
``clean_up_tokenization_spaces``). A tokenizer whose split rules match no llama.cpp name, or that
normalizes text or adds a prefix space (llama.cpp's BPE does neither), is refused: llama.cpp would
tokenize text differently from the model we measured, which is a silently worse model. A GGUF of the
same model as template (``--gguf-template``) copies its tokenizer keys as they are instead;
``--gguf-unverified-tokenizer`` writes an unmatched tokenizer anyway, with a warning.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ..errors import WeightsmithError

log = logging.getLogger(__name__)

# The regexes as they appear in tokenizer.json files (ByteLevel's built-in one is GPT2).
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
DIGIT = r"\p{N}"


@dataclass(frozen=True)
class PreTokenizer:
    name: str                 # tokenizer.ggml.pre
    regexes: tuple[str, ...]  # applied in turn, as llama.cpp's llama-vocab.cpp does for this name
    ignore_merges: bool = False
    clean_spaces: bool = True


# One llama.cpp name per distinct (regexes, ignore_merges, clean_spaces); llama.cpp gives several
# names the same rules (starcoder / refact / codeshell …), any of them splits text the same way.
KNOWN = (
    PreTokenizer("gpt-2", (GPT2,)),
    PreTokenizer("starcoder", (DIGIT, GPT2)),
    PreTokenizer("smollm", (DIGIT, GPT2), clean_spaces=False),
    PreTokenizer("llama-bpe", (LLAMA3,), ignore_merges=True),
    PreTokenizer("dbrx", (LLAMA3,)),
    PreTokenizer("qwen2", (QWEN2,), clean_spaces=False),
)


def split_regexes(pre) -> tuple[str, ...] | None:
    """The regexes a HF pre-tokenizer splits by, in order; None when it does anything else."""
    if pre is None:
        return ()
    kind = pre.get("type")
    if kind == "Sequence":
        out: list[str] = []
        for p in pre.get("pretokenizers") or []:
            r = split_regexes(p)
            if r is None:
                return None
            out.extend(r)
        return tuple(out)
    if kind == "ByteLevel":
        if pre.get("add_prefix_space"):
            return None  # llama.cpp's BPE adds no prefix space
        return (GPT2,) if pre.get("use_regex", True) else ()
    if kind == "Digits":
        return (DIGIT,) if pre.get("individual_digits") else (r"\p{N}+",)
    if kind == "Split":
        pat = pre.get("pattern") or {}
        if pre.get("invert") or pre.get("behavior") not in ("Isolated", "isolated") or "Regex" not in pat:
            return None
        return (pat["Regex"],)
    return None


def pre_tokenizer(tok: dict, tok_cfg: dict) -> PreTokenizer | None:
    """The llama.cpp pre-tokenizer that splits text exactly as ``tok`` (a parsed tokenizer.json) does."""
    if tok.get("normalizer") is not None:
        return None
    regexes = split_regexes(tok.get("pre_tokenizer"))
    if not regexes:
        return None
    model = tok.get("model") or {}
    ignore_merges = bool(model.get("ignore_merges", False))
    clean = tok_cfg.get("clean_up_tokenization_spaces")
    matches = [p for p in KNOWN if p.regexes == regexes and p.ignore_merges == ignore_merges]
    if not matches:
        return None
    if clean is not None:
        same = [p for p in matches if p.clean_spaces == bool(clean)]
        matches = same or matches
    return matches[0]


def _read(d: Path) -> tuple[dict, dict]:
    tj = d / "tokenizer.json"
    if not tj.is_file():
        raise WeightsmithError(f"{d} has no tokenizer.json; GGUF needs the tokenizer (or pass --gguf-template, a GGUF of the same model)")
    try:
        tok = json.loads(tj.read_text(encoding="utf-8"))
        cp = d / "tokenizer_config.json"
        cfg = json.loads(cp.read_text(encoding="utf-8")) if cp.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsmithError(f"cannot read the tokenizer in {d}: {e}") from None
    if not isinstance(tok, dict) or not isinstance(cfg, dict):
        raise WeightsmithError(f"{d}: tokenizer.json and tokenizer_config.json must hold JSON objects")
    return tok, cfg


def check_tokenizer(d: Path, unverified: bool = False) -> str:
    """The ``tokenizer.ggml.pre`` name for the tokenizer in ``d``; refuses (or, ``unverified``, warns)
    when llama.cpp would split text differently from it. Cheap: run before any long work."""
    return _identify(d, *_read(d), unverified)


def _identify(d: Path, tok: dict, cfg: dict, unverified: bool) -> str:
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or (tok.get("decoder") or {}).get("type") != "ByteLevel":
        why = f"a {model.get('type')} tokenizer" + (" with byte fallback" if model.get("byte_fallback") else "")
        if not unverified:
            raise WeightsmithError(f"GGUF export writes byte-level BPE tokenizers; {d}/tokenizer.json holds {why}: pass --gguf-template "
                                   "(a GGUF of the same model) or --gguf-unverified-tokenizer")
        log.warning("%s written as a byte-level BPE vocabulary: llama.cpp will not tokenize text as the original does", why)
        return "default"
    pre = pre_tokenizer(tok, cfg)
    if pre is not None:
        return pre.name
    regexes = split_regexes(tok.get("pre_tokenizer"))
    what = ("a normalizer" if tok.get("normalizer") is not None else
            f"split rules {list(regexes)}" if regexes else f"pre-tokenizer {json.dumps(tok.get('pre_tokenizer'))[:200]}")
    msg = (f"llama.cpp has no pre-tokenizer for {what} ({d}/tokenizer.json): it would split text differently from the model "
           "we measured; pass --gguf-template (a GGUF of the same model) or --gguf-unverified-tokenizer")
    if not unverified:
        raise WeightsmithError(msg)
    log.warning(msg.split(";")[0] + "; written as 'default' (--gguf-unverified-tokenizer)")
    return "default"


def write_tokenizer(w, d: Path, vocab_size: int, unverified: bool = False) -> str:
    """tokenizer.ggml.* for the byte-level BPE tokenizer in ``d``; returns the pre-tokenizer name."""
    import gguf

    tok, cfg = _read(d)
    pre = _identify(d, tok, cfg, unverified)
    model = tok.get("model") or {}
    tokens: list[str] = []
    types: list[int] = []
    if model.get("type") == "BPE" and not model.get("byte_fallback"):
        try:
            vocab = gguf.BpeVocab(d)
        except (FileNotFoundError, ValueError) as e:
            raise WeightsmithError(f"gguf-py cannot read the vocabulary in {d}: {e}") from None
        for text, _score, ttype in vocab.all_tokens():
            tokens.append(text.decode("utf-8") if isinstance(text, bytes) else text)
            types.append(int(ttype))
    else:  # --gguf-unverified-tokenizer on a non-BPE tokenizer: its vocabulary, in id order, without merges
        v = dict(model.get("vocab") or {})
        for a in tok.get("added_tokens") or []:
            v.setdefault(a["content"], a["id"])
        tokens = [""] * (max(v.values()) + 1 if v else 0)
        types = [int(gguf.TokenType.UNUSED)] * len(tokens)
        for t, i in v.items():
            tokens[i], types[i] = t, int(gguf.TokenType.NORMAL)
    for i, t in enumerate(tokens):
        if not t:
            tokens[i], types[i] = f"[PAD{i}]", int(gguf.TokenType.UNUSED)
    # llama.cpp's converter: added special tokens are CONTROL, other added tokens USER_DEFINED
    for a in tok.get("added_tokens") or []:
        i = a.get("id")
        if isinstance(i, int) and 0 <= i < len(tokens) and tokens[i] == a.get("content"):
            types[i] = int(gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
    if vocab_size > len(tokens):  # the embedding has more rows than the tokenizer has tokens
        tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
        types += [int(gguf.TokenType.UNUSED)] * (vocab_size - len(types))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(d, load_merges=True, n_vocab=len(tokens))
    special.add_to_gguf(w, quiet=True)
    if "bos" not in special.add_special_token:
        w.add_add_bos_token(False)
    return pre
