"""Document indexes: reading and checking documents, chunk spans, BM25 / dense / fused rankings, the manifest, the
registry round trip, the embedding-model refusal, Qdrant beside LanceDB, and the CLI. The embedder is a tiny random
BERT with a WordPiece tokenizer trained here, saved as a sentence-transformers directory; one test uses the real
all-MiniLM-L6-v2 zip when its package is installed."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from polyadapt.errors import ConfigError, DataError, RunDirectoryError
from polyadapt.retrieval import EmbeddingMismatchError, Hit, build_index, open_index, rrf

REPO = Path(__file__).resolve().parents[2]
POLICIES = REPO / "sample_data" / "text" / "policies"
VOCABULARY = (
    "overdraft fee item day account balance savings interest rate card replacement express lost stolen phone "
    "branch hours monday friday saturday wire transfer domestic international cheque deposit limit rewards points "
    "harbor bank crew the a of to is and in for with on at by per each every what how much when"
)
WORDS = VOCABULARY.split()

CORPUS = {
    "fees.md": (
        "# Fees\n\n## Overdraft\n\nAn overdraft costs $25 per item, at most two per day.\n\n"
        "## Wire transfers\n\nA domestic wire costs $20 and an international wire costs $35.\n"
    ),
    "cards.html": (
        "<html><head><title>Cards</title><style>p {color: red}</style></head><body>"
        "<h1>Cards</h1><p>Report a lost or stolen card on the Mooring Line.</p>"
        "<h2>Replacement</h2><p>A replacement card is free; express replacement costs $15.</p></body></html>"
    ),
    "savings.jsonl": (
        json.dumps({"id": "apy", "title": "Savings rate", "text": "TideSaver savings pay 3.10% interest a year."})
        + "\n"
        + json.dumps({"id": "withdrawals", "text": "Six free withdrawals each month, then $2 each."})
        + "\n"
    ),
    "hours.txt": "Branches open Monday to Friday, 9 am to 5 pm, and Saturday morning.\n",
}


# -- fixtures --------------------------------------------------------------------------------------------------------
def make_embedder(directory: Path, *, hidden: int = 32, seed: int = 0) -> Path:
    """A tiny BERT (2 layers) with a WordPiece tokenizer, saved as a sentence-transformers directory."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials, show_progress=False)
    tokenizer.train_from_iterator([" ".join(WORDS)] * 4 + list(CORPUS.values()), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128,
    )  # fmt: skip
    model = BertModel(config, add_pooling_layer=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(config.to_json_string())
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "1_Pooling").mkdir(exist_ok=True)
    (directory / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": hidden, "pooling_mode_mean_tokens": True})
    )
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128}))
    return directory


@pytest.fixture(scope="session")
def embedder_dir(tmp_path_factory) -> Path:
    return make_embedder(tmp_path_factory.mktemp("embedder") / "tiny-bert")


@pytest.fixture(scope="session")
def other_embedder_dir(tmp_path_factory) -> Path:
    return make_embedder(tmp_path_factory.mktemp("embedder") / "other-bert", hidden=48, seed=1)


