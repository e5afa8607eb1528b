"""Prompt/answer rows of prepared TensorFlow Datasets (``--task=tfds:NAME[/CONFIG][:SPLIT]``).

Datasets are read through ``tfds.data_source`` (array_record files), so neither TensorFlow nor a
download is needed: the dataset must already be prepared in the data folder (``tfds build`` /
``builder.download_and_prepare(file_format="array_record")``, on any machine).
Requires ``pip install 'rftjax[tfds]'``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from rftjax.tasks.base import DEFAULT_EVAL_SIZE
from rftjax.tasks.jsonl import JsonlTask, split_rows
from rftjax.tasks.text import answer_text
from rftjax.tasks.verify import ANSWER_FORMATS

TFDS_PREFIX = "tfds:"
# Held-out splits tried in order when the training split is not one of them.
EVAL_SPLITS = ("test", "validation")
_DEFAULT_SPLIT = "train"


def parse_spec(spec: str) -> tuple[str, str]:
    """``"NAME[/CONFIG][:SPLIT]"`` -> ``("NAME[/CONFIG]", SPLIT or "train")``.

    Raises:
      ValueError: for an empty name or split, or more than one ``/`` or ``:``.
    """
    dataset, colon, split = spec.partition(":")
    if colon and not split:
        raise ValueError(f"tfds:{spec}: empty split after ':'; e.g. tfds:gsm8k:train")
    if not dataset or dataset.count("/") > 1 or ":" in split or "" in dataset.split("/"):
        raise ValueError(f"tfds:{spec}: expected tfds:NAME[/CONFIG][:SPLIT], e.g. tfds:gsm8k/main")
    return dataset, split or _DEFAULT_SPLIT


def data_dir_of(data_dir: str | None) -> Path:
    """The data folder: ``data_dir``, else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``."""
    chosen = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    return Path(chosen).expanduser()


def prepared_datasets(data_dir: Path) -> list[str]:
    """``NAME`` or ``NAME/CONFIG`` of every prepared dataset (a ``dataset_info.json``) found
    under ``data_dir``: ``NAME/VERSION/`` or ``NAME/CONFIG/VERSION/``."""
    found = set()
    for depth in ("*/*/dataset_info.json", "*/*/*/dataset_info.json"):
        for info in data_dir.glob(depth):
            found.add("/".join(info.relative_to(data_dir).parts[:-2]))
    return sorted(found)


def _builder(dataset: str, data_dir: Path):
    import tensorflow_datasets as tfds

    def missing() -> ValueError:
        return ValueError(
            f"tfds:{dataset}: not prepared in {data_dir} (nothing is downloaded); "
            f"prepared datasets there: {prepared_datasets(data_dir) or 'none'}"
        )

    try:
        builder = tfds.builder(dataset, data_dir=str(data_dir))
    except tfds.core.registered.DatasetNotFoundError as e:
        raise missing() from e
    if not builder.is_prepared():
        raise missing()
    return builder


def _column(rows: list[dict], field: str) -> list:
    values = [row[field] for row in rows]
    return [v.decode("utf-8") if isinstance(v, bytes) else v for v in values]


def read_split(
    builder, split: str, prompt_field: str, answer_field: str
) -> tuple[list[str], list[str]]:
    """``(prompts, answers)`` of one split of a prepared builder, read via array_record."""
    where = f"tfds:{builder.info.full_name}:{split}"
    try:
        source = builder.as_data_source(split=split)
    except NotImplementedError as e:  # prepared as tfrecord: reading it would need TensorFlow
        raise ValueError(
            f"{where}: prepared as {builder.info.file_format.value}; tfds: tasks read "
            "array_record (prepare with file_format='array_record')"
        ) from e
    rows = source.__getitems__(list(range(len(source))))
    if not rows:
        raise ValueError(f"{where}: no rows")
    prompts = _column(rows, prompt_field)
    answers = [answer_text(a.item() if isinstance(a, np.generic) else a) for a in
               _column(rows, answer_field)]  # fmt: skip
    for row, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        if not isinstance(prompt, str):
            raise ValueError(f"{where}: row {row}: field {prompt_field!r} must be text")
        if answer is None:
            raise ValueError(f"{where}: row {row}: field {answer_field!r} must be text or a number")
    return prompts, answers


Rows = tuple[list[str], list[str]]


def read_tfds(
    spec: str,
    *,
    data_dir: str | None = None,
    prompt_field: str = "prompt",
    answer_field: str = "answer",
) -> tuple[Rows, Rows | None, str | None]:
    """Rows of ``tfds:spec``: ``(train, heldout, heldout_split)``, each rows ``(prompts, answers)``.

    ``heldout`` is the first of ``EVAL_SPLITS`` that the dataset has, other than the training
    split, and ``heldout_split`` its name; both are None when there is none (the caller then
    holds out part of the training rows).

    Raises:
      ImportError: without tensorflow-datasets.
      ValueError: naming what exists, for a dataset not prepared in the data folder (the
        prepared ones), a split it lacks (its splits), a field it lacks (its features), a
        dataset prepared in another file format; or for a malformed spec.
    """
    try:
        import tensorflow_datasets  # noqa: F401
    except ImportError as e:
        raise ImportError("tfds: tasks need tensorflow-datasets: pip install 'rftjax[tfds]'") from e
    dataset, split = parse_spec(spec)
    builder = _builder(dataset, data_dir_of(data_dir))
    splits = list(builder.info.splits)
    if split not in splits:
        raise ValueError(f"tfds:{dataset}: no split {split!r}; splits: {splits}")
    features = list(builder.info.features.keys())
    for field in (prompt_field, answer_field):
        if field not in features:
            raise ValueError(f"tfds:{dataset}: no field {field!r}; fields: {features}")
    train = read_split(builder, split, prompt_field, answer_field)
    heldout_split = next((s for s in EVAL_SPLITS if s in splits and s != split), None)
    if heldout_split is None:
        return train, None, None
    return train, read_split(builder, heldout_split, prompt_field, answer_field), heldout_split


class TfdsTask(JsonlTask):
    """Prompts and reference answers of a prepared TFDS dataset, scored on text (`JsonlTask`).

    Training rows come from the named split; held-out rows from its ``test`` (else
    ``validation``) split, training rows with the same prompt text dropped; a dataset with
    neither holds out ``eval_fraction`` of the training split's distinct prompts, as file tasks do.

    Attributes:
      heldout_split: the split evaluated on, or None when part of the training split is.
    """

    def __init__(
        self,
        spec: str,
        *,
        tokenizer,
        seed: int,
        data_dir: str | None = None,
        prompt_field: str = "prompt",
        answer_field: str = "answer",
        answer_format: str = "auto",
        chat_template: str = "auto",
        eval_fraction: float = 0.1,
        split_seed: int = 0,
        eval_size: int = DEFAULT_EVAL_SIZE,
        prompt_len: int | None = None,
        answer_len: int | None = None,
        max_new_tokens: int = 256,
    ) -> None:
        if answer_format not in ANSWER_FORMATS:
            raise ValueError(f"answer_format={answer_format!r}; accepted: {ANSWER_FORMATS}")
        train, held, self.heldout_split = read_tfds(
            spec, data_dir=data_dir, prompt_field=prompt_field, answer_field=answer_field
        )
        if held is None:
            prompts, answers = train
            heldout = split_rows(prompts, eval_fraction, split_seed)
        else:
            seen = set(held[0])
            keep = [i for i, p in enumerate(train[0]) if p not in seen]
            if not keep:
                raise ValueError(f"tfds:{spec}: every training prompt is also held out")
            prompts = [train[0][i] for i in keep] + held[0]
            answers = [train[1][i] for i in keep] + held[1]
            heldout = np.arange(len(prompts)) >= len(keep)
        self.name = f"{TFDS_PREFIX}{spec}"
        self.path = data_dir_of(data_dir)
        self._setup(
            prompts,
            answers,
            heldout,
            tokenizer=tokenizer,
            seed=seed,
            answer_format=answer_format,
            chat_template=chat_template,
            eval_size=eval_size,
            prompt_len=prompt_len,
            answer_len=answer_len,
            max_new_tokens=max_new_tokens,
        )
