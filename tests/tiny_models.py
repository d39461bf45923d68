"""Tiny Hugging Face models with random weights, built inside the tests (no hub, seconds)."""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "diabetes mellitus tipo 2", "insuficiencia cardiaca congestiva", "hipertensión arterial",
    "dolor abdominal agudo", "fiebre y tos", "neumonía bilateral", "colectomía parcial",
    "apendicitis aguda", "cáncer de colon", "fractura de fémur", "infección urinaria",
    "anemia ferropénica", "insuficiencia renal crónica", "ecografía abdominal",
    "tomografía computarizada", "resonancia magnética", "biopsia hepática", "cefalea",
    "náuseas y vómitos", "hepatitis c", "tuberculosis pulmonar", "síndrome nefrótico",
]


SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789áéíóúüñ"
PUNCTUATION = ".,;:()[]-/%+'\""


def wordpiece_vocab() -> list[str]:
    """The tiny tokenizer's vocabulary, the same in every process: the special tokens, single
    characters (word-initial and ``##`` continuations), and every prefix (2+ characters) and
    ``##`` suffix (2+ characters) of CORPUS's words. A trained WordPiece vocabulary is not
    fixed: its trainer breaks ties between equally frequent merges in hash order, which
    changes from one process to the next, and with it every tiny model's weights."""
    import re

    words = sorted({w for text in CORPUS for w in re.findall(r"\w+", text.lower())})
    letters = sorted(set(LETTERS) | {c for w in words for c in w})
    pieces = {w[:i] for w in words for i in range(2, len(w) + 1)}
    pieces |= {"##" + w[i:] for w in words for i in range(1, len(w) - 1)}
    return (SPECIAL_TOKENS + letters + list(PUNCTUATION) + ["##" + c for c in letters]
            + sorted(pieces))


def _tokenizer(out: Path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(wordpiece_vocab())}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=128,
    )
    fast.save_pretrained(out)
    return fast


def _config(vocab_size: int, **extra):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, pad_token_id=0, **extra,
    )


def make_tiny_encoder(out: str | Path, seed: int = 0) -> Path:
    """A 2-layer, 32-dim BertModel with a WordPiece tokenizer built from CORPUS."""
    import torch
    from transformers import BertModel

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(out)
    torch.manual_seed(seed)
    BertModel(_config(len(tok))).save_pretrained(out, safe_serialization=True)
    return out


def make_tiny_cross_encoder(out: str | Path, seed: int = 1) -> Path:
    """A tiny BertForSequenceClassification with one output (num_labels=1)."""
    import torch
    from transformers import BertForSequenceClassification

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(out)
    torch.manual_seed(seed)
    # weights ten times the default's spread: with the default (0.02) every pair's logit lies
    # within 1e-4 of every other's, so an order by logit (or a ranker's split on it) would turn
    # on their last bits; here they spread over ~0.2
    model = BertForSequenceClassification(_config(len(tok), num_labels=1,
                                                  initializer_range=0.2))
    model.save_pretrained(out, safe_serialization=True)
    return out