def write_corpus(directory: Path, files: dict[str, str | bytes] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in (CORPUS if files is None else files).items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8", newline="")
    return directory


@pytest.fixture(scope="session")
def docs(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("docs") / "docs")


@pytest.fixture(scope="session")
def built(tmp_path_factory, docs, embedder_dir) -> Path:
    index = build_index(docs, tmp_path_factory.mktemp("index") / "index", embedding_model=embedder_dir)
    index.close()
    return index.path


def source_text(docs: Path, source: str, record: str | None = None) -> str:
    """The text spans refer to: the file's text (HTML: its visible text; JSONL: the record's text)."""
    from polyadapt.retrieval.documents import html_text

    raw = (docs / source).read_bytes().decode("utf-8")
    if source.endswith(".html"):
        return html_text(raw)[0]
    if source.endswith(".jsonl"):
        rows = [json.loads(line) for line in raw.splitlines() if line.strip()]
        return next(r["text"] for r in rows if str(r["id"]) == record)
    return raw


# -- chunks ----------------------------------------------------------------------------------------------------------
def test_chunk_spans_are_the_source_text_and_carry_source_and_heading(built, docs):
    index = open_index(built)
    headings = {(c.source, c.heading) for c in index.chunks}
    assert headings == {
        ("fees.md", "Overdraft"), ("fees.md", "Wire transfers"), ("cards.html", "Cards"),
        ("cards.html", "Replacement"), ("savings.jsonl", "Savings rate"), ("savings.jsonl", None), ("hours.txt", None),
    }  # fmt: skip
    for chunk in index.chunks:
        assert chunk.text == source_text(docs, chunk.source, chunk.record)[chunk.start : chunk.end]
    overdraft = next(c for c in index.chunks if c.heading == "Overdraft")
    assert overdraft.text.startswith("## Overdraft") and "$25" in overdraft.text and "Wire" not in overdraft.text
    assert "color" not in " ".join(c.text for c in index.chunks)  # <style> is not text


def test_chunks_keep_the_heading_path_they_sit_under(built):
    by_heading = {(c.source, c.heading): c for c in open_index(built).chunks}
    assert by_heading["fees.md", "Overdraft"].context == "Fees > Overdraft"
    assert by_heading["cards.html", "Replacement"].context == "Cards > Replacement"
    assert by_heading["savings.jsonl", "Savings rate"].context == "Savings rate"
    assert by_heading["hours.txt", None].context == ""
    chunk = by_heading["savings.jsonl", "Savings rate"]
    assert chunk.search_text == "Savings rate\n" + chunk.text


def test_markdown_and_html_headings_have_levels_and_offsets():
    from polyadapt.retrieval.documents import html_text, markdown_headings

    text = "# A\n\n```\n# not a heading\n```\n\n### B ###\ntext\n"
    assert markdown_headings(text) == ((0, 1, "A"), (text.index("### B"), 3, "B"))
    body, headings = html_text("<h2>Fees &amp; limits</h2><p>One</p><script>x</script><h3>  </h3><p>Two</p>")
    assert body == "Fees & limits\nOne\nTwo\n"
    assert headings == ((0, 2, "Fees & limits"),)


def test_s_stemmer_matches_plurals_only():
    from polyadapt.retrieval.index import bm25_tokens, s_stem

    assert [s_stem(w) for w in ("fees", "policies", "branches", "days", "bus", "glass", "shoes", "35")] == [
        "fee", "policy", "branche", "day", "bus", "glass", "shoe", "35",
    ]  # fmt: skip
    assert bm25_tokens("What are the Fees for 2 wires?") == ["what", "fee", "2", "wire"]


def test_windows_overlap_by_the_requested_tokens_and_cover_the_section(embedder_dir):
    from polyadapt.retrieval.chunking import chunk_document
    from polyadapt.retrieval.documents import Document, markdown_headings
    from polyadapt.retrieval.embedding import load_embedder

    tokenizer = load_embedder(embedder_dir).tokenizer
    body = " ".join(WORDS[i % len(WORDS)] for i in range(90))
    text = f"# Long\n\n{body}\n\n## Short\n\nthe overdraft fee\n"
    document = Document("long.md", text, markdown_headings(text))
    chunks = chunk_document(document, tokenizer, chunk_tokens=16, overlap=4)
    long = [c for c in chunks if c.heading == "Long"]
    offsets = [(a, b) for a, b in tokenizer.encode(text[: text.index("## Short")]).offsets if b > a]
    starts = [next(i for i, (a, _) in enumerate(offsets) if a == c.start) for c in long]
    ends = [next(i for i, (_, b) in enumerate(offsets) if b == c.end) + 1 for c in long]
    assert len(long) > 3
    assert all(b - a == 12 for a, b in zip(starts, starts[1:], strict=False))  # step = 16 - 4
    assert all(e - s == 16 for s, e in zip(starts[:-1], ends[:-1], strict=True))
    assert ends[-1] == len(offsets) and starts[0] == 0
    assert [c.heading for c in chunks if c.heading != "Long"] == ["Short"]
    assert all(c.text == text[c.start : c.end] for c in chunks)
    with pytest.raises(ValueError, match="overlap"):
        chunk_document(document, tokenizer, chunk_tokens=8, overlap=8)


def test_citation_is_source_and_heading_anchor():
    hit = Hit(rank=1, score=1.0, chunk_id="x", text="t", source="fees.md", heading="Wire transfers (outgoing)",
              start=0, end=1)  # fmt: skip
    assert hit.citation == "fees.md#wire-transfers-outgoing"
    assert Hit(1, 1.0, "x", "t", "hours.txt", None, 0, 1).citation == "hours.txt"


# -- rankings --------------------------------------------------------------------------------------------------------
def test_rrf_on_hand_values():
    fused = rrf([[1, 2, 3], [3, 1]], k=60)
    assert [item for item, _ in fused] == [1, 3, 2]
    assert math.isclose(dict(fused)[1], 1 / 61 + 1 / 62)
    assert math.isclose(dict(fused)[3], 1 / 63 + 1 / 61)
    assert math.isclose(dict(fused)[2], 1 / 62)
    # equal scores: the better best rank, then the smaller id
    assert [item for item, _ in rrf([[2, 1], [1, 2]])] == [1, 2]
    assert [item for item, _ in rrf([[5], [], [7, 5]], k=1)] == [5, 7]
    assert rrf([]) == []


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("overdraft fee per item", "fees.md#overdraft"),
        ("express replacement card", "cards.html#replacement"),
        ("international wire", "fees.md#wire-transfers"),
        ("savings interest", "savings.jsonl#savings-rate"),
        ("saturday branches", "hours.txt"),
    ],
)
def test_bm25_finds_the_known_answer(built, query, expected):
    hits = open_index(built).search(query, top_k=3, mode="bm25")
    assert hits[0].citation == expected
    assert [h.rank for h in hits] == list(range(1, len(hits) + 1))
    assert all(a.score >= b.score > 0 for a, b in zip(hits, hits[1:], strict=False))


