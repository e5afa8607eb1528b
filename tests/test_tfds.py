"""`tfds:` tasks on a tiny TensorFlow Datasets dataset built here (array_record, no download,
no TensorFlow): rows, held-out split, errors that name what exists, and one GRPO step."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import small_shapes

tfds = pytest.importorskip("tensorflow_datasets")

from rftjax.tasks import TfdsTask, make_task  # noqa: E402
from rftjax.tasks.tfds import parse_spec, prepared_datasets  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "rftjax_tiny_sums"
TRAIN = [(f"{a}+{b}=", a + b) for a in range(6) for b in range(4)]  # 24 rows
TEST = [(f"{a}+{b}=", a + b) for a in range(6, 9) for b in range(2)] + [("0+0=", 0)]


class TinySums(tfds.core.GeneratorBasedBuilder):
    """Additions: ``question`` text and ``answer`` int64; config ``main`` has a test split
    (one of whose prompts is also in train), ``plain`` only train."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="main"), tfds.core.BuilderConfig(name="plain")]
    name = NAME

    def _info(self):
        features = {"question": tfds.features.Text(), "answer": tfds.features.Scalar(np.int64)}
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        del dl_manager
        splits = {"train": self._generate_examples(TRAIN)}
        if self.builder_config.name == "main":
            splits["test"] = self._generate_examples(TEST)
        return splits

    def _generate_examples(self, rows):
        for i, (question, answer) in enumerate(rows):
            yield i, {"question": question, "answer": answer}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    for config in ("main", "plain"):
        TinySums(
            data_dir=str(root), config=config, file_format="array_record"
        ).download_and_prepare()
    return str(root)


def _task(data_dir, spec, **kw):
    return make_task(f"tfds:{spec}", seed=0, tfds_data_dir=data_dir, prompt_field="question", **kw)


def _prompts(task, batch):
    """Prompt texts of a batch (BOS dropped)."""
    rows = [row[m == 1] for row, m in zip(batch.prompts, batch.prompt_mask, strict=True)]
    assert all(row[0] == task.tokenizer.bos_token_id for row in rows)
    return [task.tokenizer.decode(row[1:].tolist()) for row in rows]


def test_parse_spec():
    assert parse_spec("gsm8k") == ("gsm8k", "train")
    assert parse_spec("gsm8k/main:test") == ("gsm8k/main", "test")
    for bad in ("", "a/b/c", "a:", "a:b:c", "/main"):
        with pytest.raises(ValueError, match="tfds:"):
            parse_spec(bad)


def test_rows_and_the_test_split_held_out(data_dir):
    task = _task(data_dir, f"{NAME}/main")
    assert isinstance(task, TfdsTask) and task.heldout_split == "test"
    assert task.answer_format == "gsm8k"  # detected: every answer is a number
    ev = task.eval_batch()
    assert sorted(zip(_prompts(task, ev), ev.answer_text, strict=True)) == sorted(
        (q, str(a)) for q, a in TEST
    )
    # Training rows: the train split less the prompt the test split also has.
    expected = {(q, str(a)) for q, a in TRAIN if q != "0+0="}
    seen = set()
    for step in range(4):
        batch = task.train_batch(step, 23)
        seen |= set(zip(_prompts(task, batch), batch.answer_text, strict=True))
    assert seen == expected
    out = task.text_reward(["#### " + t for t in ev.answer_text], ev.answer_text)
    assert out["reward"].tolist() == [1.0] * len(TEST)
    assert "tensorflow" not in sys.modules  # array_record reading needs no TensorFlow


def test_without_a_test_split_part_of_train_is_held_out(data_dir):
    task = _task(data_dir, f"{NAME}/plain:train", eval_fraction=0.25)
    assert task.heldout_split is None
    held = set(_prompts(task, task.eval_batch()))
    assert len(held) == 6 and held <= {q for q, _ in TRAIN}
    assert not held & set(task.train_prompts)
    assert len(task.train_prompts) == 18


def test_errors_name_what_exists(data_dir, monkeypatch):
    with pytest.raises(ValueError, match=rf"not prepared.*{NAME}/main.*{NAME}/plain"):
        _task(data_dir, "gsm8k/main")
    with pytest.raises(ValueError, match=r"no split 'validation'.*\['train', 'test'\]"):
        _task(data_dir, f"{NAME}/main:validation")
    with pytest.raises(ValueError, match=r"no field 'prompt'; fields: \['question', 'answer'\]"):
        make_task(f"tfds:{NAME}/main", seed=0, tfds_data_dir=data_dir)
    with pytest.raises(ValueError, match="tfds_data_dir applies to tfds: tasks"):
        make_task("jsonl:x.jsonl", seed=0, tfds_data_dir=data_dir)
    monkeypatch.setenv("TFDS_DATA_DIR", data_dir)  # tensorflow-datasets' own variable
    assert make_task(f"tfds:{NAME}/main", seed=0, prompt_field="question").heldout_split
    assert prepared_datasets(pathlib.Path(data_dir)) == [
        f"{NAME}/main",
        f"{NAME}/plain",
    ]


def test_launch_train_one_grpo_step(data_dir, tmp_path):
    """The flags end to end, in a process that never defined the builder (read-only)."""
    workdir = str(tmp_path / "run")
    proc = subprocess.run(
        [
            sys.executable, "-m", "launch.train", f"--workdir={workdir}", "--steps=1",
            f"--task=tfds:{NAME}/main", f"--tfds_data_dir={data_dir}",
            "--prompt_field=question", "--answer_field=answer", "--answer_format=gsm8k",
            *small_shapes.RUN_FLAGS, "--warmup_steps=1", "--warmup_batch_size=4",
            "--eval_size=8", "--eval_every=1", "--checkpoint_every=1", "--max_new_tokens=4",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [1]
    assert np.isfinite(records[0]["loss"]) and "reward_mean" in records[0]
    assert "eval_accuracy" in records[0]
