"""``ringfuse generate`` and ``ringfuse chat``: text to stdout as it is produced, figures
to stderr. Under torchrun (``--tp N``) every rank computes and rank 0 prints. Ctrl-C ends
either with "interrupted" and exit status 130 (during a chat answer it stops that answer)."""

from __future__ import annotations

import os
import sys
import warnings

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
    lead = int(os.environ.get("RANK", "0")) == 0
    show = warnings.showwarning

    def one_line(message, category, filename, lineno, file=None, line=None):  # ringfuse's own: no source echo
        if "ringfuse" not in filename:
            return show(message, category, filename, lineno, file, line)
        if lead:
            print(f"ringfuse {args.command}: warning: {message}", file=sys.stderr)

    warnings.showwarning = one_line
    # argv reaches Python with undecodable bytes as lone surrogates: decode them as U+FFFD
    args.prompts = [_text(p, f"prompt {i}", args.command, lead) for i, p in enumerate(getattr(args, "prompts", []))]
    if getattr(args, "system", None):
        args.system = _text(args.system, "--system", args.command, lead)
    if args.stop:
        args.stop = [_text(t, "--stop", args.command, lead) for t in args.stop]
    try:
        from .runtime import LLM
        from .runtime.sampling import SamplingParams

        SamplingParams(**_sampling(args))  # bad sampling flags fail before the model loads (chat: before the banner)
        llm = LLM(args.model, device=args.device, dtype=args.dtype, quant=args.quant, tp=args.tp, threads=args.threads,
                  max_model_len=args.max_model_len, weight_cache=args.weight_cache,
                  gpu_memory_utilization=args.gpu_memory_utilization)  # fmt: skip
        if args.command == "chat":
            return _chat(llm, args, lead)
        return _generate(llm, args, lead)
    except BrokenPipeError:  # stdout's reader left (`| head`): cli.main ends quietly
        raise
    except (ValueError, TypeError, OSError, RuntimeError) as e:
        error(str(e))
    except KeyboardInterrupt:  # Ctrl-C: a shell's way, no traceback
        print(f"ringfuse {args.command}: interrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        if args.tp > 1:
            from .distributed import destroy

            destroy()
    return 0


def _text(s: str, what: str, command: str, lead: bool) -> str:
    """``s`` with undecodable bytes (kept by Python as lone surrogates: surrogateescape)
    decoded as U+FFFD, as a terminal shows them; says so when it changes anything."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        pass
    try:
        raw = s.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # surrogates no byte made: keep the rest
        raw = s.encode("utf-8", "replace")
    if lead:
        print(f"ringfuse {command}: warning: {what} is not valid UTF-8; its invalid bytes are read as U+FFFD",
              file=sys.stderr)  # fmt: skip
    return raw.decode("utf-8", "replace")


def _figures(r) -> str:
    n, new = len(r.prompt_token_ids), len(r.token_ids)
    # one new token comes from the prefill: no decode step to time (decode_tokens_per_s is NaN)
    decode = f"decode {r.decode_tokens_per_s:.1f} tok/s" if new > 1 else "no decode step"
    return (f"prompt {n} tokens: prefill {r.prefill_s * 1e3:.1f} ms ({n / max(r.prefill_s, 1e-9):.0f} tok/s); "
            f"{new} new token{'s' * (new != 1)}: {decode} ({r.finish_reason})")  # fmt: skip


def _generate(llm, args, lead: bool) -> int:
    prompts = args.prompts or [DEFAULT_PROMPT]
    kw = dict(_sampling(args), ignore_eos=args.ignore_eos, raw=args.raw)
    if len(prompts) == 1:
        try:
            for ev in llm.stream(prompts[0], **kw):
                if lead:
                    print(ev.text, end="", flush=True)
                    if ev.finished:
                        print()
                        print(_figures(ev.result), file=sys.stderr)
        except KeyboardInterrupt:
            if lead:
                print(flush=True)  # end the partial line
            raise
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
    """Reads a line, answers with the whole conversation as context; when the conversation
    outgrows the context, the oldest turns are dropped (the system prompt stays). Under TP,
    rank 0 reads and broadcasts each line so all ranks run the same requests."""
    system = [{"role": "system", "content": args.system}] if args.system else []
    alone = len(llm.tokenizer.encode_chat([*system, {"role": "user", "content": ""}]))
    if alone >= llm.max_model_len:  # no message could ever be answered
        raise ValueError(f"the --system prompt needs {alone} tokens with the chat template but the context is "
                         f"{llm.max_model_len} (max_model_len): shorten it or raise --max-model-len")  # fmt: skip
    turns: list[dict] = []  # user, assistant, user, assistant, ...
    if lead:
        print("ringfuse chat: Ctrl-D to quit, Ctrl-C to stop an answer or quit", file=sys.stderr)
        if hasattr(sys.stdin, "reconfigure"):  # invalid UTF-8 arrives as surrogates, then _text
            sys.stdin.reconfigure(errors="surrogateescape")
    while True:
        line = _read_line(lead, args.tp > 1)
        if line is None:
            if lead:
                print(file=sys.stderr)
            return 0
        if not line.strip():
            continue
        line = _text(line, "the input", "chat", lead)
        ids, dropped = _fit(llm, system, turns, line, args.max_new_tokens)
        if len(ids) >= llm.max_model_len:  # even without any earlier turn
            if lead:
                print(f"ringfuse chat: this message needs {len(ids)} tokens but the context is {llm.max_model_len} "
                      "(max_model_len), even without earlier turns: skipped it", file=sys.stderr)  # fmt: skip
            continue
        if dropped:
            del turns[: 2 * dropped]
            if lead:
                print(f"ringfuse chat: the conversation outgrew the context ({llm.max_model_len} tokens): "
                      f"dropped the {dropped} oldest turn{'s' * (dropped > 1)}", file=sys.stderr)  # fmt: skip
        reply = []
        try:
            for ev in llm.stream([ids], **_sampling(args)):
                reply.append(ev.text)
                if lead:
                    print(ev.text, end="", flush=True)
        except KeyboardInterrupt:  # stop this answer; the engine freed its cache blocks
            if lead:
                print(" [interrupted]", flush=True)
            continue
        if lead:
            print()
        turns += [{"role": "user", "content": line}, {"role": "assistant", "content": "".join(reply)}]


def _fit(llm, system: list, turns: list, line: str, max_new_tokens: int) -> tuple[list[int], int]:
    """(token ids of the conversation + this line, how many of the oldest turns to drop).
    Turns are dropped until the answer has room for max_new_tokens (at most half the
    context, so a long --max-new-tokens does not wipe the history); without any turn left,
    one new token of room is enough (the caller checks that)."""
    room = min(max_new_tokens, llm.max_model_len // 2)
    for drop in range(len(turns) // 2 + 1):
        ids = llm.tokenizer.encode_chat([*system, *turns[2 * drop :], {"role": "user", "content": line}])
        if len(ids) + room <= llm.max_model_len:
            return ids, drop
    return ids, drop


def _read_line(lead: bool, distributed: bool) -> str | None:
    """The next line (None at end of input). Ctrl-C raises KeyboardInterrupt on every rank."""
    line = None
    if lead:
        try:
            line = input("> ")
        except EOFError:
            line = None
        except KeyboardInterrupt:
            line = False  # passed on to the other ranks, then raised everywhere
    if distributed:
        import torch.distributed as dist

        box = [line]
        dist.broadcast_object_list(box, src=0)
        line = box[0]
    if line is False:
        raise KeyboardInterrupt
    return line