def test_bm25_returns_nothing_for_unknown_terms(built):
    assert open_index(built).search("zyzzyva quux", mode="bm25") == []


def test_dense_ranking_is_cosine_over_the_stored_embeddings(built):
    index = open_index(built)
    vectors = index.embeddings
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    for chunk in index.chunks:
        # a chunk's own text is its own nearest neighbour
        assert index.search(chunk.text, top_k=1, mode="dense")[0].chunk_id == chunk.chunk_id
    query = "what does an overdraft cost"
    expected = np.argsort(-(vectors @ index.embedder.encode([query])[0]), kind="stable")[:4]
    hits = index.search(query, top_k=4, mode="dense")
    assert [h.chunk_id for h in hits] == [index.chunks[i].chunk_id for i in expected]


def test_embedder_pools_like_sentence_transformers(embedder_dir):
    import torch
    from transformers import AutoTokenizer, BertModel

    from polyadapt.retrieval.embedding import load_embedder

    texts = ["the overdraft fee", "a much longer sentence about wire transfer limits per day"]
    ours = load_embedder(embedder_dir).encode(texts)
    model = BertModel.from_pretrained(embedder_dir, add_pooling_layer=False).eval()
    tokenizer = AutoTokenizer.from_pretrained(embedder_dir)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    reference = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1).numpy()
    assert np.allclose(ours, reference, atol=1e-5)


def test_hybrid_is_the_rrf_of_bm25_and_dense(built):
    index = open_index(built)
    for query in ("overdraft per day", "lost card line", "interest on savings"):
        bm25 = [row for row, _ in index.bm25_ranking(query, 50)]
        dense = [row for row, _ in index.dense_ranking(query, 50)]
        expected = rrf([bm25, dense])[:3]
        hits = index.search(query, top_k=3)
        assert [h.chunk_id for h in hits] == [index.chunks[row].chunk_id for row, _ in expected]
        assert [h.score for h in hits] == pytest.approx([score for _, score in expected])
    # BM25 agrees with the known answer, so fusion keeps it first
    assert index.search("express replacement card", top_k=1)[0].citation == "cards.html#replacement"


