"""``ringfuse generate`` and ``ringfuse chat``: text to stdout as it is produced, figures
to stderr. Under torchrun (``--tp N``) every rank computes and rank 0 prints."""

from __future__ import annotations

import os
import sys

DEFAULT_PROMPT = "Explain photosynthesis in two sentences."


def _check(args, parser_error) -> None:
    for name in ("tp", "threads", "max_new_tokens"):
        v = getattr(args, name)
        if v is not None and v < 1:
            parser_error(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.tp > 1 and "WORLD_SIZE" not in os.environ:
        parser_error(f"--tp {args.tp} needs one process per rank: torchrun --nproc-per-node {args.tp} -m ringfuse "
                     f"{args.command} --tp {args.tp} ...")  # fmt: skip


def _sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop)  # fmt: skip


def run(args) -> int:
    def error(msg):
        print(f"ringfuse {args.command}: error: {msg}", file=sys.stderr)
        sys.exit(2)

    _check(args, error)
    from .runtime import LLM

    try:
        llm = LLM(args.model, dtype=args.dtype, quant=args.quant, tp=args.tp, threads=args.threads,
                  weight_cache=args.weight_cache)  # fmt: skip
        lead = int(os.environ.get("RANK", "0")) == 0
        if args.command == "chat":
            return _chat(llm, args, lead)
        return _generate(llm, args, lead)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
        error(str(e))
    finally:
        if args.tp > 1:
            from .distributed import destroy

            destroy()
    return 0


def _figures(r) -> str:
    n = len(r.prompt_token_ids)
    return (f"prompt {n} tokens: prefill {r.prefill_s * 1e3:.1f} ms ({n / max(r.prefill_s, 1e-9):.0f} tok/s); "
            f"{len(r.token_ids)} new tokens: decode {r.decode_tokens_per_s:.1f} tok/s ({r.finish_reason})")  # fmt: skip


def _generate(llm, args, lead: bool) -> int:
    prompts = args.prompts or [DEFAULT_PROMPT]
    kw = dict(_sampling(args), ignore_eos=args.ignore_eos, raw=args.raw)
    if len(prompts) == 1:
        for ev in llm.stream(prompts[0], **kw):
            if lead:
                print(ev.text, end="", flush=True)
                if ev.finished:
                    print()
                    print(_figures(ev.result), file=sys.stderr)
        return 0
    import time

    t0 = time.perf_counter()
    results = llm.generate(prompts, **kw)
    wall = time.perf_counter() - t0
    if lead:
        for i, (p, r) in enumerate(zip(prompts, results)):
            print(f"--- [{i}] {p}\n{r.text}", flush=True)
            print(f"[{i}] {_figures(r)}", file=sys.stderr)
        total = sum(len(r.token_ids) for r in results)
        print(f"{len(prompts)} prompts, {total} new tokens in {wall:.2f} s: {total / wall:.1f} tok/s in total",
              file=sys.stderr)  # fmt: skip
    return 0


def _chat(llm, args, lead: bool) -> int:
    """Reads a line, answers with the whole conversation as context. Under TP, rank 0 reads
    and broadcasts each line so all ranks run the same requests."""
    messages = [{"role": "system", "content": args.system}] if args.system else []
    if lead:
        print("ringfuse chat: Ctrl-D or Ctrl-C to quit", file=sys.stderr)
    while True:
        try:
            line = _read_line(lead, args.tp > 1)
        except KeyboardInterrupt:
            line = None
        if line is None:
            if lead:
                print(file=sys.stderr)
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        reply = []
        try:
            for ev in llm.stream([messages], **_sampling(args)):
                reply.append(ev.text)
                if lead:
                    print(ev.text, end="", flush=True)
        except KeyboardInterrupt:  # stop this answer; the engine freed its cache blocks
            if lead:
                print(" [interrupted]", flush=True)
            messages.pop()
            continue
        if lead:
            print()
        messages.append({"role": "assistant", "content": "".join(reply)})


def _read_line(lead: bool, distributed: bool) -> str | None:
    line = None
    if lead:
        try:
            line = input("> ")
        except EOFError:
            line = None
    if distributed:
        import torch.distributed as dist

        box = [line]
        dist.broadcast_object_list(box, src=0)
        line = box[0]
    return line
