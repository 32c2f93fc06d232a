"""`hybrid-gguf run [MODEL]`: generate or chat with experts placed by the learned plan."""

from __future__ import annotations

import json
import sys
import warnings
from typing import Optional

import typer
from rich.console import Console

from hybrid_gguf.errors import HybridError
from hybrid_gguf.commands.common import (cache_choice, cache_option, cache_quota_option, cache_type_choice,
                                        cache_type_k_option, cache_type_v_option, cpu_moe_option, ctx_option,
                                        flash_attn_option, gpu_budget_option, handoff_option, hot_option, model_argument,
                                        model_option, n_cpu_moe_option, no_record_option, no_repack_option,
                                        pick_model, plan_option, threads_option, ubatch_choice, ubatch_option)


def _notice(console: Console, text: str) -> None:
    console.print(f"[dim]{text}[/]")


def run_command(
    model: Optional[str] = model_argument(),
    model_opt: Optional[str] = model_option(),
    prompt: Optional[str] = typer.Option(None, "-p", "--prompt", help="prompt; omit for interactive chat"),
    n_predict: int = typer.Option(128, "-n", "--n-predict", help="tokens to generate"),
    temp: float = typer.Option(0.0, "--temp", help="sampling temperature (0 = greedy)"),
    seed: int = typer.Option(0, "--seed"),
    ctx: Optional[int] = ctx_option(),
    ubatch: Optional[str] = ubatch_option(),
    flash_attn: bool = flash_attn_option(),
    cache_type_k: Optional[str] = cache_type_k_option(),
    cache_type_v: Optional[str] = cache_type_v_option(),
    gpu_budget: Optional[str] = gpu_budget_option(),
    hot: Optional[str] = hot_option(),
    plan: Optional[str] = plan_option(),
    n_cpu_moe: Optional[int] = n_cpu_moe_option(),
    cpu_moe: bool = cpu_moe_option(),
    no_repack: bool = no_repack_option(),
    no_record: bool = no_record_option(),
    cache: Optional[str] = cache_option(),
    handoff: Optional[str] = handoff_option(),
    cache_quota: Optional[int] = cache_quota_option(),
    threads: Optional[int] = threads_option(),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of streaming text"),
    system: Optional[str] = typer.Option(None, "--system", help="system message of the interactive chat"),
    verbose: bool = typer.Option(False, "--verbose", help="show llama.cpp's log"),
) -> None:
    """Generate text (or chat) with a MoE model, hot experts on the GPU."""
    from hybrid_gguf import limits
    from hybrid_gguf.llama import hybrid as hybrid_backend
    from hybrid_gguf.model import HybridModel

    console = Console(stderr=True)
    model = pick_model(model, model_opt)
    check_placement_flags(hot, plan, n_cpu_moe, cpu_moe)
    if system is not None and prompt is not None:
        raise HybridError("--system is for the chat (run without -p); a -p prompt is raw text")
    limits.check_new_tokens(n_predict, "-n/--n-predict")
    limits.check_threads(threads, "--threads")
    limits.check_ctx(ctx, "--ctx")
    if not temp >= 0 or temp == float("inf"):  # NaN fails every comparison
        raise HybridError(f"--temp must be a finite number >= 0, got {temp}")
    n_ubatch = ubatch_choice(ubatch, ctx)
    type_k = cache_type_choice(cache_type_k, "--cache-type-k")
    type_v = cache_type_choice(cache_type_v, "--cache-type-v")
    hot_map = hybrid_backend.parse_hot_spec(hot) if hot else None
    if prompt is None and (as_json or not sys.stdin.isatty()):
        if not sys.stdin.isatty():
            prompt = read_stdin_text()
        if not prompt:
            raise HybridError("no prompt: pass -p/--prompt (interactive chat needs a terminal)")
    if prompt is not None:
        check_text(prompt, "-p/--prompt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hm = HybridModel(model, gpu_budget=gpu_budget, hot=hot_map, plan=plan, n_ctx=ctx, seed=seed,
                         record=not no_record, n_threads=threads, verbose=verbose,
                         n_cpu_moe=n_cpu_moe, cpu_moe=cpu_moe, repack=not no_repack,
                         cache=cache_choice(cache, cache_quota), handoff=handoff, n_ubatch=n_ubatch,
                         flash_attn=True if flash_attn else None, type_k=type_k, type_v=type_v)
    for w in caught:
        _notice(console, f"warning: {w.message}")
    try:
        if prompt is not None:
            hm.check_prompt(prompt, n_predict)  # before any output
        if not as_json:
            _notice(console, f"{hm.resolved.name}: {hm.inventory.arch}, {hm.inventory.n_layer} layers, "
                             f"{hm.inventory.n_expert} experts; placement: {hm.placement.description}")
            for note in hm.placement.notices:
                _notice(console, note)
            if hm.recorder_notice:
                _notice(console, hm.recorder_notice)
        if prompt is None:
            _chat(hm, console, n_predict, temp, system)
            return
        out = sys.stdout
        if as_json:
            res = hm.generate(prompt, max_tokens=n_predict, temperature=temp)
        else:
            out.write(prompt)
            out.flush()

            pieces = hm.stream(prompt, max_tokens=n_predict, temperature=temp)
            with pieces:
                for piece in pieces:
                    out.write(piece)
                    out.flush()
            res = pieces.result
            out.write("\n")
        routing = hm.session_routing()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            profile = hm.save_profile()
        for w in caught:  # e.g. a stored profile moved aside
            _notice(console, f"warning: {w.message}")
        next_plan = _next_plan(hm, profile)
        if as_json:
            print(json.dumps({
                "model": str(hm.path),
                "text": res.text,
                "tokens": res.tokens,
                "prompt_tokens": res.prompt_tokens,
                "gen_tokens": len(res.tokens),
                "finish_reason": res.finish_reason,
                "gen_tokens_per_s": res.gen_tokens_per_s,
                "prompt_tokens_per_s": res.prompt_tokens_per_s,
                "load_seconds": hm.load_seconds,
                "placement": hm.placement.to_dict(),
                "profile_sessions": None if profile is None else profile.sessions,
                "routing": routing,
                "cache": hm.cache_stats(),
                "worker": hm.worker_stats(),
                "next_plan": None if next_plan is None else {"summary": next_plan.summary(), **next_plan.to_dict()},
            }, indent=2))
        else:
            _notice(console, f"prompt {res.prompt_tokens} tok at {res.prompt_tokens_per_s:.1f} tok/s, "
                             f"generated {len(res.tokens)} tok at {res.gen_tokens_per_s:.1f} tok/s"
                             + ("" if profile is None else f"; routing profile now {profile.sessions} sessions"))
            if routing and hm.placement.gpu_experts and routing["prompt_hit_rate"] is not None:
                _notice(console, f"expert selections served from GPU memory: {routing['prompt_hit_rate']:.1%} "
                                 "of the prompt's" + ("" if routing["decode_hit_rate"] is None else
                                                      f", {routing['decode_hit_rate']:.1%} of sampled decode steps'"))
            stats = hm.cache_stats()
            if stats and stats["hit_rate"] is not None:
                _notice(console, f"in-session cache {stats['policy']}: {stats['hit_rate']:.1%} of the split layers' "
                                 f"selections served by a resident expert; {stats['uploads']} uploads "
                                 f"({stats['upload_bytes'] / 2**20:.1f} MiB"
                                 + (f", {stats['blocking_uploads']} of them synchronous" if stats.get("blocking_uploads") else "")
                                 + f"), {stats['evictions']} evictions")
            if next_plan is not None:
                _notice(console, "re-planned with this session's routing (what `hybrid-gguf plan` and the next "
                                 "auto-planned run will use): " + next_plan.summary())
    except KeyboardInterrupt:
        _save_interrupted(hm, console)
        raise typer.Exit(130)
    finally:
        hm.close(save_profile=False)


