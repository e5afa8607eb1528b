"""Tests of the character tokenizer, the task protocol, built-in tasks and text verification."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rftjax import tokenizer as tk
from rftjax.tasks import ArithTask, JsonlTask, SortTask, encode_answers, encode_prompts, make_task
from rftjax.tasks.verify import extract_final_number, gsm8k_reward, numbers_equal

PAD, BOS, EOS = tk.PAD_ID, tk.BOS_ID, tk.EOS_ID


@pytest.fixture(scope="module")
def tok():
    return tk.char_tokenizer()


def ids(text: str) -> list[int]:
    """Token ids of ``text`` under the fixed character vocabulary."""
    return [tk.VOCAB[c] for c in text]


def response(rows: list[list[int]], width: int) -> np.ndarray:
    """int32 ``[B, width]`` responses right-padded with pad."""
    out = np.full((len(rows), width), PAD, np.int32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


# --- tokenizer ---------------------------------------------------------------------------


def test_tokenizer_special_ids_and_size(tok):
    specials = ["<pad>", "<bos>", "<eos>", "<unk>", "<call>", "</call>", "<result>", "</result>"]
    assert [tok.convert_tokens_to_ids(t) for t in specials] == list(range(8))
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert (tk.PAD_ID, tk.BOS_ID, tk.EOS_ID) == (0, 1, 2)
    assert tk.VOCAB_SIZE == len(tok) <= 64
    assert tok.convert_tokens_to_ids("0") == 8 and tok.convert_tokens_to_ids("a") == 30
    assert tok.convert_tokens_to_ids(" ") == 26 and tok.convert_tokens_to_ids("z") == 55


def test_tokenizer_round_trip(tok):
    text = tk.CHARACTERS + "  a  b 1+2=3 " + tk.CHARACTERS[::-1]
    encoded = tok.encode(text)
    assert encoded == ids(text)  # one token per character, nothing added
    assert tok.decode(encoded) == text
    assert tok("12", add_special_tokens=True)["input_ids"] == ids("12")


def test_tokenizer_specials_not_split_and_unknown(tok):
    assert tok.encode("<call>1+1</call>") == [4, *ids("1+1"), 5]
    assert tok.encode("A$") == [tk.UNK_ID, tk.UNK_ID]
    assert tok.decode([6, *ids("7"), 7]) == "<result>7</result>"


# --- encoding helpers ---------------------------------------------------------------------


def test_encode_prompts_left_pads(tok):
    prompts, mask = encode_prompts(tok, ["1+2=", "10+20="], 8)
    assert prompts.dtype == np.int32 and prompts.shape == (2, 8)
    assert prompts[0].tolist() == [PAD, PAD, PAD, BOS, *ids("1+2=")]
    assert prompts[1].tolist() == [PAD, BOS, *ids("10+20=")]
    assert mask.tolist() == [[0, 0, 0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1, 1]]
    with pytest.raises(ValueError, match="123456789"):
        encode_prompts(tok, ["123456789"], 8)


def test_encode_answers_right_pads(tok):
    answers = encode_answers(tok, ["3", "30"], 4)
    assert answers.tolist() == [[*ids("3"), EOS, PAD, PAD], [*ids("30"), EOS, PAD]]
    with pytest.raises(ValueError, match="12345"):
        encode_answers(tok, ["12345"], 4)
    assert encode_answers(tok, ["12345"], 4, truncate=True).tolist() == [ids("1234")]


# --- arith --------------------------------------------------------------------------------


def decoded_prompts(task, batch) -> list[str]:
    rows = [row[m == 1] for row, m in zip(batch.prompts, batch.prompt_mask, strict=True)]
    assert all(row[0] == BOS for row in rows)
    return [task.tokenizer.decode(row[1:].tolist()) for row in rows]


def test_arith_prompts_and_answers_are_sums():
    task = ArithTask(seed=0)
    batch = task.train_batch(3, 256)
    assert batch.prompts.shape == (256, task.prompt_len)
    assert batch.answers.shape == (256, task.answer_len)
    for text, answer, row in zip(
        decoded_prompts(task, batch), batch.answer_text, batch.answers, strict=True
    ):
        a, b = text.removesuffix("=").split("+")
        assert text.endswith("=") and a == str(int(a)) and b == str(int(b))
        assert 0 <= int(a) < 100 and 0 <= int(b) < 100
        assert answer == str(int(a) + int(b))
        assert row.tolist() == response([[*ids(answer), EOS]], task.answer_len)[0].tolist()


def test_arith_multiplication_option():
    task = ArithTask(seed=0, digits=2, op="*")
    batch = task.train_batch(0, 64)
    for text, answer in zip(decoded_prompts(task, batch), batch.answer_text, strict=True):
        a, b = text.removesuffix("=").split("*")
        assert answer == str(int(a) * int(b))


def test_arith_left_padding_layout():
    batch = ArithTask(seed=0).train_batch(0, 512)
    for row, mask in zip(batch.prompts, batch.prompt_mask, strict=True):
        n_pad = int((mask == 0).sum())
        assert mask.tolist() == [0] * n_pad + [1] * (len(mask) - n_pad)
        assert (row[:n_pad] == PAD).all() and row[n_pad] == BOS
        assert (row[n_pad + 1 :] != PAD).all() and (row[n_pad + 1 :] != BOS).all()
    assert (batch.prompt_mask == 0).any()  # short prompts such as "1+2=" are padded


def test_arith_train_eval_disjoint():
    task = ArithTask(seed=1)
    eval_prompts = set(decoded_prompts(task, task.eval_batch()))
    assert len(eval_prompts) == 512
    train_prompts = set()
    for step in range(40):
        train_prompts |= set(decoded_prompts(task, task.train_batch(step, 512)))
    assert len(train_prompts) > 5000  # most of the 9000 training pairs were seen
    assert not eval_prompts & train_prompts


def test_arith_eval_is_fixed_and_small_spaces_give_all():
    task = ArithTask(seed=0)
    first, second = task.eval_batch(), task.eval_batch()
    assert np.array_equal(first.prompts, second.prompts)
    assert np.array_equal(first.prompts, ArithTask(seed=7).eval_batch().prompts)
    small = ArithTask(seed=0, digits=1).eval_batch()
    assert 0 < len(small.answer_text) < 30  # about 10 of the 100 pairs are held out


def test_arith_train_batch_deterministic():
    task = ArithTask(seed=0)
    a, b = task.train_batch(5, 32), task.train_batch(5, 32)
    assert np.array_equal(a.prompts, b.prompts) and a.answer_text == b.answer_text
    assert np.array_equal(ArithTask(seed=0).train_batch(5, 32).prompts, a.prompts)
    assert not np.array_equal(task.train_batch(6, 32).prompts, a.prompts)
    assert not np.array_equal(ArithTask(seed=1).train_batch(5, 32).prompts, a.prompts)


def test_arith_reward_hand_cases():
    reward = jax.jit(ArithTask(seed=0).jnp_reward)
    answers = response([[*ids("42"), EOS]] * 8, 4)
    resp = response(
        [
            [*ids("42"), EOS],  # exact
            ids("42"),  # right digits, never emitted EOS (truncated)
            [*ids("42"), *ids("7")],  # answer followed by a different token
            [*ids("427"), EOS],  # extra digit before EOS
            [*ids("41"), EOS],  # wrong digits, well formatted
            [*ids("4 2"), EOS],  # non-digit before EOS
            [EOS],  # empty answer
            [*ids("042"), EOS],  # leading zero
        ],
        6,
    )
    out = {k: np.asarray(v) for k, v in reward(jnp.asarray(resp), jnp.asarray(answers)).items()}
    assert set(out) == {"reward", "correct", "format"}
    assert all(v.dtype == np.float32 and v.shape == (8,) for v in out.values())
    assert out["correct"].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]
    assert out["reward"].tolist() == out["correct"].tolist()
    assert out["format"].tolist() == [1, 0, 0, 1, 1, 0, 0, 1]


def test_reward_ignores_tokens_after_eos():
    """A sampler that does not pad after EOS is scored like one that does (and like text)."""
    answers = jnp.asarray(response([[*ids("42"), EOS]] * 2, 3))
    resp = jnp.asarray(response([[*ids("42"), EOS, *ids("9x")], [*ids("4"), EOS, *ids("2")]], 5))
    arith = ArithTask(seed=0).jnp_reward(resp, answers)
    assert np.asarray(arith["correct"]).tolist() == [1, 0]
    assert np.asarray(arith["format"]).tolist() == [1, 1]
    np.testing.assert_allclose(SortTask(seed=0).jnp_reward(resp, answers)["reward"], [1, 1 / 3])


@pytest.mark.parametrize("width", [2, 3, 9])
def test_arith_reward_any_width(width):
    """Responses narrower or wider than the answers compare with pad filling the gap."""
    reward = jax.jit(ArithTask(seed=0).jnp_reward)
    answers = jnp.asarray(response([[*ids("5"), EOS], [*ids("17"), EOS]], 4))
    resp = response([[*ids("5"), EOS], [*ids("17"), EOS][:width]], width)
    out = reward(jnp.asarray(resp), answers)
    assert np.asarray(out["correct"]).tolist() == [1, float(width >= 3)]


def random_responses(rng, batch: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Convention-following random responses (any non-pad token, then EOS, then pad).

    Returns ``(response int32[B, width], has_eos bool[B])``.
    """
    resp = rng.integers(1, tk.VOCAB_SIZE, size=(batch, width)).astype(np.int32)
    resp[resp == EOS] = tk.DIGIT_IDS[0]
    digits = np.array(tk.DIGIT_IDS)
    resp = np.where(rng.random((batch, width)) < 0.7, rng.choice(digits, (batch, width)), resp)
    length = rng.integers(0, width + 1, size=batch)  # width means "never emitted EOS"
    for i, n in enumerate(length):
        if n < width:
            resp[i, n] = EOS
            resp[i, n + 1 :] = PAD
    return resp, length < width


