"""`hybrid-gguf serve [MODEL]`: an OpenAI-compatible server that records routing as it serves."""

from __future__ import annotations

import sys
import warnings
from typing import Optional

import typer
from rich.console import Console

from hybrid_gguf.errors import HybridError
from hybrid_gguf.commands.common import (cache_type_choice, cache_type_k_option, cache_type_v_option,
                                        cpu_moe_option, ctx_option, flash_attn_option, gpu_budget_option,
                                        hot_option, model_argument, model_option, n_cpu_moe_option,
                                        no_record_option, no_repack_option, cache_choice, cache_option, handoff_option,
                                        cache_quota_option, pick_model, plan_option, threads_option, ubatch_choice,
                                        ubatch_option)
from hybrid_gguf.commands.run import check_placement_flags


def serve_command(
    model: Optional[str] = model_argument(),
    model_opt: Optional[str] = model_option(),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (the API has no authentication)"),
    port: int = typer.Option(8080, "--port", help="TCP port (0: any free one)"),
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
    cache: Optional[str] = cache_option(),
    handoff: Optional[str] = handoff_option(),
    cache_quota: Optional[int] = cache_quota_option(),
    no_record: bool = no_record_option(),
    save_every: float = typer.Option(30.0, "--save-every",
                                     help="seconds between merges of the recorded routing into the profile"),
    max_queue: int = typer.Option(64, "--max-queue", help="requests waiting at most; more get a 503"),
    threads: Optional[int] = threads_option(),
    seed: int = typer.Option(0, "--seed"),
    verbose: bool = typer.Option(False, "--verbose", help="show llama.cpp's log and each request"),
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API, learning its routing as it serves."""
    from hybrid_gguf import limits
    from hybrid_gguf.llama import hybrid as hybrid_backend
    from hybrid_gguf.model import HybridModel
    from hybrid_gguf.routing.profile import ProfileStore
    from hybrid_gguf.server import ModelService, serve_forever

    console = Console(stderr=True)

    def notice(text: str) -> None:
        console.print(f"[dim]{text}[/]", highlight=False, soft_wrap=True)

    model = pick_model(model, model_opt)
    check_placement_flags(hot, plan, n_cpu_moe, cpu_moe)
    if not 0 <= port <= 65535:
        raise HybridError(f"--port must be in 0..65535, got {port}")
    if not 0 < save_every < float("inf"):  # NaN fails every comparison
        raise HybridError(f"--save-every must be positive, got {save_every}")
    if max_queue < 1:
        raise HybridError(f"--max-queue must be at least 1, got {max_queue}")
    limits.check_ctx(ctx, "--ctx")
    n_ubatch = ubatch_choice(ubatch, ctx)
    type_k = cache_type_choice(cache_type_k, "--cache-type-k")
    type_v = cache_type_choice(cache_type_v, "--cache-type-v")
    hot_map = hybrid_backend.parse_hot_spec(hot) if hot else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hm = HybridModel(model, gpu_budget=gpu_budget, hot=hot_map, plan=plan, n_ctx=ctx, seed=seed,
                         record=not no_record, n_threads=threads, verbose=verbose,
                         n_cpu_moe=n_cpu_moe, cpu_moe=cpu_moe, repack=not no_repack,
                         cache=cache_choice(cache, cache_quota), handoff=handoff, n_ubatch=n_ubatch,
                         flash_attn=True if flash_attn else None, type_k=type_k, type_v=type_v)
    try:
        for w in caught:
            notice(f"warning: {w.message}")
        inv = hm.inventory
        notice(f"{hm.resolved.name}: {inv.arch}, {inv.n_layer} layers, {inv.n_expert} experts; "
               f"placement: {hm.placement.description}")
        for note in hm.placement.notices:  # with an auto plan: what changed since the last one
            notice(note)
        if hm.recorder_notice:
            notice(hm.recorder_notice)
        store = ProfileStore()
        if hm.recorder is not None:
            known = store.load(inv.fingerprint)
            notice("routing profile: none yet, this run starts it" if known is None else
                   f"routing profile: {known.sessions} sessions, {int(known.tokens_per_layer[0])} tokens "
                   f"(merged every {save_every:g} s and at shutdown)")
        service = ModelService(hm, save_every=save_every, max_queue=max_queue, profile_store=store)
    except BaseException:
        hm.close(save_profile=False)
        raise
    if service.template.notice:
        notice(service.template.notice)
    if host not in ("127.0.0.1", "localhost", "::1"):
        notice(f"listening on {host}: anyone who can reach it can use the model (no API key)")

    def ready(bound: int) -> None:
        shown = f"[{host}]" if ":" in host else host
        console.print(f"serving {service.model_id} on http://{shown}:{bound}/v1 (Ctrl-C stops)",
                      highlight=False, soft_wrap=True)
        sys.stderr.flush()

    def closed(svc) -> None:
        st = svc.stats
        notice(f"stopped after {st.requests} requests, {st.prompt_tokens} prompt + "
               f"{st.completion_tokens} generated tokens"
               + ("" if st.profile_sessions is None else
                  f"; routing profile now {st.profile_sessions} sessions"))

    service.on_closed = closed
    serve_forever(service, host, port, on_ready=ready, log_level="info" if verbose else "warning")


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
