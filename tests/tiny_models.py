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


def _tokenizer(out: Path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=400, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    )
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
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
    """A 2-layer, 32-dim BertModel with a WordPiece tokenizer trained on CORPUS."""
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
    model = BertForSequenceClassification(_config(len(tok), num_labels=1))
    model.save_pretrained(out, safe_serialization=True)
    return out
