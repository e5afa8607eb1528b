"""Prompt/answer rows from Parquet files (e.g. the Hugging Face Hub's GSM8K and MATH exports)."""

from __future__ import annotations

from pathlib import Path

from rftjax.tasks.text import answer_text


def parquet_files(path: str | Path) -> list[Path]:
    """``path`` itself, or the ``*.parquet`` files of a folder in name order (shards)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"{path}: folder holds no *.parquet files")
        return files
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such Parquet file")
    return [path]


def _columns(file: Path, prompt_field: str, answer_field: str) -> tuple[list, list]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(file).names
        for field in (prompt_field, answer_field):
            if field not in names:
                raise ValueError(f"{file}: missing column {field!r}; columns present: {names}")
        table = pq.read_table(file, columns=[prompt_field, answer_field])
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{file}: not a readable Parquet file ({e})") from e
    return table.column(prompt_field).to_pylist(), table.column(answer_field).to_pylist()


def read_parquet(
    path: str | Path, prompt_field: str = "prompt", answer_field: str = "answer"
) -> tuple[list[str], list[str]]:
    """Reads ``(prompts, answers)`` from a Parquet file or a folder of Parquet shards.

    Only the two columns are read. Requires pyarrow (``pip install 'rftjax[data]'``).

    Raises:
      ValueError: naming the file (and row) for an unreadable file, a missing column (with the
        columns present), a value of the wrong type, or no rows at all.
      FileNotFoundError: for a missing file or a folder without Parquet files.
    """
    try:
        import pyarrow  # noqa: F401
    except ImportError as e:
        raise ImportError("parquet: tasks need pyarrow: pip install 'rftjax[data]'") from e
    prompts, answers = [], []
    for file in parquet_files(path):
        column_p, column_a = _columns(file, prompt_field, answer_field)
        for row, (prompt, raw) in enumerate(zip(column_p, column_a, strict=True)):
            answer = answer_text(raw)
            if not isinstance(prompt, str):
                raise ValueError(f"{file}: row {row}: column {prompt_field!r} must be a string")
            if answer is None:
                raise ValueError(
                    f"{file}: row {row}: column {answer_field!r} must be a string or number"
                )
            prompts.append(prompt)
            answers.append(answer)
    if not prompts:
        raise ValueError(f"{path}: no rows (the Parquet data is empty)")
    return prompts, answers
