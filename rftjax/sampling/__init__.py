"""Compiled generation (KV cache) and the matching trainer log-probs."""

from rftjax.sampling.sampler import (
    Rollout,
    SamplingParams,
    bucket_sizes,
    generate,
    generate_recompute,
    log_probs,
    pad_slots,
    prefill,
    repeat_rows,
    response_ends,
    response_logprobs,
    sample_token,
    sampling_params,
    switch_on_length,
    token_logprobs,
)

__all__ = [
    "Rollout",
    "SamplingParams",
    "bucket_sizes",
    "generate",
    "generate_recompute",
    "log_probs",
    "pad_slots",
    "prefill",
    "repeat_rows",
    "response_ends",
    "response_logprobs",
    "sample_token",
    "sampling_params",
    "switch_on_length",
    "token_logprobs",
]
