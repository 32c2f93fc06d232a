"""Options every model-taking command shares: MODEL as a positional or -m/--model, -c/--ctx,
-t/--threads; one resolver (models.resolve_model) and one context default (limits.DEFAULT_CTX)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import typer

from hybrid_gguf.errors import HybridError

MODEL_HELP = ("GGUF path, models.yaml alias, or a file in the Hugging Face cache "
              "(org/repo:file.gguf)")


def model_argument(help: str = MODEL_HELP):
    return typer.Argument(None, help=help + " (default: the bundled model)", show_default=False)


def model_option():
    return typer.Option(None, "-m", "--model", help="the model, as an option (same as MODEL)",
                        show_default=False)


def ctx_option(what: str = "context length"):
    from hybrid_gguf.limits import DEFAULT_CTX

    return typer.Option(None, "-c", "--ctx", show_default=False,
                        help=f"{what} (default: the model's training context, at most {DEFAULT_CTX})")


def threads_option():
    return typer.Option(None, "-t", "--threads", help="CPU threads", show_default=False)


# placement options of the commands that load a model for inference (run, serve)

def gpu_budget_option():
    return typer.Option(None, "--gpu-budget",
                        help="total VRAM for the model, e.g. 8GiB (several GPUs: split by free memory, or one "
                             "per GPU, 20GiB,12GiB; default and upper bound: free VRAM less 512 MiB)")


def hot_option():
    return typer.Option(None, "--hot", help='per-expert placement by hand: "layer:e,e;layer:e"')


def plan_option():
    return typer.Option(None, "--plan", help="apply a plan YAML from `hybrid-gguf plan`")


def n_cpu_moe_option():
    return typer.Option(None, "--n-cpu-moe", min=0, show_default=False,
                        help="whole layers by hand: experts of the first N layers on the CPU")


def cpu_moe_option():
    return typer.Option(False, "--cpu-moe", help="whole layers by hand: every routed expert on the CPU")


def ubatch_option(help: str = "prompt micro-batch, as llama.cpp's -ub: tokens per compute step (larger: faster "
                                "prefill, a larger compute buffer), or auto: the planner's pick of 512..4096 "
                                "(default 512; with --plan, the plan's)"):
    return typer.Option(None, "-ub", "--ubatch", metavar="N|auto", show_default=False, help=help)


def flash_attn_option(help: str = "flash attention, as llama.cpp's -fa (a smaller compute buffer at long "
                                  "contexts; default off; with --plan, the plan's)"):
    return typer.Option(False, "-fa", "--flash-attn", help=help)


def ubatch_choice(text: Optional[str], n_ctx: Optional[int] = None) -> Union[None, int, str]:
    """-ub/--ubatch as HybridModel's and plan_model's n_ubatch: None (not given), "auto", or
    a whole number (limits.check_ubatch: a batch size no larger than `n_ctx`, if given)."""
    from hybrid_gguf.limits import check_ubatch

    if text is None:
        return None
    value = text.strip().lower()
    choice: Union[int, str] = int(value) if value.isascii() and value.isdigit() else value
    check_ubatch(choice, n_ctx, "--ubatch")
    return choice


def _cache_type_help(which: str) -> str:
    from hybrid_gguf.planning.memory import CACHE_TYPES

    return (f"KV cache type of {which}, as llama.cpp's -ct{which.lower()}: {', '.join(CACHE_TYPES)} (default f16; "
            + ("a quantized V needs -fa; " if which == "V" else "") + "with --plan, the plan's)")


def cache_type_k_option(help: Optional[str] = None):
    return typer.Option(None, "-ctk", "--cache-type-k", metavar="TYPE", show_default=False,
                        help=help or _cache_type_help("K"))


def cache_type_v_option(help: Optional[str] = None):
    return typer.Option(None, "-ctv", "--cache-type-v", metavar="TYPE", show_default=False,
                        help=help or _cache_type_help("V"))


def cache_type_choice(text: Optional[str], option: str) -> Optional[str]:
    """-ctk/--cache-type-k or -ctv/--cache-type-v as HybridModel's and plan_model's type_k/
    type_v: None (not given), else the type as memory.CACHE_TYPES spells it (any case)."""
    from hybrid_gguf.planning.memory import cache_type

    return None if text is None else cache_type(text.strip(), option)


def handoff_option():
    return typer.Option(None, "--handoff",
                        help="who takes a split layer's cold experts in decode: scheduler (the graph is cut at "
                             "each split layer) or worker (a CPU worker answers the GPU through mapped memory; "
                             "hybrid patch version 6+, timed faster from version 8); default: the plan's `handoff:`")


def cache_option():
    return typer.Option(None, "--cache",
                        help="in-session expert cache over the hot packs: static (the plan's hot set all session), "
                             "lru, lfu, seeded (lfu with half of each layer's slots pinned to the plan's first "
                             "experts); default: the plan's `cache:`, else static; needs hybrid patch version 5")


def cache_choice(cache: Optional[str], quota: Optional[int]):
    """--cache/--cache-quota as HybridModel's `cache`: None (the plan's) or CacheOptions."""
    from hybrid_gguf.planning.placement import CacheOptions

    if cache is None:
        if quota is not None:
            raise HybridError("--cache-quota goes with --cache POLICY (a plan's cache keeps the plan's quota)")
        return None
    return CacheOptions(cache, CacheOptions.quota if quota is None else quota)


def cache_quota_option():
    return typer.Option(None, "--cache-quota", min=0, max=4096,
                        help="with --cache: at most this many expert uploads per step (default 16)")


def no_repack_option():
    return typer.Option(False, "--no-repack", help="keep CPU weights in plain buffers (no AMX/extra buffer repacking)")


def no_record_option():
    return typer.Option(False, "--no-record", help="do not record routing into the profile")


def pick_model(positional: Optional[str], option: Optional[str]) -> Optional[str]:
    """MODEL from the positional or -m/--model; both given and different is an error."""
    if positional is not None and option is not None and positional != option:
        raise HybridError(f"MODEL given twice: {positional!r} and -m/--model {option!r}; pass one")
    return option if option is not None else positional


def resolve(positional: Optional[str], option: Optional[str]):
    """The ResolvedModel of a command's MODEL (positional or -m/--model)."""
    from hybrid_gguf.models import resolve_model

    return resolve_model(pick_model(positional, option))


