"""A small TRL GRPO run on CPU with fm watching it: the example of fm on another trainer.

  python -m launch.trl_demo --workdir runs/trl [--flip_at 25] [--action log|stop|rollback]
  python -m fm.analyze runs/trl                  # offline: reads runs/trl/trainer_state.json

Needs the `trl` extra (`pip install -e ".[trl]"`). The policy is a 2-layer, 32-wide Llama with
random weights and a one-letter-a-token tokenizer over 16 letters, built in the workdir (no
download); the reward is the share of the letter "a" in a completion. `--flip_at K` flips the
rewards (1 - r) from step K on: a reward fault. `fm.integrations.trl.FMCallback` watches the
run online (its events go to WORKDIR/fm_events.jsonl); the run's log history is written to
WORKDIR/trainer_state.json with TRL's own writer.
"""

from __future__ import annotations

import argparse
import os

LETTERS = "abcdefghijklmnop"


def tiny_model(folder: str) -> str:
    """A 2-layer, 32-wide Llama with random weights and a one-letter-a-token tokenizer, saved
    to `folder` (returned)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(LETTERS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def share_of_a(flip_at: int | None):
    """The reward function: the share of "a" in each completion; from step `flip_at` on
    (1-based, as TRL logs steps) the rewards are flipped to 1 - r."""

    def reward(completions, trainer_state, **kwargs):
        rewards = [sum(c == "a" for c in text) / max(len(text), 1) for text in completions]
        if flip_at and trainer_state.global_step + 1 >= flip_at:
            rewards = [1.0 - r for r in rewards]
        return rewards

    return reward


def train(model: str, out: str, *, steps: int = 40, flip_at: int | None = None, callback=None):
    """GRPO (TRL's GRPOTrainer, CPU, one thread) on `model`; returns the trainer. The log
    history is written to OUT/trainer_state.json."""
    import torch
    import trl
    from datasets import Dataset

    args = trl.GRPOConfig(
        output_dir=out, per_device_train_batch_size=16, num_generations=4,
        max_completion_length=8, max_steps=steps, logging_steps=1, learning_rate=1e-4,
        beta=0.04, seed=0, report_to="none", use_cpu=True, save_strategy="no",
        disable_tqdm=True,
    )  # fmt: skip
    trainer = trl.GRPOTrainer(
        model=model, reward_funcs=share_of_a(flip_at), args=args,
        train_dataset=Dataset.from_dict({"prompt": ["abcd", "efgh", "ijkl", "mnop"] * 64}),
        callbacks=[callback] if callback else None,
    )  # fmt: skip
    torch.set_num_threads(1)
    trainer.train()
    trainer.state.save_to_json(os.path.join(out, "trainer_state.json"))
    return trainer


def main(argv=None) -> None:
    # argparse, not absl: these flag names are launch.train's too, and tests import both.
    parser = argparse.ArgumentParser(prog="python -m launch.trl_demo", description=__doc__)
    parser.add_argument("--workdir", default="runs/trl", help="output folder")
    parser.add_argument("--steps", type=int, default=40, help="GRPO steps")
    parser.add_argument("--flip_at", type=int, default=0, help="flip rewards from this step")
    parser.add_argument("--action", default="log", choices=("log", "stop", "rollback"))
    args = parser.parse_args(argv)
    from fm.integrations.trl import FMCallback

    os.makedirs(args.workdir, exist_ok=True)
    model = tiny_model(os.path.join(args.workdir, "model"))
    callback = FMCallback(action=args.action)
    train(model, args.workdir, steps=args.steps, flip_at=args.flip_at, callback=callback)
    for event in callback.events:
        if event["event"] != "alarm":
            print(event)


if __name__ == "__main__":
    main()
