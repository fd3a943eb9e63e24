"""Build a vLLM ``LLM`` for a model and generate greedily from token ids; run as a subprocess.

Usage: python tests/_vllm_generate.py MODEL LOAD_FORMAT [--extra JSON] [--strategy S]
       [--tp N] [--max-tokens N] [--memory FRACTION]

Prints one line ``RESULT {"tokens": [[...], ...], "init_s": ...}`` on stdout; vLLM's log
(and ours, through it) goes to stderr. ``LLM`` starts an engine-core process, hence the
``__main__`` guard.
"""

from __future__ import annotations

import argparse
import json
import time

#: Prompts as token ids (the tiny model has no tokenizer).
PROMPTS = [[1, 5, 9, 100, 200], [1, 4000, 17, 23], [1, 8000, 3, 3, 3, 3]]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("load_format")
    parser.add_argument("--extra", default="{}", help="model_loader_extra_config as JSON")
    parser.add_argument("--strategy", default=None, help="safetensors_load_strategy")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--memory", type=float, default=0.1, help="gpu_memory_utilization")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(
        model=args.model,
        load_format=args.load_format,
        model_loader_extra_config=json.loads(args.extra),
        safetensors_load_strategy=args.strategy,
        tensor_parallel_size=args.tp,
        skip_tokenizer_init=True,
        gpu_memory_utilization=args.memory,  # on CPU: the share of host RAM for weights and KV
        max_model_len=256,
        max_num_seqs=4,
        enforce_eager=True,
        dtype="float32",
    )
    init_s = time.perf_counter() - t0
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, detokenize=False)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    print("RESULT " + json.dumps({"tokens": tokens, "init_s": init_s}), flush=True)


if __name__ == "__main__":
    main()
