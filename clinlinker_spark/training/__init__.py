"""Training: SapBERT-style bi-encoder and hard-negative cross-encoder (ClinLinker recipe).

- :mod:`.config`: ``BiEncoderTrainConfig`` / ``CrossEncoderTrainConfig`` (strict YAML);
- :mod:`.pairs`: training data and synonym pairs;
- :mod:`.losses`: multi-similarity loss with its miner, InfoNCE, BCE, listwise;
- :mod:`.biencoder`: ``train_biencoder``; :mod:`.negatives`: hard-negative mining;
- :mod:`.crossencoder`: ``train_crossencoder``; :mod:`.distributed`: TorchDistributor;
- :mod:`.common`: checkpoints (safetensors + JSON), schedule, output directory and card.

Import the submodules directly; this package imports nothing heavy.
"""
