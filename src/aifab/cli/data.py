"""`aifab ingest`, `aifab datasets [NAME]`, `aifab datasets show|export`: the data line from the shell."""

import json
from pathlib import Path
from typing import Any

import typer
from sqlalchemy import select
from typer.core import TyperGroup

from aifab.cli.common import app, data_sources, open_store, out
from aifab.cli.tables import Column, Kind, Listing, count, size, when
from aifab.errors import AifabError, NotFound
from aifab.spec import FactorySpec, load_spec
from aifab.store import Store
from aifab.store.names import check_name
from aifab.store.schema import DatasetVersion


class _NameOrCommand(TyperGroup):
    """`aifab datasets NAME` lists one dataset, while `aifab datasets export ...` runs a subcommand."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:  # ctx: typer's vendored click Context
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            ctx.meta["aifab.dataset_name"] = args[0]
            args = args[1:]
        return super().parse_args(ctx, args)


datasets_app = typer.Typer(cls=_NameOrCommand, help="Dataset versions: list, show, export.")
app.add_typer(datasets_app, name="datasets")


@app.command()
def ingest(
    paths: list[str] = typer.Argument(
        ..., help="Directories, files or globs (.py .md .txt .jsonl .csv .parquet, optionally .gz or .zst)."
    ),
    name: str = typer.Option(..., "--name", "-n", help="Dataset name; each run adds a version."),
    config: Path | None = typer.Option(None, "--config", "-c", help="A factory.yaml for data/tokenizer settings."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip and count malformed records instead of failing."),
    executor: str = typer.Option(
        "local",
        "--executor",
        "--engine",
        help="local (worker processes) or ray (Ray Data on RAY_ADDRESS, or a local Ray); --engine is its old name.",
    ),
    tokenizer_from: str | None = typer.Option(
        None,
        "--tokenizer-from",
        metavar="MODEL",
        help="Tokenize with this model's tokenizer, to fine-tune it.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on the last line."),
) -> None:
    """Read, curate, deduplicate and tokenize PATHS into a new version of dataset NAME."""
    from aifab.data.ingest import ingest as run_ingest

    check_name(name, "dataset name")
    spec = load_spec(config) if config is not None else FactorySpec()
    data = spec.data.model_copy(update={"sources": data_sources(paths), "skip_bad": skip_bad or spec.data.skip_bad})
    result = run_ingest(open_store(), name, data, spec.tokenizer, executor=executor, tokenizer_from=tokenizer_from)
    parent = f" (parent {name}:{result.parent_version})" if result.parent_version else ""
    out.print(
        f"[bold]{name}:{result.version}[/bold]{parent}: {result.files:,} files ({result.processed_files:,} "
        f"processed, {result.reused_files:,} reused), {result.documents:,} documents, {result.tokens:,} tokens "
        f"in {result.elapsed_s:.1f} s"
    )
    out.print(stage_table(result.stages))
    if as_json:
        from dataclasses import asdict

        print(json.dumps(asdict(result)))


@datasets_app.callback(invoke_without_command=True)
def datasets(ctx: typer.Context) -> None:
    """List dataset versions with their counts (`aifab datasets NAME` for one dataset)."""
    if ctx.invoked_subcommand is not None:
        return
    name = ctx.meta.get("aifab.dataset_name")
    store = open_store()
    table = Listing(
        Column("dataset", Kind.ID),
        Column("parent", Kind.ID),
        *(Column(h, Kind.NUMBER) for h in ("files", "size", "docs", "tokens", "train", "val")),
        Column("created"),
    )
    with store.db.session() as s:
        q = select(DatasetVersion).order_by(DatasetVersion.name, DatasetVersion.version)
        rows = list(s.scalars(q if name is None else q.where(DatasetVersion.name == name)))
        parents = {r.id: f"{r.name}:{r.version}" for r in s.scalars(select(DatasetVersion))}
    if name is not None and not rows:
        raise NotFound(f"unknown dataset {name!r} (see `aifab datasets`)")
    for d in rows:
        table.add_row(
            f"{d.name}:{d.version}",
            parents.get(d.parent_id or -1, "-"),
            count(d.files),
            size(d.bytes),
            count(d.documents),
            count(d.tokens),
            count(d.train_tokens),
            count(d.val_tokens),
            when(d.created_at),
        )
    out.print(table)


@datasets_app.command("show")
def show(
    ref: str = typer.Argument(..., help="NAME or NAME:VERSION"), as_json: bool = typer.Option(False, "--json")
) -> None:
    """One dataset version with its per-stage curation report."""
    d = resolve_dataset(open_store(), ref)
    body = {
        "name": d.name,
        "version": d.version,
        "files": d.files,
        "bytes": d.bytes,
        "documents": d.documents,
        "tokens": d.tokens,
        "train_tokens": d.train_tokens,
        "val_tokens": d.val_tokens,
        "manifest_digest": d.manifest_digest,
        "tokenizer_digest": d.tokenizer_digest,
        "curated_digest": d.curated_digest,
        "stages": d.stages or {},
        "created_at": str(d.created_at),
    }
    if as_json:
        print(json.dumps(body))
        return
    out.print(f"[bold]{d.name}:{d.version}[/bold]: {d.files:,} files, {d.documents:,} documents, {d.tokens:,} tokens")
    out.print(stage_table(d.stages or {}))


@datasets_app.command("export")
def export(
    ref: str = typer.Argument(..., help="NAME or NAME:VERSION"),
    dest: Path = typer.Argument(..., help="Output .jsonl file (one curated document per line, with provenance)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Write a version's curated documents as JSONL: text, source, offset, source_sha256."""
    from aifab.data.parts import iter_docs

    store = open_store()
    d = resolve_dataset(store, ref)
    if d.curated_digest is None:
        raise AifabError(f"{d.name}:{d.version} was made before curated documents were stored; re-ingest it")
    if dest.exists() and not force:
        raise AifabError(f"{dest} already exists; pass --force to overwrite it")
    tmp = dest.with_name(f".{dest.name}.partial")
    n = 0
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for doc in iter_docs(store.artifacts, d.curated_digest):
                f.write(
                    json.dumps(
                        {
                            "text": doc.text,
                            "source": doc.source,
                            "offset": doc.offset,
                            "source_sha256": doc.source_sha256,
                        },
                        ensure_ascii=False,
                    )
                    + "\n"
                )
                n += 1
        tmp.replace(dest)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise AifabError(f"cannot write {dest}: {e.strerror}") from None
    out.print(f"wrote {n:,} documents of {d.name}:{d.version} to {dest}")


def resolve_dataset(store: Store, ref: str) -> DatasetVersion:
    from aifab.store.datasets import resolve_dataset as resolve

    return resolve(store.db, ref)


def stage_table(stages: dict[str, Any]) -> Listing:
    table = Listing(
        Column("stage", Kind.ID),
        *(Column(h, Kind.NUMBER) for h in ("docs in", "docs out", "bytes\nremoved")),
        Column("reasons"),
    )
    read = stages.get("read")
    if read:
        skipped = ", ".join(f"{r} {n:,}" for r, n in sorted(read["skipped"].items())) or "-"
        table.add_row("read", f"{read['files']:,} files", f"{read['documents']:,}", "-", f"skipped: {skipped}")
    for name, c in stages.items():
        if name != "read":
            reasons = ", ".join(f"{r} {n:,}" for r, n in sorted(c["reasons"].items())) or "-"
            table.add_row(name, f"{c['docs_in']:,}", f"{c['docs_out']:,}", f"{c['bytes_removed']:,}", reasons)
    return table