def check_placement_flags(hot, plan, n_cpu_moe, cpu_moe) -> None:
    """One way to choose the placement: --hot, --plan, --n-cpu-moe or --cpu-moe."""
    given = [flag for flag, value in (("--hot", hot), ("--plan", plan), ("--n-cpu-moe", n_cpu_moe is not None),
                                      ("--cpu-moe", cpu_moe)) if value]
    if len(given) > 1:
        raise HybridError(f"{' and '.join(given)} each choose the placement; pass one")


def read_stdin_text() -> str:
    """All of stdin as text; bytes that are not UTF-8 are a one-line error."""
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HybridError(f"stdin is not valid UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                          f"{exc.start})") from None


def check_text(text: str, what: str) -> None:
    """Refuse text that cannot be written as UTF-8: a command-line argument with bytes that
    are not UTF-8 reaches Python as lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise HybridError(f"{what} is not valid UTF-8 text (at character {exc.start})") from None


def _next_plan(hm, profile):
    """The diff between this session's plan and the one its updated profile gives (None
    without a per-expert plan or a profile)."""
    from hybrid_gguf.autoplan import next_session_plan

    try:
        return next_session_plan(hm.plan, hm.inventory, profile)[1]
    except HybridError:
        return None


def _save_interrupted(hm, console: Console) -> None:
    """Ctrl-C: keep the routing recorded so far (a second Ctrl-C leaves the profile as it was)."""
    try:
        profile = hm.save_profile()
    except KeyboardInterrupt:
        profile = None
    sys.stdout.write("\n")
    _notice(console, "interrupted" + ("" if profile is None else
                                      f"; routing profile now {profile.sessions} sessions"))


def _chat(hm, console: Console, n_predict: int, temp: float, system: Optional[str]) -> None:
    """Chat with the model's chat template (hybrid_gguf.chat); old turns are dropped to fit."""
    from hybrid_gguf.chat import chat_loop

    console.print("[bold]chat[/] (empty line or Ctrl-D to quit)")
    chat_loop(hm, max_tokens=n_predict, temperature=temp, system=system,
              notice=lambda text: _notice(console, text))
    profile = hm.save_profile()
    if profile is not None:
        _notice(console, f"routing profile now {profile.sessions} sessions")


def register(app: typer.Typer) -> None:
    app.command("run")(run_command)
