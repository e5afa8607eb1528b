"""File datasets: Parquet and JSONL loading with field names, answer formats, chat templates."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from rftjax import tokenizer as tk
from rftjax.config import DEFAULT_WARMUP_STEPS, TrainConfig
from rftjax.tasks import JsonlTask, make_task, text
from rftjax.tasks.verify import (
    detect_answer_format,
    last_boxed,
    math_equal,
    math_reward,
    normalize_math,
)

needs_pyarrow = pytest.mark.skipif(
    importlib.util.find_spec("pyarrow") is None,
    reason="Parquet tasks need pyarrow: pip install 'rftjax[data]' (the test extra has it)",
)
BOS, EOS, PAD = tk.BOS_ID, tk.EOS_ID, tk.PAD_ID
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}q: {{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %} a: {% endif %}"
)


def ids(s: str) -> list[int]:
    return [tk.VOCAB[c] for c in s]


def gsm8k_rows(n: int) -> dict[str, list]:
    return {
        "question": [f"what is {i} plus {i}" for i in range(n)],
        "answer": [f"{i} plus {i} is {2 * i}. #### {2 * i}" for i in range(n)],
        "extra": list(range(n)),
    }


def write_parquet(path, columns: dict[str, list]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


# --- Parquet -----------------------------------------------------------------------------


@needs_pyarrow
def test_parquet_task_with_field_names(tmp_path):
    path = write_parquet(tmp_path / "train.parquet", gsm8k_rows(20))
    task = make_task(
        f"parquet:{path}", seed=0, prompt_field="question", answer_field="answer", eval_size=8
    )
    assert isinstance(task, JsonlTask) and task.name == f"parquet:{path}"
    assert task.answer_format == "gsm8k" and len(task.train_prompts) == 18
    batch = task.train_batch(0, 4)
    prompt = [t for t in batch.prompts[0].tolist() if t != PAD]
    assert prompt[0] == BOS and tk.char_tokenizer().decode(prompt[1:]) in task.train_prompts
    assert batch.answers[0, len(batch.answer_text[0])] == EOS
    # The reward reads the final number of the reference's "#### N".
    responses = [f"so #### {a.split('#### ')[1]}" for a in batch.answer_text]
    assert task.text_reward(responses, batch.answer_text)["correct"].tolist() == [1] * 4
    assert task.text_reward(["#### 999"] * 4, batch.answer_text)["correct"].tolist() == [0] * 4


@needs_pyarrow
def test_parquet_folder_of_shards_reads_in_name_order(tmp_path):
    rows = gsm8k_rows(12)
    half = {k: v[:6] for k, v in rows.items()}, {k: v[6:] for k, v in rows.items()}
    write_parquet(tmp_path / "train-00001.parquet", half[1])
    write_parquet(tmp_path / "train-00000.parquet", half[0])
    task = make_task(f"parquet:{tmp_path}", seed=0, prompt_field="question", split_seed=3)
    tok = tk.char_tokenizer()
    held_out = [tok.decode([t for t in row if t > BOS]) for row in task.eval_batch().prompts]
    everything = task.train_prompts + held_out
    assert sorted(everything) == sorted(rows["question"])


@needs_pyarrow
def test_parquet_errors_name_the_file_row_and_columns(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", gsm8k_rows(4))
    with pytest.raises(ValueError, match=r"d\.parquet: missing column 'prompt'.*'question'"):
        make_task(f"parquet:{path}", seed=0)
    bad = write_parquet(tmp_path / "bad.parquet", {"prompt": ["a", None], "answer": ["1", "2"]})
    with pytest.raises(ValueError, match=r"bad\.parquet: row 1: column 'prompt' must be a string"):
        make_task(f"parquet:{bad}", seed=0)
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"junk\.parquet: not a readable Parquet file"):
        make_task(f"parquet:{junk}", seed=0)
    empty = write_parquet(tmp_path / "empty.parquet", {"prompt": [], "answer": []})
    with pytest.raises(ValueError, match="no rows"):
        make_task(f"parquet:{empty}", seed=0)
    with pytest.raises(FileNotFoundError, match="no such Parquet file"):
        make_task(f"parquet:{tmp_path / 'absent.parquet'}", seed=0)


# --- answer formats ----------------------------------------------------------------------


def test_last_boxed_balances_braces():
    assert last_boxed(r"first \boxed{1} then \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert last_boxed(r"$\boxed 7$") == "7"
    assert last_boxed(r"\fbox{x^{2}}") == "x^{2}"
    assert last_boxed(r"\boxed{unclosed") is None and last_boxed("no box") is None


@pytest.mark.parametrize(
    "found,target,equal",
    [
        (r"\dfrac{1}{2}", r"\frac12", True),
        ("0.5", r"\frac{1}{2}", True),
        ("3/4", "0.75", True),
        ("x = 5", "5", True),
        (r"10\%", "10", True),
        (r"90^\circ", "90", True),
        ("1,000", "1000", True),
        (r"\text{(B)}", "(B)", True),
        (r"\left( 1, 2 \right)", "(1,2)", True),
        ("1,2", "12", False),
        (r"\frac{1}{3}", "0.33", False),
        (r"\sqrt{2}", r"\sqrt{3}", False),
        (None, "1", False),
    ],
)
def test_math_equal(found, target, equal):
    assert math_equal(found, target) is equal


def test_math_reward_and_format_detection():
    out = math_reward(
        [r"so \boxed{\dfrac{1}{2}}", r"it is 1/2", r"\boxed{4}"],
        [r"\frac{1}{2}", r"\frac{1}{2}", r"... hence \boxed{5}."],
    )
    assert out["correct"].tolist() == [1, 0, 0] and out["format"].tolist() == [1, 0, 1]
    assert detect_answer_format(["12", "x #### 3", "1,000"]) == "gsm8k"
    assert detect_answer_format(["12", r"\frac{1}{2}"]) == "math"
    assert detect_answer_format([r"so \boxed{3}"]) == "math"
    assert normalize_math(r" \$1,000.\ ") == "1000"


def test_jsonl_math_task_detects_and_can_be_forced(tmp_path):
    rows = [
        {"problem": f"p{i}", "solution": rf"thus \boxed{{\frac{{{i}}}{{2}}}}"} for i in range(10)
    ]
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    name = f"jsonl:{path}"
    task = make_task(name, seed=0, prompt_field="problem", answer_field="solution")
    assert task.answer_format == "math"
    ev = task.eval_batch()
    value = last_boxed(ev.answer_text[0])
    assert task.text_reward([rf"\boxed{{{value}}}"], ev.answer_text[:1])["reward"].tolist() == [1]
    forced = make_task(
        name, seed=0, prompt_field="problem", answer_field="solution", answer_format="gsm8k"
    )
    assert forced.answer_format == "gsm8k"
    with pytest.raises(ValueError, match="answer_format='latex'"):
        make_task(name, seed=0, prompt_field="problem", answer_format="latex")


# --- chat templates and BOS --------------------------------------------------------------


def _jsonl(tmp_path, n=6):
    path = tmp_path / "d.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"{i}+1", "answer": i + 1}) + "\n" for i in range(n))
    )
    return f"jsonl:{path}"


def _first_prompt(task) -> list[int]:
    return [t for t in task.eval_batch().prompts[0].tolist() if t != PAD]


def test_chat_template_renders_prompts_without_a_second_bos(tmp_path):
    name = _jsonl(tmp_path)
    tok = tk.char_tokenizer()
    tok.chat_template = TEMPLATE
    plain = _first_prompt(make_task(name, seed=0, tokenizer=tok, chat_template="none"))
    chat = _first_prompt(make_task(name, seed=0, tokenizer=tok))
    assert plain[0] == BOS and plain[1:] == ids(tok.decode(plain[1:]))
    question = tok.decode(plain[1:])
    assert chat == [BOS, *ids(f"q: {question} a: ")]  # the template's BOS, not a second one
    no_template = _first_prompt(make_task(name, seed=0, tokenizer=tk.char_tokenizer()))
    assert no_template == plain


def test_tokenizer_without_bos_gets_no_bos(tmp_path):
    tok = tk.char_tokenizer()
    tok.bos_token = None  # like Qwen2's tokenizer
    task = make_task(_jsonl(tmp_path), seed=0, tokenizer=tok)
    prompt = _first_prompt(task)
    assert BOS not in prompt and task.prompt_len == max(len(f"{i}+1") for i in range(6))
    response = np.array([ids("12") + [EOS, PAD], ids("7") + [PAD] * 3])
    assert task.decode_responses(response) == ["12", "7"]
    prompts, mask = text.encode_prompts(tok, ["1+1"], 5)
    assert prompts.tolist() == [[PAD, PAD, *ids("1+1")]] and mask.tolist() == [[0, 0, 1, 1, 1]]
    with pytest.raises(ValueError, match="needs 3 tokens > prompt_len=2"):
        text.encode_prompts(tok, ["1+1"], 2)


def test_render_prompts_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="chat_template='always'"):
        text.render_prompts(tk.char_tokenizer(), ["a"], "always")


# --- registry and run configuration ------------------------------------------------------


def test_built_in_tasks_refuse_a_foreign_tokenizer_and_file_options(tmp_path):
    foreign = tk.char_tokenizer()
    foreign.add_tokens(["<|im_start|>"])  # any other vocabulary
    with pytest.raises(ValueError, match="needs a file task"):
        make_task("arith", seed=0, tokenizer=foreign)
    assert make_task("sort", seed=0, tokenizer=tk.char_tokenizer()).name == "sort"
    with pytest.raises(ValueError, match="prompt_field='question' applies to file tasks"):
        make_task("sort", seed=0, prompt_field="question")
    assert make_task("arith", seed=0, digits=1, **TrainConfig(workdir="w").task_options())


def test_warmup_default_depends_on_the_model_and_options_are_checked(tmp_path):
    assert TrainConfig(workdir="w").warmup_steps == DEFAULT_WARMUP_STEPS
    assert TrainConfig(workdir="w", model=str(tmp_path)).warmup_steps == 0
    assert TrainConfig(workdir="w", model=str(tmp_path), warmup_steps=5).warmup_steps == 5
    with pytest.raises(ValueError, match="chat_template='yes'.*auto, none"):
        TrainConfig(workdir="w", chat_template="yes")
    with pytest.raises(ValueError, match="answer_format='boxed'.*auto, gsm8k, math"):
        TrainConfig(workdir="w", answer_format="boxed")