@pytest.mark.parametrize("task_cls", [ArithTask, SortTask])
def test_jnp_reward_agrees_with_text_reward(task_cls):
    task = task_cls(seed=0, **({"digits": 1} if task_cls is ArithTask else {"length": 2}))
    rng = np.random.default_rng(0)
    batch = task.train_batch(0, 512)
    resp, has_eos = random_responses(rng, 512, task.answer_len + 2)
    # Plant exact and near-exact answers so that every score level occurs.
    resp[:64] = PAD
    resp[:64, : task.answer_len] = batch.answers[:64]
    resp[:32:2, 0] = tk.DIGIT_IDS[9]
    has_eos[:64] = True
    out = jax.jit(task.jnp_reward)(jnp.asarray(resp), jnp.asarray(batch.answers))
    ref = task.text_reward(task.decode_responses(resp), batch.answer_text)
    for key in ("reward", "correct", "format"):
        got = np.asarray(out[key])
        np.testing.assert_allclose(got[has_eos], ref[key][has_eos], rtol=1e-6, err_msg=key)
        assert (got[~has_eos] == 0).all() or key == "reward"
    assert 0 < np.asarray(out["correct"]).mean() < 1 and 0 < ref["format"].mean() < 1


def test_decode_responses_cuts_at_eos():
    task = ArithTask(seed=0)
    resp = response([[*ids("12"), EOS], ids("34"), [EOS], [*ids("5"), EOS, *ids("6")]], 4)
    assert task.decode_responses(resp) == ["12", "34", "", "5"]