def test_search_refuses_bad_mode_and_top_k(built):
    index = open_index(built)
    with pytest.raises(ConfigError, match="mode 'fuzzy'"):
        index.search("x", mode="fuzzy")
    with pytest.raises(ConfigError, match="top_k"):
        index.search("x", top_k=0)


# -- the manifest and the registry ----------------------------------------------------------------------------------
def test_manifest_records_documents_chunking_model_store_and_counts(built, docs, embedder_dir):
    manifest = open_index(built).manifest
    assert manifest["format"] == "polyadapt-index" and manifest["format_version"] == 1
    files = manifest["documents"]["files"]
    assert set(files) == set(CORPUS)
    for name, entry in files.items():
        assert entry["sha256"] == hashlib.sha256((docs / name).read_bytes()).hexdigest()
    assert manifest["chunking"]["chunk_tokens"] == 256 and manifest["chunking"]["overlap"] == 32
    embedding = manifest["embedding"]
    assert embedding["reference"] == str(embedder_dir.resolve())
    assert embedding["sha256"] == hashlib.sha256((embedder_dir / "model.safetensors").read_bytes()).hexdigest()
    assert embedding["dimension"] == 32 and embedding["pooling"] == "mean" and embedding["normalize"] is True
    assert manifest["store"] == {"kind": "lancedb"}
    assert manifest["counts"] == {"documents": 4, "records": 5, "chunks": 7}
    assert manifest["retrieval"]["fusion"]["k"] == 60
    assert manifest["created"] and manifest["polyadapt_version"]
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((built / name).read_bytes()).hexdigest() == digest


def test_an_altered_index_file_is_named(tmp_path, docs, embedder_dir):
    index = build_index(docs, tmp_path / "index", embedding_model=embedder_dir)
    index.close()
    chunks = json.loads((tmp_path / "index" / "chunks.json").read_text())
    chunks[0]["text"] = "tampered"
    (tmp_path / "index" / "chunks.json").write_text(json.dumps(chunks))
    with pytest.raises(Exception, match="chunks.json is altered"):
        open_index(tmp_path / "index")


def test_registry_round_trip_gives_the_same_hits(tmp_path, built, monkeypatch):
    from polyadapt.registry import open as open_registry

    monkeypatch.setenv("POLYADAPT_CACHE", str(tmp_path / "cache"))
    queries = ["overdraft fee", "lost card", "savings rate"]
    original = open_index(built)
    expected = {q: [(h.chunk_id, round(h.score, 5)) for h in original.search(q)] for q in queries}
    registry = open_registry(tmp_path / "registry")
    try:
        pushed = registry.push(built, "policies", description="the fee pages")
        assert pushed.created and pushed.version.label == "policies@v1" and pushed.version.modality == "index"
        assert set(pushed.version.files) == {"index.json", "chunks.json", "embeddings.safetensors"}
        assert pushed.version.data_fingerprint == original.manifest["documents"]["fingerprint"]
        assert not registry.push(built, "policies").created  # the same index is not stored twice
        registry.alias("policies@v1", "production")
        pulled = registry.pull("policies@production", tmp_path / "pulled")
        checked, problems = registry.verify("policies")
        assert checked == 3 and problems == []
    finally:
        registry.close()
    assert not (pulled / "lancedb").exists()
    with open_index(pulled) as reopened:  # the store is rebuilt from the stored vectors
        assert {q: [(h.chunk_id, round(h.score, 5)) for h in reopened.search(q)] for q in queries} == expected
    assert (pulled / "lancedb").is_dir()
    assert "policies@v1" in (pulled / "README.md").read_text()
    by_ref = open_index("policies@production", registry=str(tmp_path / "registry"))
    assert by_ref.path.is_relative_to(tmp_path / "cache") and by_ref.label == "policies@v1"
    assert by_ref.fingerprint == original.fingerprint
    assert {q: [(h.chunk_id, round(h.score, 5)) for h in by_ref.search(q)] for q in queries} == expected