def check_output_file(path: Path, option: str, image: bool = False, inputs: tuple = (),
                      create_folders: bool = False) -> None:
    """Refuse an output path that cannot be written, or whose old contents would be lost, before
    the (long) run. Files are replaced by an atomic rename, so a device or a pipe would be
    replaced too; a GGUF model or one of the command's own inputs is never overwritten. `image`:
    a file matplotlib can write (its suffix names a format it knows, or none: PNG);
    `create_folders`: the writer makes missing folders (its nearest existing one must be a folder)."""
    import os
    import stat

    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise HybridError(f"{option} {path}: {exc.strerror or exc}") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise HybridError(f"{option} {path} is a directory; give a file name")
        if not stat.S_ISREG(st.st_mode):
            raise HybridError(f"{option} {path} is a device, pipe or socket; give a file name")
        for given in inputs:
            if given is not None and Path(given).exists() and os.path.samefile(path, given):
                raise HybridError(f"{option} {path} is also this command's input {given}; give another name")
        with open(path, "rb") as fh:
            if fh.read(4) == b"GGUF":
                raise HybridError(f"{option} {path} is a GGUF model; refusing to overwrite it")
    parent = path.parent
    while create_folders and not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.exists():
        raise HybridError(f"{option} {path}: the folder {parent} does not exist")
    if not parent.is_dir():
        raise HybridError(f"{option} {path}: {parent} is not a folder")
    if image and path.suffix:
        from matplotlib.backend_bases import FigureCanvasBase

        known = FigureCanvasBase.get_supported_filetypes()
        if path.suffix[1:].lower() not in known:
            raise HybridError(f"{option} {path}: matplotlib cannot write {path.suffix!r} images "
                              f"(it writes {', '.join(sorted(known))})")