# --- sort ---------------------------------------------------------------------------------


def test_sort_batch_and_split():
    task = SortTask(seed=0)
    batch = task.train_batch(0, 128)
    texts = decoded_prompts(task, batch)
    for text, answer in zip(texts, batch.answer_text, strict=True):
        digits = text.removeprefix("sort:").removesuffix("=")
        assert text.startswith("sort:") and len(digits) == 5 and digits.isdigit()
        assert answer == "".join(sorted(digits))
    eval_texts = set(decoded_prompts(task, task.eval_batch()))
    train_texts = {t for s in range(20) for t in decoded_prompts(task, task.train_batch(s, 512))}
    assert len(eval_texts) == 512 and not eval_texts & train_texts


def test_sort_partial_credit():
    task = SortTask(seed=0)
    answers = response([[*ids("12358"), EOS]] * 5, 6)
    resp = response(
        [
            [*ids("12385"), EOS],  # 4 of 6 positions
            [*ids("12358"), EOS],  # exact
            ids("123580"),  # truncated: 5 of 6
            [*ids("1235"), EOS],  # 4 of 6 (EOS early)
            [EOS],  # 0 of 6
        ],
        6,
    )
    out = jax.jit(task.jnp_reward)(jnp.asarray(resp), jnp.asarray(answers))
    np.testing.assert_allclose(out["reward"], [4 / 6, 1, 5 / 6, 4 / 6, 0], rtol=1e-6)
    assert np.asarray(out["correct"]).tolist() == [0, 1, 0, 0, 0]
    assert np.asarray(out["format"]).tolist() == [1, 1, 0, 1, 0]
    text = task.text_reward(["12385", "12358"], ["12358", "12358"])
    np.testing.assert_allclose(text["reward"], [4 / 6, 1], rtol=1e-6)


