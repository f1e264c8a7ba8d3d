"""Subprocess body for the offline ``vllm.LLM`` tests (vLLM needs a fresh process and a __main__ guard).

Usage: python llm_worker.py '<json spec>'; spec = {model, prompts, chat, max_new_tokens, scored_ids,
llm_kwargs, out}. Writes {"completions": [{"token_ids", "text"}], "chat": {...},
"scores": {"logprobs", "top1"}} to spec["out"] (scores: teacher-forced over scored_ids).
"""

import json
import sys


def _strip_eos(ids: list[int], eos: int | None) -> list[int]:
    return ids[:-1] if ids and eos is not None and ids[-1] == eos else ids


def main() -> None:
    spec = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = {"max_model_len": 512, "seed": 0, **spec["llm_kwargs"]}
    llm = LLM(model=spec["model"], **kwargs)
    params = SamplingParams(max_tokens=spec["max_new_tokens"], temperature=0.0)
    eos = llm.get_tokenizer().eos_token_id

    def pack(output) -> dict:
        c = output.outputs[0]
        return {"token_ids": _strip_eos(list(c.token_ids), eos), "text": c.text}

    result = {"completions": [pack(o) for o in llm.generate(spec["prompts"], params)]}
    if spec.get("chat"):
        out = llm.chat(spec["chat"], params)[0]
        result["chat"] = {**pack(out), "prompt_ids": list(out.prompt_token_ids)}
    ids = spec.get("scored_ids")
    if ids:
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)],
                           SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1))[0]
        positions = out.prompt_logprobs[1:]  # entry i scores ids[i] given ids[:i]
        result["scores"] = {
            "logprobs": [pos[tok].logprob for pos, tok in zip(positions, ids[1:])],
            "top1": [min(pos.items(), key=lambda kv: kv[1].rank)[0] for pos in positions],
        }
    with open(spec["out"], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