def test_an_index_is_refused_a_query_embedder_of_another_model(built, other_embedder_dir, embedder_dir):
    with pytest.raises(EmbeddingMismatchError) as caught:
        open_index(built, embedding_model=other_embedder_dir)
    message = str(caught.value)
    assert str(embedder_dir.resolve()) in message and "dimension 32" in message
    assert str(other_embedder_dir.resolve()) in message and "dimension 48" in message
    assert open_index(built, embedding_model=embedder_dir).search("overdraft", mode="dense")


# -- bad input -------------------------------------------------------------------------------------------------------
def test_every_bad_document_is_named_with_its_reason(tmp_path, embedder_dir):
    docs = write_corpus(
        tmp_path / "docs",
        {
            "good.md": "# Good\n\nFine text.\n",
            "empty.md": "  \n\n",
            "blank.html": "<html><body><script>x()</script></body></html>",
            "binary.txt": b"abc\x00\x01\x02",
            "latin1.txt": "caf\xe9".encode("latin-1"),
            "big.md": "x" * 2000,
            "bad.jsonl": '{"text": "ok"}\nnot json\n{"title": "no text"}\n',
            "notes.pdf": b"%PDF-1.4",
        },
    )
    (docs / "gone.md").symlink_to(docs / "missing-target.md")
    with pytest.raises(DataError) as caught:
        build_index(docs, tmp_path / "index", embedding_model=embedder_dir, max_document_bytes=1000)
    message = str(caught.value)
    for expected in (
        "empty.md: empty", "blank.html: empty", "binary.txt: binary", "latin1.txt: binary or not UTF-8",
        "big.md: oversized: 2000 bytes (the limit is 1000)", "bad.jsonl:2: not JSON",
        "bad.jsonl:3: expected an object with a non-empty 'text'", "gone.md: unreadable",
    ):  # fmt: skip
        assert expected in message
    assert "good.md" not in message and "notes.pdf" not in message
    assert "8 document(s) cannot be indexed" in message
    assert not (tmp_path / "index").exists()


def test_a_folder_without_documents_is_refused(tmp_path, embedder_dir):
    docs = write_corpus(tmp_path / "docs", {"notes.pdf": b"%PDF", ".hidden.md": "# Hidden\n\ntext\n"})
    with pytest.raises(DataError, match="no documents to index"):
        build_index(docs, tmp_path / "index", embedding_model=embedder_dir)


def test_output_is_never_overwritten_by_accident(tmp_path, docs, embedder_dir):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    with pytest.raises(RunDirectoryError, match="not empty"):
        build_index(docs, output, embedding_model=embedder_dir)
    with pytest.raises(RunDirectoryError, match="not an index"):
        build_index(docs, output, embedding_model=embedder_dir, overwrite=True)
    assert (output / "keep.txt").read_text() == "mine"
    with pytest.raises(RunDirectoryError, match="overlaps"):
        build_index(docs, docs / "index", embedding_model=embedder_dir)
    with pytest.raises(ConfigError) as caught:
        build_index(docs, tmp_path / "x", chunk_tokens=16, overlap=16, store="faiss", embedding_model=embedder_dir)
    assert "overlap" in str(caught.value) and "store: 'faiss'" in str(caught.value)
    first = build_index(docs, tmp_path / "idx", embedding_model=embedder_dir)
    first.close()
    build_index(
        docs, tmp_path / "idx", embedding_model=embedder_dir, overwrite=True, chunk_tokens=16, overlap=4
    ).close()
    assert open_index(tmp_path / "idx").manifest["chunking"]["chunk_tokens"] == 16


def test_unknown_embedding_models_are_named(tmp_path, docs):
    from polyadapt.retrieval import RetrievalError

    with pytest.raises(RetrievalError, match="not in the local Hugging Face cache"):
        build_index(docs, tmp_path / "a", embedding_model="nobody/no-such-model")
    (tmp_path / "half").mkdir()
    with pytest.raises(RetrievalError, match="no tokenizer.json"):
        build_index(docs, tmp_path / "b", embedding_model=tmp_path / "half")


