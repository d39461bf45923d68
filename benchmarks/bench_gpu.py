"""GPU benchmark: bi-encoder mentions/s and TFLOP/s against the GPU's bf16 matrix
peak, cross-encoder pairs/s, batch size and length bucketing, exact search on the GPU,
whether a form's candidates depend on its batch (fp32 and bf16), and the core linker end to
end with its models on the GPU.

Two steps, because the GPU machine has no model hub, no network and no ../shared:

1. ``prepare`` (here, on the CPU machine) writes a folder of inputs: the default model's
   config and tokenizer, the distinct normalised forms of the benchmark corpus, (mention,
   candidate term) pairs retrieved by the real linker, and the real index vectors.

       .venv/bin/python benchmarks/bench_gpu.py prepare --corpus artifacts/bench/link/night1.parquet \
           --out .gpu

2. ``run`` (on the GPU machine) measures and writes one JSON file.

       python3 benchmarks/bench_gpu.py run --data .gpu --out $OUT/gpu.json

The models' weights are random (the same architecture and shapes as multilingual-e5-small:
the 470 MB of weights do not travel): throughput, FLOP/s and batch behaviour do not depend on
the weights' values, accuracy does, so nothing here says anything about accuracy. Results go
in BENCHMARKS.md by hand. This is not a test.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# --code DIR: clinlinker_spark from another checkout (an A/B on one GPU machine); it must come
# first on the path before benchlib imports the package
if "--code" in sys.argv[:-1]:
    sys.path.insert(0, str(Path(sys.argv[sys.argv.index("--code") + 1]).resolve()))

from benchlib import bert_forward_flops, write_json  # noqa: E402

log = logging.getLogger("bench_gpu")
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json")


# --------------------------------------------------------------------------------------------
# prepare (CPU machine)


def prepare(args: argparse.Namespace) -> None:
    import pyarrow.parquet as pq

    from clinlinker_spark.config import load_config
    from clinlinker_spark.linker import Linker, invalid_reason
    from clinlinker_spark.text import normalize_text

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = load_config(args.config, [])
    model = out / "model"
    model.mkdir(exist_ok=True)
    for name in MODEL_FILES:
        src = Path(config.encoder.path, name)
        if name == "tokenizer.json":
            with open(src, "rb") as fh, gzip.open(model / "tokenizer.json.gz", "wb") as gz:
                shutil.copyfileobj(fh, gz)
        else:
            shutil.copyfile(src, model / name)
    texts = pq.read_table(args.corpus, columns=["text"]).column("text").to_pylist()
    valid = [t for t in texts if invalid_reason(t, config.linking.max_text_length) is None]
    norms = [normalize_text(t) for t in valid]
    forms = list(dict.fromkeys(norms))
    linker = Linker.from_config(config)
    retrieved = linker.retrieve(forms[:args.pair_forms])
    top_n = config.reranker.top_n
    pairs = [[f, normalize_text(c.term)] for f, cs in zip(forms, retrieved) for c in cs[:top_n]]
    terms = list(linker.index.texts)
    vectors = linker.index.faiss_index.reconstruct_n(0, linker.index.faiss_index.ntotal)
    np.save(out / "index_vectors_fp16.npy", vectors.astype(np.float16))
    data = {"corpus": str(args.corpus), "mentions": len(texts), "valid": len(valid),
            "mention_norms": norms, "forms": forms, "pairs": pairs, "terms": terms,
            "encoder": {"prefix": config.encoder.prefix,
                        "max_length": config.encoder.max_length,
                        "pooling": config.encoder.pooling},
            "reranker": {"max_length": config.reranker.max_length, "top_n": top_n},
            "linking": {"search_k": config.linking.search_k, "top_k": config.linking.top_k}}
    with gzip.open(out / "texts.json.gz", "wt", encoding="utf-8") as fh:
        json.dump(data, fh, ensure_ascii=False)
    print(f"{out}: {len(norms)} mentions, {len(forms)} forms, {len(pairs)} pairs, "
          f"{len(terms)} terms, vectors {vectors.shape}")


# --------------------------------------------------------------------------------------------
# run (GPU machine)


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _best(fn: Callable[[], Any], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - t)
    return best


def machine() -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {"torch": torch.__version__, "transformers": transformers.__version__,
                            "cpus": os.cpu_count(), "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update({"gpu": p.name, "sms": p.multi_processor_count,
                     "gpu_memory_gib": round(p.total_memory / 2**30, 1),
                     "capability": f"{p.major}.{p.minor}", "cuda": torch.version.cuda})
    return info


def matmul_peak(device: str) -> dict[str, float]:
    """bf16 TFLOP/s of an 8192^3 product (the chip's practical peak) and of the bi-encoder's
    feed-forward shape [tokens, 384] x [384, 1536] at 16k and 256 tokens."""
    import torch

    out = {}
    shapes = {"square_8192": (8192, 8192, 8192), "ffn_16k_tokens": (16384, 384, 1536),
              "ffn_256_tokens": (256, 384, 1536)}
    for name, (m, k, n) in shapes.items():
        a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        b = torch.randn(k, n, device=device, dtype=torch.bfloat16)
        reps = 20 if m * n * k > 1e10 else 200
        for _ in range(3):
            a @ b
        seconds = _best(lambda: [a @ b for _ in range(reps)], 3) / reps
        out[name] = round(2.0 * m * k * n / seconds / 1e12, 1)
    return out


def random_models(data: Path, work: Path, seed: int = 0) -> tuple[Path, Path]:
    """Bi-encoder and cross-encoder directories of the default architecture, random weights."""
    import torch
    from transformers import AutoConfig, BertForSequenceClassification, BertModel

    dirs = []
    for kind in ("bi", "ce"):
        d = work / f"model-{kind}"
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        for name in MODEL_FILES:
            if name == "tokenizer.json":
                with gzip.open(data / "model" / "tokenizer.json.gz", "rb") as gz, \
                        open(d / name, "wb") as fh:
                    shutil.copyfileobj(gz, fh)
            else:
                shutil.copyfile(data / "model" / name, d / name)
        config = AutoConfig.from_pretrained(d, local_files_only=True)
        torch.manual_seed(seed)
        if kind == "bi":
            model = BertModel(config)  # with the pooler, as AutoModel loads it
        else:
            config.num_labels = 1
            model = BertForSequenceClassification(config)
        model.save_pretrained(d, safe_serialization=True)
        dirs.append(d)
    return dirs[0], dirs[1]


def _flops(model_config: Any, lengths: Any) -> float:
    return bert_forward_flops(model_config.num_hidden_layers, model_config.hidden_size,
                              model_config.intermediate_size, lengths)


def _set_mode(obj: Any, mode: str) -> None:
    """autocast: fp32 weights under bf16 autocast (the linker's GPU path before 2026-11-26);
    cast: bf16 weights, a cross-encoder's head in fp32 (the linker's GPU path now); fp32: no
    autocast (TF32 off)."""
    import torch

    from clinlinker_spark.modeling import keep_head_fp32

    if mode == "cast":  # what the linker does on a GPU (modeling.inference_precision)
        obj.model.to(torch.bfloat16)
        keep_head_fp32(obj.model)  # a cross-encoder's head stays fp32
        obj._autocast_dtype = None
    elif mode == "fp32":
        obj.model.to(torch.float32)
        obj._autocast_dtype = None
    else:
        obj.model.to(torch.float32)
        obj._autocast_dtype = torch.bfloat16


def _model_only(obj: Any, batches: list[dict[str, Any]], head: str) -> float:
    """Best seconds of the forward passes alone over pre-padded batches already on the GPU."""
    import torch

    from clinlinker_spark.modeling import autocast_context

    def go() -> None:
        with torch.inference_mode(), autocast_context(obj.device, obj._autocast_dtype):
            for b in batches:
                out = obj.model(**b)
                (out.logits if head == "logits" else out.last_hidden_state).float().sum()

    go()
    return _best(go, 3)


def bi_encoder_sweep(bi_dir: Path, forms: list[str], enc_cfg: dict, batch_sizes: list[int],
                     modes: list[str], device: str, peak: float) -> dict[str, Any]:
    from clinlinker_spark.encoder import BiEncoder
    from clinlinker_spark.modeling import length_batches

    enc = BiEncoder(bi_dir, pooling=enc_cfg["pooling"], max_length=enc_cfg["max_length"],
                    prefix=enc_cfg["prefix"], device=device, precision="bf16")
    ids = enc.token_ids(forms)
    lengths = ids.lengths.tolist()
    useful = _flops(enc.model.config, lengths)
    tokenize_s = _best(lambda: enc.token_ids(forms), 3)
    rows = []
    for mode in modes:
        _set_mode(enc, mode)
        for bs in batch_sizes:
            enc.batch_size = bs
            enc.encode(forms[:4096])  # warm-up (kernels for these shapes)
            seconds = _best(lambda: enc.encode(forms), 3)
            batches = [{k: v.to(device) for k, v in ids.pad(idx, 1, 0).items()}
                       for idx in length_batches(lengths, bs)]
            padded = sum(int(b["input_ids"].numel()) for b in batches)
            model_s = _model_only(enc, batches, "hidden")
            rows.append({
                "mode": mode, "batch_size": bs, "bucketing": "length",
                "seconds": round(seconds, 4), "mentions_per_s": round(len(forms) / seconds),
                "model_seconds": round(model_s, 4),
                "model_mentions_per_s": round(len(forms) / model_s),
                "model_tflops": round(useful / model_s / 1e12, 2),
                "model_pct_of_peak": round(100 * useful / model_s / 1e12 / peak, 2),
                "padding_overhead": round(padded / sum(lengths) - 1, 4),
            })
            log.info("bi %s", rows[-1])
    # bucketing off: batches in input order, padded to each batch's longest text
    best = max((r for r in rows if r["mode"] != "fp32"), key=lambda r: r["mentions_per_s"])
    _set_mode(enc, best["mode"])
    bs = best["batch_size"]
    batches = [{k: v.to(device) for k, v in ids.pad(list(range(s, min(s + bs, len(forms)))),
                                                    1, 0).items()}
               for s in range(0, len(forms), bs)]
    padded = sum(int(b["input_ids"].numel()) for b in batches)
    model_s = _model_only(enc, batches, "hidden")
    unsorted = {"mode": best["mode"], "batch_size": bs, "bucketing": "none",
                "model_seconds": round(model_s, 4),
                "model_mentions_per_s": round(len(forms) / model_s),
                "model_tflops": round(useful / model_s / 1e12, 2),
                "padding_overhead": round(padded / sum(lengths) - 1, 4)}
    log.info("bi unsorted %s", unsorted)
    # the wrapper tokenizer and per-row padding (the legacy path, for comparison), same model
    legacy = _legacy_encode_seconds(enc, forms)
    return {"forms": len(forms), "mean_tokens": round(float(np.mean(lengths)), 2),
            "useful_gflop": round(useful / 1e9, 1), "tokenize_seconds": round(tokenize_s, 4),
            "tokenize_us_per_text": round(tokenize_s / len(forms) * 1e6, 2),
            "runs": rows, "unsorted": unsorted, "best": best,
            "legacy_tokenize_pad": {"batch_size": bs, "mode": best["mode"],
                                    "seconds": round(legacy, 4),
                                    "mentions_per_s": round(len(forms) / legacy)}}


def _pad_row_by_row(features: dict, indices: list[int]) -> dict:
    """The per-row padding the project had before 2026-11-26 (pad id 1: XLM-R's)."""
    import torch

    width = max(len(features["input_ids"][i]) for i in indices)
    batch = {}
    for name, fill in (("input_ids", 1), ("attention_mask", 0)):
        out = torch.full((len(indices), width), fill, dtype=torch.long)
        for r, i in enumerate(indices):
            out[r, : len(features[name][i])] = torch.as_tensor(features[name][i])
        batch[name] = out
    return batch


def _legacy_encode_seconds(enc: Any, forms: list[str]) -> float:
    from clinlinker_spark.modeling import length_batches

    def go() -> None:
        encoded = enc.tokenizer([enc.prefix + t for t in forms], truncation=True,
                                max_length=enc.max_length, padding=False,
                                return_attention_mask=True)
        features = {k: v for k, v in encoded.items() if k in ("input_ids", "attention_mask")}
        out = np.empty((len(forms), enc.dim), dtype=np.float32)
        for idx in length_batches([len(x) for x in features["input_ids"]], enc.batch_size):
            out[idx] = enc._embed_batch(_pad_row_by_row(features, idx)).cpu().numpy()

    go()
    return _best(go, 3)


def cross_encoder_sweep(ce_dir: Path, pairs: list[list[str]], max_length: int,
                        batch_sizes: list[int], modes: list[str], device: str,
                        peak: float) -> dict[str, Any]:
    from clinlinker_spark.modeling import length_batches, tokenize_ids
    from clinlinker_spark.reranker import CrossEncoderReranker

    ce = CrossEncoderReranker(ce_dir, max_length=max_length, device=device, precision="bf16")
    mentions = [p[0] for p in pairs]
    terms = [p[1] for p in pairs]
    ids = tokenize_ids(ce.tokenizer, mentions, ce.max_length, pairs=terms)
    lengths = ids.lengths.tolist()
    useful = _flops(ce.model.config, lengths)
    tokenize_s = _best(lambda: tokenize_ids(ce.tokenizer, mentions, ce.max_length, pairs=terms),
                       3)
    rows = []
    for mode in modes:
        _set_mode(ce, mode)
        for bs in batch_sizes:
            ce.batch_size = bs
            ce.score(mentions[:4096], terms[:4096])
            seconds = _best(lambda: ce.score(mentions, terms), 3)
            batches = [{k: v.to(device) for k, v in ids.pad(idx, 1, 0).items()}
                       for idx in length_batches(lengths, bs)]
            model_s = _model_only(ce, batches, "logits")
            rows.append({
                "mode": mode, "batch_size": bs, "seconds": round(seconds, 4),
                "pairs_per_s": round(len(pairs) / seconds),
                "model_seconds": round(model_s, 4),
                "model_pairs_per_s": round(len(pairs) / model_s),
                "model_tflops": round(useful / model_s / 1e12, 2),
                "model_pct_of_peak": round(100 * useful / model_s / 1e12 / peak, 2),
            })
            log.info("ce %s", rows[-1])
    best = max((r for r in rows if r["mode"] != "fp32"), key=lambda r: r["pairs_per_s"])
    return {"pairs": len(pairs), "mean_tokens": round(float(np.mean(lengths)), 2),
            "max_length": ce.max_length, "tokenize_seconds": round(tokenize_s, 4),
            "runs": rows, "best": best}


def gpu_exact_search(real: np.ndarray, sizes: list[int], n_queries: int, k: int,
                     recall_k: int, chunk: int, device: str, seed: int = 7) -> list[dict]:
    """Exact inner-product top-k on the GPU with torch (bf16 and fp32 scores) at terminology
    sizes built from the real vectors plus noise (as benchmarks/bench_faiss.py's 'composed'),
    and recall@recall_k of bf16 against fp32."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    base = torch.from_numpy(real.astype(np.float32)).to(device)
    rows = []
    for n in sizes:
        pick = torch.randint(0, base.shape[0], (n,), device=device, generator=g)
        vecs = base[pick] + 0.5 * torch.randn(n, base.shape[1], device=device, generator=g) \
            / base.shape[1] ** 0.5
        vecs[: base.shape[0]] = base[: min(n, base.shape[0])]
        vecs = torch.nn.functional.normalize(vecs, dim=1)
        qpick = torch.randint(0, n, (n_queries,), device=device, generator=g)
        queries = torch.nn.functional.normalize(
            vecs[qpick] + 0.3 * torch.randn(n_queries, vecs.shape[1], device=device,
                                            generator=g) / vecs.shape[1] ** 0.5, dim=1)
        result = {"terms": n, "queries": n_queries, "k": k, "chunk": chunk}
        tops = {}
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            torch.backends.cuda.matmul.allow_tf32 = False
            v = vecs.to(dtype)
            q = queries.to(dtype)

            def go() -> torch.Tensor:
                out = []
                for s in range(0, n_queries, chunk):
                    scores = q[s:s + chunk] @ v.T
                    out.append(torch.topk(scores, k, dim=1).indices)
                return torch.cat(out)

            tops[name] = go()
            seconds = _best(go, 3)
            result[f"{name}_us_per_query"] = round(seconds / n_queries * 1e6, 3)
            del v, q
        hit = 0
        a, b = tops["bf16"][:, :recall_k].cpu().numpy(), tops["fp32"][:, :recall_k].cpu().numpy()
        for x, y in zip(a, b):
            hit += len(set(x.tolist()) & set(y.tolist()))
        result[f"bf16_recall_at_{recall_k}"] = round(hit / (recall_k * n_queries), 4)
        rows.append(result)
        log.info("search %s", result)
        del vecs, queries
        torch.cuda.empty_cache()
    return rows


def _composed(real: np.ndarray, n: int, n_queries: int, rng: np.random.Generator
              ) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit vectors: real index vectors drawn with replacement plus noise, and
    ``n_queries`` of them as queries."""
    base = real.astype(np.float32)
    vecs = base[rng.integers(0, len(base), n)] + (0.5 / base.shape[1] ** 0.5) * \
        rng.standard_normal((n, base.shape[1]), dtype=np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    return vecs, vecs[rng.integers(0, n, n_queries)].copy()


def faiss_cpu_exact(real: np.ndarray, sizes: list[int], n_queries: int, k: int,
                    seed: int = 7) -> list[dict]:
    """faiss-cpu IndexFlatIP with every core of this machine, same composed data."""
    import faiss

    rng = np.random.default_rng(seed)
    rows = []
    for n in sizes:
        vecs, queries = _composed(real, n, n_queries, rng)
        index = faiss.IndexFlatIP(vecs.shape[1])
        index.add(vecs)
        index.search(queries[:64], k)
        seconds = _best(lambda: index.search(queries, k), 2)
        rows.append({"terms": n, "queries": n_queries, "threads": faiss.omp_get_max_threads(),
                     "us_per_query": round(seconds / n_queries * 1e6, 2)})
        log.info("faiss-cpu %s", rows[-1])
    return rows


def linker_end_to_end(bi_dir: Path, ce_dir: Path, norms: list[str], work: Path,
                      bi_batch: int, ce_batch: int, repo: Path, device: str) -> dict[str, Any]:
    """The core linker (ClinLinker: bi-encoder, FAISS, cross-encoder) on the embedded
    default's terminology with its models on the GPU: index build terms/s, then link_texts
    over every mention of the corpus (distinct forms linked once)."""
    import dataclasses

    from clinlinker_spark.config import load_config
    from clinlinker_spark.encoder import BiEncoder
    from clinlinker_spark.index import ensure_index
    from clinlinker_spark.linker import Linker

    os.chdir(repo)
    config = load_config("conf/local.yaml", [
        f"encoder.path={bi_dir}", f"encoder.batch_size={bi_batch}", f"encoder.device={device}",
        f"index.path={work / 'index'}", f"reranker.path={ce_dir}",
        f"reranker.batch_size={ce_batch}", f"reranker.device={device}"])
    config = dataclasses.replace(config, build_missing=True)
    encoder = BiEncoder.from_config(config.encoder)
    started = time.perf_counter()
    ensure_index(config, encoder)
    build_s = time.perf_counter() - started
    linker = Linker.from_config(config)
    linker.link_texts(norms[:2000])  # warm-up
    linker.take_stage_seconds()
    started = time.perf_counter()
    linked = linker.link_texts(norms)
    seconds = time.perf_counter() - started
    stages = linker.take_stage_seconds()
    manifest = json.loads((work / "index" / "manifest.json").read_text())
    return {"index_terms": manifest["terminology"]["distinct_terms"],
            "index_build_seconds": round(build_s, 2),
            "index_embed_seconds": manifest["build"]["embed_seconds"],
            "mentions": len(norms), "forms": len(set(norms)), "seconds": round(seconds, 3),
            "mentions_per_s": round(len(norms) / seconds),
            "stage_seconds": {k: round(v, 3) for k, v in stages.items()},
            "linked_with_candidates": sum(1 for c in linked if c)}


def batch_independence(bi_dir: Path, norms: list[str], work: Path, repo: Path, device: str,
                       n_forms: int = 4000, chunk: int = 97) -> dict[str, Any]:
    """Whether a form's candidates depend on the batch it is linked in: the core linker's
    ``retrieve`` (bi-encoder + search, top 25 codes) over ``n_forms`` distinct forms in one
    call against the same forms shuffled in calls of ``chunk``, with the encoder in fp32
    and in the device's default precision (bf16 on a GPU); the default terminology, its
    index built once."""
    import dataclasses

    from clinlinker_spark.config import load_config
    from clinlinker_spark.encoder import BiEncoder
    from clinlinker_spark.index import ensure_index
    from clinlinker_spark.linker import Linker

    os.chdir(repo)
    config = load_config("conf/local.yaml", [
        f"encoder.path={bi_dir}", "encoder.batch_size=1024", f"encoder.device={device}",
        f"index.path={work / 'index-batch-independence'}"])
    config = dataclasses.replace(config, build_missing=True)
    ensure_index(config, BiEncoder.from_config(config.encoder))
    forms = list(dict.fromkeys(norms))[:n_forms]
    order = np.random.default_rng(3).permutation(len(forms))
    out: dict[str, Any] = {"forms": len(forms), "chunk": chunk}
    for precision in ("fp32", "auto"):
        linker = Linker.from_config(dataclasses.replace(
            config, encoder=dataclasses.replace(config.encoder, precision=precision)))
        whole = linker.retrieve(forms)
        shuffled: list[Any] = [None] * len(forms)
        for start in range(0, len(order), chunk):
            part = order[start:start + chunk]
            for i, cands in zip(part, linker.retrieve([forms[i] for i in part])):
                shuffled[i] = cands
        codes = [([c.code for c in a], [c.code for c in b]) for a, b in zip(whole, shuffled)]
        out[precision] = {
            "same_top_k_codes": round(float(np.mean([a == b for a, b in codes])), 4),
            "same_best_code": round(float(np.mean([a[:1] == b[:1] for a, b in codes])), 4),
            "max_abs_score_diff": float(max(
                abs(x.retrieval_score - y.retrieval_score)
                for a, b in zip(whole, shuffled) for x, y in zip(a, b)))}
        log.info("batch independence %s %s", precision, out[precision])
    return out


def product_search(real: np.ndarray, sizes: list[int], n_queries: int, k: int,
                   device: str, seed: int = 7) -> list[dict]:
    """The linker's GPU search, fed numpy queries and returning numpy hits as the linker does,
    on the composed data: the top-k alone (index.torch_search: fp32, chunks of 1 GiB of
    scores) and as TerminologyIndex.search runs it (index.search_in_order: 8 more hits, then
    near-ties ordered by float64 scores on the GPU)."""
    import torch

    from clinlinker_spark.index import (
        exact_scores, search_in_order, torch_search, torch_top_k,
    )

    rng = np.random.default_rng(seed)
    rows = []
    for n in sizes:
        vecs, queries = _composed(real, n, n_queries, rng)
        tensor = torch.from_numpy(vecs).to(device)

        def raw(q: np.ndarray, kk: int) -> tuple[Any, Any]:
            return torch_top_k(tensor, q, kk)

        def exact(q: np.ndarray, r: Any, p: Any) -> Any:
            return exact_scores(lambda i: tensor[i], q, r, p)

        def in_order() -> Any:
            return search_in_order(queries, k, n, raw, exact)

        torch_search(tensor, queries[:256], k)
        search_in_order(queries[:256], k, n, raw, exact)
        seconds = _best(lambda: torch_search(tensor, queries, k), 3)
        ordered_seconds = _best(in_order, 3)
        rows.append({"terms": n, "queries": n_queries, "k": k,
                     "us_per_query": round(seconds / n_queries * 1e6, 3),
                     "us_per_query_in_order": round(ordered_seconds / n_queries * 1e6, 3)})
        log.info("product search %s", rows[-1])
        del tensor
    return rows


def gpu_checks(bi_dir: Path, ce_dir: Path, forms: list[str], pairs: list[list[str]],
               real: np.ndarray, enc_cfg: dict, ce_max_length: int, device: str) -> dict:
    """The GPU paths' results against references, on the device: encode (vectors copied
    back once at the end) against one batch at a time; rows in input order under a
    permutation; the cross-encoder's scores under a permutation and their distinct values
    (fp32 head); the GPU search against faiss-cpu on the real index vectors."""
    import faiss
    import torch

    from clinlinker_spark.encoder import BiEncoder
    from clinlinker_spark.index import (
        exact_scores, search_in_order, torch_search, torch_top_k,
    )
    from clinlinker_spark.reranker import CrossEncoderReranker

    out: dict[str, Any] = {}
    enc = BiEncoder(bi_dir, pooling=enc_cfg["pooling"], max_length=enc_cfg["max_length"],
                    prefix=enc_cfg["prefix"], device=device, batch_size=1024)
    out["bi_weights_dtype"] = str(next(enc.model.parameters()).dtype)
    vecs = enc.encode(forms)
    one = np.concatenate([enc.encode(forms[i:i + 1000]) for i in range(0, len(forms), 1000)])
    perm = np.random.default_rng(0).permutation(len(forms))
    permuted = enc.encode([forms[i] for i in perm])
    out["bi_max_abs_diff_vs_chunks_of_1000"] = float(np.abs(vecs - one).max())
    out["bi_max_abs_diff_permuted"] = float(np.abs(permuted - vecs[perm]).max())
    ce = CrossEncoderReranker(ce_dir, max_length=ce_max_length, device=device, batch_size=1024)
    out["ce_weights_dtype"] = str(next(ce.model.parameters()).dtype)
    out["ce_head"] = type(ce.model.classifier).__name__
    m, t = [p[0] for p in pairs[:20000]], [p[1] for p in pairs[:20000]]
    scores = ce.score(m, t)
    perm = np.random.default_rng(1).permutation(len(m))
    scores_p = ce.score([m[i] for i in perm], [t[i] for i in perm])
    out["ce_scores_dtype"] = str(scores.dtype)
    out["ce_distinct_scores"] = int(len(np.unique(scores)))
    out["ce_pairs"] = len(m)
    out["ce_max_abs_diff_permuted"] = float(np.abs(scores_p - scores[perm]).max())
    base = real.astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    queries = vecs[:4096] if vecs.shape[1] == base.shape[1] else base[:4096]
    flat = faiss.IndexFlatIP(base.shape[1])
    flat.add(base)
    want_s, want_p = flat.search(queries, 200)
    tensor = torch.from_numpy(base).to(device)
    got_s, got_p = torch_search(tensor, queries, 200)
    out["search_same_positions"] = float((got_p == want_p).mean())
    out["search_same_top25_sets"] = float(np.mean([set(a[:25]) == set(b[:25])
                                                   for a, b in zip(got_p, want_p)]))
    out["search_max_abs_score_diff"] = float(np.abs(got_s - want_s).max())
    # as TerminologyIndex.search runs: near-ties in exact order, on either device
    cpu_s, cpu_p = search_in_order(
        queries, 200, len(base),
        lambda q, kk: tuple(torch.from_numpy(a) for a in flat.search(q, kk)),
        lambda q, r, p: exact_scores(lambda i: torch.from_numpy(base[i.numpy()]), q, r, p))
    gpu_s, gpu_p = search_in_order(
        queries, 200, len(base), lambda q, kk: torch_top_k(tensor, q, kk),
        lambda q, r, p: exact_scores(lambda i: tensor[i], q, r, p))
    out["in_order_same_positions"] = float((gpu_p == cpu_p).mean())
    out["in_order_max_abs_score_diff"] = float(np.abs(gpu_s - cpu_s).max())
    log.info("checks %s", out)
    return out


def run(args: argparse.Namespace) -> None:
    import torch

    data = Path(args.data)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with gzip.open(data / "texts.json.gz", "rt", encoding="utf-8") as fh:
        texts = json.load(fh)
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                               "machine": machine(), "device": device}
    out = Path(args.out)

    def save() -> None:
        write_json(out, results)

    scale = args.scale
    results["matmul_bf16_tflops"] = matmul_peak(device) if device == "cuda" else {}
    peak = results["matmul_bf16_tflops"].get("square_8192", 1.0)
    save()
    bi_dir, ce_dir = random_models(data, work)
    forms = texts["forms"][: int(len(texts["forms"]) * scale)]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    modes = args.modes.split(",")
    steps = args.steps.split(",")
    real = np.load(data / "index_vectors_fp16.npy").astype(np.float32)
    sizes = [int(s) for s in args.search_sizes.split(",")]
    if "bi" in steps:
        results["bi_encoder"] = bi_encoder_sweep(bi_dir, forms, texts["encoder"], batch_sizes,
                                                 modes, device, peak)
        save()
    if "ce" in steps:
        pairs = texts["pairs"][: int(len(texts["pairs"]) * scale * args.pair_scale)]
        results["cross_encoder"] = cross_encoder_sweep(
            ce_dir, pairs, texts["reranker"]["max_length"], batch_sizes, modes, device, peak)
        save()
    if "search" in steps and device == "cuda":
        results["gpu_exact_search"] = gpu_exact_search(
            real, sizes, args.queries, texts["linking"]["search_k"], 25, args.search_chunk,
            device)
        save()
    if "checks" in steps:
        results["checks"] = gpu_checks(bi_dir, ce_dir, forms, texts["pairs"], real,
                                       texts["encoder"], texts["reranker"]["max_length"],
                                       device)
        save()
    if "search_product" in steps and device == "cuda":
        results["product_search"] = product_search(real, sizes, args.queries,
                                                   texts["linking"]["search_k"], device)
        save()
    if "faiss" in steps:
        results["faiss_cpu_exact"] = faiss_cpu_exact(real, sizes, args.faiss_queries,
                                                     texts["linking"]["search_k"])
        save()
    if "independence" in steps:
        norms = texts["mention_norms"][: int(len(texts["mention_norms"]) * scale)]
        results["batch_independence"] = batch_independence(
            bi_dir, norms, work, Path(__file__).resolve().parent.parent, device)
        save()
    if "link" in steps:
        bi_best = results.get("bi_encoder", {}).get("best", {}).get("batch_size", 1024)
        ce_best = results.get("cross_encoder", {}).get("best", {}).get("batch_size", 1024)
        import clinlinker_spark

        results["linker_code"] = str(Path(clinlinker_spark.__file__).parent)
        norms = texts["mention_norms"][: int(len(texts["mention_norms"]) * scale)]
        results["linker"] = linker_end_to_end(bi_dir, ce_dir, norms, work, bi_best, ce_best,
                                              Path(__file__).resolve().parent.parent, device)
        save()
    print(json.dumps(results, indent=1))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("clinlinker_spark").setLevel(logging.WARNING)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--config", default="conf/local.yaml")
    p.add_argument("--corpus", default="artifacts/bench/link/night1.parquet")
    p.add_argument("--pair-forms", type=int, default=2000)
    p.add_argument("--out", default=".gpu")
    r = sub.add_parser("run")
    r.add_argument("--data", default=".gpu")
    r.add_argument("--work", default="/tmp/bench_gpu")
    r.add_argument("--out", default="artifacts/bench_gpu/gpu.json")
    r.add_argument("--scale", type=float, default=1.0, help="fraction of forms/pairs to use")
    r.add_argument("--pair-scale", type=float, default=1.0,
                   help="a further fraction of the cross-encoder's pairs")
    r.add_argument("--batch-sizes", default="128,256,512,1024,2048,4096")
    r.add_argument("--modes", default="autocast,cast")
    r.add_argument("--steps",
                   default="bi,ce,checks,search,search_product,faiss,independence,link")
    r.add_argument("--search-sizes", default="17417,100000,500000,1500000")
    r.add_argument("--queries", type=int, default=8192)
    r.add_argument("--search-chunk", type=int, default=2048)
    r.add_argument("--faiss-queries", type=int, default=1024)
    r.add_argument("--code", default="", help="import clinlinker_spark from this checkout")
    args = ap.parse_args(argv)
    prepare(args) if args.cmd == "prepare" else run(args)


if __name__ == "__main__":
    main()