# --- verify -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("#### 42", "42"),
        ("reasoning 7 then #### 42 done 9", "42"),
        ("the answer is 1,234.", "1234"),
        ("-3.5", "-3.5"),
        ("it costs $1,000.50 in total", "1000.50"),
        ("3 - 4 gives", "4"),
        ("no number here", None),
        ("", None),
    ],
)
def test_extract_final_number(text, expected):
    assert extract_final_number(text) == expected


def test_numbers_equal_and_gsm8k_reward():
    assert numbers_equal("3.0", "3") and numbers_equal("1,000", "1000")
    assert not numbers_equal("3.1", "3") and not numbers_equal(None, "3")
    out = gsm8k_reward(["so #### 1,000", "it is 7", "none"], ["1000", 8, "Q... #### 5"])
    assert out["correct"].tolist() == [1, 0, 0] and out["reward"].tolist() == [1, 0, 0]
    assert out["format"].tolist() == [1, 1, 0]


# --- jsonl --------------------------------------------------------------------------------


def write_jsonl(path, rows: list[str]):
    path.write_text("\n".join(rows) + "\n")
    return path


def test_jsonl_task_load_split_and_batches(tmp_path, tok):
    rows = [json.dumps({"prompt": f"q{i} what is {i}+1", "answer": i + 1}) for i in range(30)]
    path = write_jsonl(tmp_path / "data.jsonl", rows)  # (empty lines: refused, test_reliability)
    task = make_task(f"jsonl:{path}", seed=0, tokenizer=tok, answer_len=4)
    assert task.jnp_reward is None and task.answer_len == 4
    assert task.prompt_len == 1 + max(len(json.loads(r)["prompt"]) for r in rows)
    ev = task.eval_batch()
    assert len(ev.answer_text) == 3 and np.array_equal(ev.prompts, task.eval_batch().prompts)
    eval_prompts = set(decoded_prompts(task, ev))
    seen = set()
    for step in range(10):
        batch = task.train_batch(step, 9)
        seen |= set(decoded_prompts(task, batch))
        assert batch.answers[:, 0].tolist() != [PAD] * 9
    assert len(seen) == 27 and not seen & eval_prompts  # 10 * 9 rows cover all 27 train rows
    a, b = task.train_batch(4, 9), task.train_batch(4, 9)
    assert a.answer_text == b.answer_text
    out = task.text_reward(["#### " + t for t in ev.answer_text], ev.answer_text)
    assert out["reward"].tolist() == [1, 1, 1]


def test_jsonl_errors(tmp_path, tok):
    good = json.dumps({"prompt": "a", "answer": "1"})
    bad = write_jsonl(tmp_path / "bad.jsonl", [good, good, "{not json"])
    with pytest.raises(ValueError, match=r"bad\.jsonl:3.*malformed"):
        JsonlTask(bad, tokenizer=tok, seed=0)
    missing = write_jsonl(tmp_path / "missing.jsonl", [good, json.dumps({"question": "b"})])
    with pytest.raises(ValueError, match=r"missing\.jsonl:2.*'prompt'.*question"):
        JsonlTask(missing, tokenizer=tok, seed=0)
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ValueError, match="empty"):
        JsonlTask(empty, tokenizer=tok, seed=0)


def test_make_task_registry():
    assert isinstance(make_task("arith", seed=0, digits=1), ArithTask)
    assert isinstance(make_task("sort", seed=0), SortTask)
    with pytest.raises(ValueError, match="arith.*sort.*jsonl:"):
        make_task("nope", seed=0)
