"""What every benchmark result carries: device, date, commit, command."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
from typing import Any

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def commit() -> str:
    if os.environ.get("JLORA_COMMIT"):  # set where the checkout travels without .git (the GPU machine)
        return os.environ["JLORA_COMMIT"]
    try:
        sha = subprocess.check_output(
            ["git", "rev-parse", "HEAD"], text=True, stderr=subprocess.DEVNULL
        ).strip()
        dirty = subprocess.check_output(
            ["git", "status", "--porcelain", "--untracked-files=no"], text=True
        ).strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device() -> str:
    import jax

    d = jax.devices()[0]
    if d.platform == "cpu":
        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        return f"cpu: {cpu}, {os.cpu_count()} cores"
    return f"{d.platform}: {d.device_kind}"


# decode_7b's requests prefill 8 per step, so they also finish 8 per step: the last decode steps run
# 24, 16, 8 requests and a full run of 32 averages ~31.6 per timed step. A pool that holds fewer
# requests than the batch (the 70B runs sized for 7B adapters: 12, 7, 4 of 32) falls far below this.
FULL_BATCH_SHARE = 0.9


def step_weight_bytes(params: Any, tie_word_embeddings: bool) -> int:
    """The weight bytes a forward step reads: every parameter but an untied embedding table, of which a
    step gathers only its own tokens' rows (floor_bytes counts those); a tied table is the LM head too,
    read whole. (Counting the untied table, as the results up to the twenty-first session did, put
    Llama-2-7B's floor 262 MB - 1.9% of its weights - too high.)"""
    import jax

    total = sum(x.nbytes for x in jax.tree.leaves(params))
    if tie_word_embeddings or not isinstance(params, dict) or "embed" not in params:
        return total
    return total - sum(x.nbytes for x in jax.tree.leaves(params["embed"]))


def embedding_row_bytes(config: Any, itemsize: int = 2) -> int:
    """The bytes a step reads per token beyond step_weight_bytes: its row of an untied embedding table;
    0 for a tied table, which step_weight_bytes counts whole as the LM head."""
    return 0 if config.tie_word_embeddings else config.hidden_size * itemsize


def batch_filled(mean_decode_rows: float | None, batch: int) -> bool:
    """Whether a decode run's timed steps ran the batch it asked for (tail steps aside)."""
    return mean_decode_rows is not None and mean_decode_rows >= FULL_BATCH_SHARE * batch


def run_record() -> dict[str, str]:
    """Where and how a result is being made: device, date, commit, command."""
    return {
        "device": device(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit(),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def write_result(name: str, payload: dict[str, Any], recorded: dict[str, str] | None = None) -> str:
    """Write payload under bench/results with its run record: this process's, or `recorded` (a run
    made elsewhere, e.g. a GPU run's partial file finished here)."""
    os.makedirs(RESULTS, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    record = {"name": name, **(recorded or run_record()), **payload}
    path = os.path.join(RESULTS, f"{name}-{now.strftime('%Y%m%dT%H%M%S')}.json")
    with open(path, "w") as f:
        f.write(result_json(record))
    return path


# a list of numbers that json.dumps spread over lines (a string's brackets hold no raw newline)
_NUMBER_LIST = re.compile(r"\[(\n\s*-?[\d.eE+-]+(?:,\n\s*-?[\d.eE+-]+)*\n\s*)\]")


def result_json(record: dict[str, Any]) -> str:
    """A result as indented JSON, with lists of numbers on one line each: a run's per-step columns
    (thousands of numbers) stay a few lines instead of one line a number."""
    text = json.dumps(record, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    return _NUMBER_LIST.sub(lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]", text)


def add_attention_tunables_argument(ap: Any) -> None:
    """--attention-tunables on an argparse parser: JSON fields of the decode attention kernel's tuned
    shapes to replace for the run, and --prefill-tunables likewise for the prefill kernel
    (override_attention_tunables applies both)."""
    ap.add_argument(
        "--attention-tunables",
        default=None,
        help="fields of the decode attention kernel's tuned shapes for page 16, head_dim 128 to replace, "
        'as JSON (AttentionTunables fields), e.g. {"split_keys": 512}',
    )
    ap.add_argument(
        "--prefill-tunables",
        default=None,
        help="fields of the prefill attention kernel's tuned shapes for page 16, head_dim 128 (every head "
        'group) to replace, as JSON (PrefillTunables fields), e.g. {"min_programs": 256}',
    )


def add_lora_fields_argument(ap: Any) -> None:
    """--lora-fields on an argparse parser: JSON fields of the LoRA kernels' tuned shapes to replace in
    every tier for head_dim 128 (override_lora_fields applies them)."""
    ap.add_argument(
        "--lora-fields",
        default=None,
        help='LoraTunables fields to replace in every tuned tier for head_dim 128, as JSON, e.g. {"chunk_units":32}',
    )


def override_lora_fields(fields_json: str | None) -> None:
    """The LoRA kernels' tuned tiers for head_dim 128 with the JSON's fields in place of theirs, before an
    engine traces its steps; None leaves them."""
    if not fields_json:
        return
    import dataclasses

    from pallas_kernels.lora import shapes

    fields = json.loads(fields_json)
    shapes.TUNED[128] = tuple((n, dataclasses.replace(t, **fields)) for n, t in shapes.TUNED[128])
    print("LoRA tunables:", shapes.TUNED[128], flush=True)


def lora_tiers_record() -> list:
    """The LoRA kernels' tiers for head_dim 128 as a run used them (tuned, or overridden), for its result
    file: [[up to this many tokens, LoraTunables fields], ...]."""
    import dataclasses

    from pallas_kernels.lora import shapes

    return [[n, dataclasses.asdict(t)] for n, t in shapes.TUNED.get(128, ())]


def add_step_form_arguments(ap: Any) -> None:
    """--rows-in-place, --materialize-norms and --command-buffer-scheduling on an argparse parser: how the
    engine forms its steps (EngineConfig.rows_in_place, materialize_norms, command_buffer_scheduling)."""
    ap.add_argument(
        "--rows-in-place",
        default="mixed",
        choices=("mixed", "all", "off"),
        help="steps whose kernels work on their batch's rows in place (EngineConfig.rows_in_place)",
    )
    ap.add_argument(
        "--materialize-norms",
        default="on",
        choices=("on", "off"),
        help="the scaled output of each norm feeding LoRA written once for the matmul and LoRA (EngineConfig.materialize_norms)",
    )
    ap.add_argument(
        "--command-buffer-scheduling",
        default="auto",
        choices=("auto", "concurrent", "serialize", "lhs"),
        help="how a GPU step's CUDA graph orders its kernels (EngineConfig.command_buffer_scheduling)",
    )


def override_attention_tunables(args: Any) -> None:
    """The attention kernels' tuned shapes for page 16, head_dim 128 with the fields of the run's
    --attention-tunables (decode, AttentionTunables) and --prefill-tunables (prefill, PrefillTunables,
    every head group) in place of theirs, before an engine traces its steps; a flag not given leaves
    its kernel's shapes as they are."""
    import dataclasses

    from pallas_kernels.paged_attention import kernel as attention_kernel
    from pallas_kernels.paged_attention import prefill_kernel

    if args.attention_tunables:
        tuned = attention_kernel.tunables_for(16, 128)
        attention_kernel.TUNED[(16, 128)] = dataclasses.replace(tuned, **json.loads(args.attention_tunables))
        print("attention tunables:", attention_kernel.TUNED[(16, 128)], flush=True)
    if args.prefill_tunables:
        for key, tuned in list(prefill_kernel.TUNED.items()):
            if key[:2] == (16, 128):
                prefill_kernel.TUNED[key] = dataclasses.replace(tuned, **json.loads(args.prefill_tunables))
        print("prefill tunables:", prefill_kernel.TUNED, flush=True)


def prefill_tunables_record() -> dict[str, Any]:
    """The prefill attention kernel's shapes for page 16, head_dim 128 by head group, as a run used them."""
    import dataclasses

    from pallas_kernels.paged_attention import prefill_kernel

    return {str(k[2]): dataclasses.asdict(v) for k, v in prefill_kernel.TUNED.items() if k[:2] == (16, 128)}


def attention_tunables_record() -> dict[str, Any]:
    """The decode attention kernel's shapes for page 16, head_dim 128 as a run used them (tuned, or
    overridden), for its result file."""
    import dataclasses

    from pallas_kernels.paged_attention import kernel as attention_kernel

    return dataclasses.asdict(attention_kernel.tunables_for(16, 128))