# -- stores ----------------------------------------------------------------------------------------------------------
def test_qdrant_local_mode_gives_the_same_dense_ranking_as_lancedb(tmp_path, docs, embedder_dir, built):
    qdrant = build_index(docs, tmp_path / "qdrant-index", embedding_model=embedder_dir, store="qdrant")
    lance = open_index(built)
    try:
        assert (tmp_path / "qdrant-index" / "qdrant").is_dir()
        assert qdrant.manifest["store"]["kind"] == "qdrant"
        for query in ("overdraft fee", "replacement card", "branch hours", "savings"):
            one = qdrant.search(query, top_k=5, mode="dense")
            two = lance.search(query, top_k=5, mode="dense")
            assert [h.chunk_id for h in one] == [h.chunk_id for h in two]
            assert [h.score for h in one] == pytest.approx([h.score for h in two], abs=1e-5)
    finally:
        qdrant.close()
        lance.close()


# -- the command line ------------------------------------------------------------------------------------------------
def test_cli_build_and_search_exit_codes(tmp_path, docs, embedder_dir, monkeypatch):
    from click.testing import CliRunner

    monkeypatch.setenv("POLYADAPT_CACHE", str(tmp_path / "cache"))

    from polyadapt.cli import cli

    runner = CliRunner()
    output = tmp_path / "cli-index"
    args = ["index", "build", str(docs), "--output", str(output), "--embedding-model", str(embedder_dir)]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "4 document(s), 7 chunk(s)" in result.output
    result = runner.invoke(cli, ["index", "search", str(output), "overdraft fee", "--top-k", "2", "--mode", "bm25"])
    assert result.exit_code == 0 and "1. " in result.output and "fees.md#overdraft" in result.output
    result = runner.invoke(cli, ["index", "search", str(output), "overdraft fee", "--json"])
    assert result.exit_code == 0
    rows = json.loads(result.output)
    assert len(rows) == 4 and {"rank", "score", "citation", "source", "heading", "start", "end", "text"} <= set(rows[0])
    assert runner.invoke(cli, args).exit_code == 2  # exists, no --overwrite
    assert runner.invoke(cli, [*args, "--overwrite"]).exit_code == 0
    bad = write_corpus(tmp_path / "bad", {"empty.md": ""})
    result = runner.invoke(cli, ["index", "build", str(bad), "--output", str(tmp_path / "x"),
                                 "--embedding-model", str(embedder_dir)])  # fmt: skip
    assert result.exit_code == 2 and "empty.md: empty" in result.output
    result = runner.invoke(cli, ["index", "search", str(tmp_path / "nowhere"), "q"])
    assert result.exit_code == 2 and "does not exist" in result.output
    assert runner.invoke(cli, ["index", "show", str(output)]).exit_code == 0
    registry = ["--registry", str(tmp_path / "registry")]
    result = runner.invoke(cli, ["registry", "push", str(output), "--name", "policies", *registry])
    assert result.exit_code == 0 and result.output.strip() == "policies@v1"
    result = runner.invoke(cli, ["registry", "push", str(output), "--name", "policies", *registry])
    assert result.exit_code == 0 and "holds the same index files" in result.output
    result = runner.invoke(cli, ["index", "search", "policies@v1", "overdraft", "--mode", "bm25", *registry])
    assert result.exit_code == 0 and "fees.md#overdraft" in result.output


# -- the real model --------------------------------------------------------------------------------------------------
def test_minilm_from_the_zip_finds_policy_answers(tmp_path):
    pytest.importorskip("tokenizers")
    from polyadapt.retrieval.embedding import default_model_zip

    try:
        default_model_zip()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(str(exc))
    index = build_index(POLICIES / "policies_v1", tmp_path / "index")
    assert index.manifest["embedding"]["reference"] == "all-MiniLM-L6-v2"
    assert index.manifest["embedding"]["dimension"] == 384
    vectors = index.embedder.encode(["What does an overdraft cost?", "overdraft fee", "branch opening hours"])
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert float(vectors[0] @ vectors[1]) > float(vectors[0] @ vectors[2])
    hits = index.search("How much is charged when my balance goes negative and you pay the item?", mode="dense")
    assert "overdraft.md#overdraft-fee" in [h.citation for h in hits]
