"""The config sections after training: infer (batch inference and chat) and eval, and the services a run records to
and keeps its files in: tracking (MLflow), registry (with its promotion gate), versioning (DVC) and storage (S3, and
images read by URL). Each key is documented by the docstring under it."""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from vlmops.config.section import Section
from vlmops.redact import redact_uri, uri_login


def no_room_for_a_prompt(max_context: int, max_new_tokens: int) -> str | None:
    """Why requests of `max_context` tokens hold no prompt beside an answer of `max_new_tokens` (every record would
    be rejected, one by one), naming both keys and what to change; None where they leave room."""
    if max_new_tokens < max_context:
        return None
    return (
        f"infer.max_context {max_context} leaves no room for a prompt beside infer.max_new_tokens {max_new_tokens} "
        "(a request holds its prompt and its answer): every record would be rejected. Raise infer.max_context "
        "above infer.max_new_tokens by the longest prompt (an image is 576 prompt tokens), or unset it to size it "
        "to the job's prompts, or lower infer.max_new_tokens"
    )


class InferConfig(Section):
    max_new_tokens: int = Field(64, ge=1)
    """Longest generated answer, in tokens."""
    batch_size: int = Field(8, ge=1)
    """Prompts per generate call in batch inference."""
    temperature: float = Field(0.0, ge=0)
    """0: greedy decoding; above 0: sampling (both engines: the fast one on CUDA, vlmops.infer.sampling)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling threshold (temperature > 0): the fewest most likely tokens whose probabilities add up to
    this. 1: off."""
    top_k: int = Field(0, ge=0)
    """Sampling from the k most likely tokens only (temperature > 0). 0: off (transformers' `generate` would apply
    its default of 50 when unset; here it is off unless asked for)."""
    repetition_penalty: float = Field(1.0, gt=0)
    """Above 1 discourages repeating tokens (any token of the prompt or the answer so far), greedy or sampled."""
    seed: int = 0
    """Sampling (temperature > 0): the fast engine draws each record's tokens from a stream of this seed and the
    record's key, so rerunning a job, a resumed shard or another batching draws the same answers (in bf16, up to the
    rounding the batching changes). The plain engine seeds `generate` per batch from it."""
    workers: int | None = Field(None, ge=1)
    """Batch inference processes, one per GPU of this machine. null: every visible GPU (1 without CUDA)."""
    engine: Literal["auto", "plain", "fast"] = "auto"
    """Batch generation engine. plain: `model.generate` on fixed batches, any device; fast: CUDA (static KV cache,
    continuous batching); auto: fast on CUDA for a job of at least `fast_min_records` records to answer, else plain.
    Both take every setting of how tokens are picked (temperature, top_p, top_k, repetition_penalty)."""
    fast_min_records: int = Field(500, ge=0)
    """infer.engine auto: the fewest records a job (or a process's share of it) must have left to answer for the fast
    engine; below, plain `generate`, because the fast engine's compiling and capturing (25-100 s) costs more than it
    saves. Measured on an H200 (bench/RESULTS.md session 30), the whole command: 64 records 1.3b plain 18.8 s
    against fast 29.8 s (its compile cache filled) / 47.3 s (empty), 7b 26.8 against 45.1 / 105.8; 512 records 1.3b
    36.9 against 30.9 / 53.7, 7b 82.5 against 58.4 / 106.0; 1,024 records 1.3b 62.9 against 33.4 / 64.5 (session 31).
    The crossover: ~260-350 records with a filled compile cache, ~700-1,000 with an empty one. 0: the fast engine
    whatever the size."""
    max_batch: int = Field(512, ge=1)
    """Fast engine: prompts decoded at once (a finished one's slot is refilled at once from the waiting
    prompts); more is faster until the GPU's memory bandwidth is saturated. Capped by memory_gib: each slot holds
    max_context tokens of K/V (at 2,048: 1.3b 0.375 GiB, 7b 0.94 GiB; a job of one-image prompts sizes them to ~768),
    so a 7b's slots (and a 1.3b's on an 80 GB card) may be set by the memory, not by this.
    Measured on an H200 (1.3b, 768-token slots, bench/RESULTS.md sessions 25 and 26): `vlmops batch-infer` 152.3 and
    152.5 images/s once started with 512 against 149.4 and 148.6 with 256 (the default before; 146 against 138 with
    128 in session 23); the engine's call of B prompts 14.0k generated tokens/s at 256 and 14.9-15.3k at 768."""
    max_context: int | None = Field(None, ge=2)
    """Fast engine: prompt + answer tokens one slot holds. null: sized to the job (its plan counts every record's
    prompt tokens: the longest prompt + max_new_tokens, rounded up to 128, at most the model's
    max_position_embeddings), or 2048 outside a job. The K/V cache is slots x this, so short prompts get more slots
    from the same memory (an image is 576 prompt tokens; on an H200, a 7b job of one-image records ran at 41.7
    images/s once started with 1024 against 37.0 with 2048: bench/RESULTS.md session 24). Set it to cap the slots: a
    record that does not fit goes to the job's rejects with its token count, whichever engine answers it (the plain
    engine's own limit is the model's `max_position_embeddings`); set, it is part of the job's identity. To answer
    such a record, raise this and answer the job's rejects again into a new output folder (infer.retry_rejects).
    It must exceed max_new_tokens (the config is refused otherwise, before any model is downloaded), and a job
    none of whose prompts fits beside max_new_tokens is refused once its inputs are read, before the model's weights
    load: set, the plan counts every record's prompt tokens to check it (as it does to size the slots)."""

    @field_validator("max_context")
    @classmethod
    def _room_for_a_prompt(cls, value: int | None, info: ValidationInfo) -> int | None:
        answer = info.data.get("max_new_tokens")  # absent where it failed its own check
        if value is not None and answer is not None and (problem := no_room_for_a_prompt(value, answer)):
            raise ValueError(problem)
        return value

    memory_gib: float | None = Field(None, gt=0)
    """Fast engine: GPU memory (GiB) the model's weights and KV cache may use; it caps the slots (e.g. 75 keeps
    a 7b inside an 80 GB card). null: 90% of the GPU."""
    decode_window: int = Field(1, ge=1)
    """Fast engine: decode steps queued on the GPU before the host reads their tokens back (1: after every step,
    the GPU idling while the host does its bookkeeping). A row that stops inside a window keeps its slot until the
    window ends. Answers are the same for any value. Measured on an H200 (1.3b, batches of 32 and 256): a window of 8
    decoded no faster than 1, so the default stays 1."""
    column_bucket: int = Field(32, ge=1)
    """Fast engine: a decode step attends to the cache columns up to the next multiple of this past its rows'
    lengths, one CUDA graph per (rows, columns) bucket. Smaller reads fewer unused columns for more graphs (each
    captured once, at its first step). Measured on an H200 (bench/RESULTS.md sessions 19 and 24): 32 against 128 +2.8%
    (1.3b, 256 rows); 8 or 16 against 32 +0.5-0.8% in the engine's call of 768 prompts, not yet measured in a job."""
    lookahead: bool = True
    """Fast engine: launch each decoding window before reading the one before it back, so that the GPU has the next
    step queued while the host waits for the last one's tokens and does its bookkeeping. A row that stops is seen one
    window later (its slot decodes one more window of dropped tokens before it is refilled). Answers are the same
    either way; false reads each window before launching the next. Measured on an H200 (bench/RESULTS.md session
    24): a 1.3b job 145.8 images/s once started against 141.0, the engine's call of 768 prompts 14.8k generated
    tokens/s against 14.6k."""
    vision_graphs: bool = True
    """Fast engine: run the vision towers of each prefill batch from CUDA graphs, captured once per number of images
    (the eager towers are hundreds of small kernels launched from the thread that also drives decoding). The graphs
    keep the towers' working memory for the engine's life (the 7b's SAM: ~0.8 GiB per image of a prefill batch, within
    what the engine sets aside for prefill). Measured on an H200 (1.3b, bench/RESULTS.md session 9): `vlmops
    batch-infer` 91.3 steady images/s against 79.2 eagerly, the engine alone 9.3k against 8.4k tokens/s at batch 256.
    Answers are the same either way; false runs the towers eagerly."""
    sam_attention: Literal["folded", "sdpa", "flex"] = "folded"
    """Fast engine on CUDA, the 7b's SAM tower: folded, sdpa or flex, as `train.sam_attention` (where the choices and
    their measurements are described). The engine's own figure with folded is not measured yet; the tower alone ran
    1.77x faster (session 13). flex in the global layers was slower (34.5 against 28.2 ms per prompt, session 11).
    Answers are the same attention either way."""
    sam_compile: bool = True
    """Fast engine on CUDA with `sam_attention: folded`: the 7b's SAM tower through torch.compile, as
    `train.sam_compile` (the image count a dynamic size, so one compilation serves every prefill batch; ~20 s at the
    first prefill). false: the eager tower."""
    siglip_compile: bool = True
    """Fast engine on CUDA: the SigLIP tower (the 384 px tower of both models) through torch.compile, with the image
    count a dynamic size, fusing the layer norms, biases, GELU and residual adds around its matmuls; compiled at the
    first prefill (~10 s). Measured on an H200 (bench/RESULTS.md session 16): the 1.3b's prefill 4.31 against 4.63 ms
    a prompt, its whole call 7,272 against 6,974 tokens/s at batch 32 and 12,963 against 12,692 at 256; the 7b's 3,588
    against 3,522 at 128. Its fused kernels round as the eager tower's do (bf16: the trained tiny model's greedy
    answers equal `generate`'s on 192 of 192 positions). false: the eager tower."""
    prefill_graphs: bool = True
    """Fast engine: run the language model's half of each prefill (its layers over the prompt embeddings) from CUDA
    graphs, one per number of prompts and width, the widths padded up to multiples of 32 tokens. Eagerly, each
    layer's compiled functions and attention are launched from Python: a profiled 1.3b prefill of 16 prompts kept the
    GPU busy 72 of its 105 ms. Measured on an H200 (bench/RESULTS.md sessions 10 and 11): the 1.3b engine 11.1k
    against 10.2k tokens/s at batch 256 (the same at 32), `vlmops batch-infer` over 6,000 records 70.7 against 65.0
    images/s; the 7b the same speed, its memory-budget run +0.4 GiB (70.8 GiB reserved at `memory_gib` 75).
    Answers are the same either way; false prefills eagerly."""
    overlap_prefill: bool = False
    """Fast engine: run each prefill on a CUDA stream of its own while the rows already in their slots go on decoding
    on a high-priority stream (prefill is compute-bound, a decode step bandwidth-bound, so they can share the GPU);
    the prompts join the decoding batch when their prefill is done. Answers are the same either way (a CPU test runs
    the same interleaving, a GPU test the same schedule with and without the second stream). Measured slower on an
    H200 (bench/RESULTS.md session 12): the prefill's matmuls take the SMs the decode steps need, decoding ran at half
    speed beside them, and the 1.3b's whole call 6.2k / 9.8k tokens/s at batch 32 / 256 against 6.4k / 10.6k; so
    off. Again in session 16: 6.9k / 9.8k against 6.9k / 11.5k, also with 32 or 64 SMs left to decoding (torch's
    cuBLAS SM carve-out around each prefill: 6.0-6.3k / 9.1-9.9k)."""
    shard_size: int = Field(1000, ge=1)
    """Records per shard of a batch inference job: the unit written at once, resumed and handed to a worker.
    Part of the job's identity (a different size is a different job)."""
    max_shards: int | None = Field(None, ge=1)
    """Batch inference job: answer at most this many of the shards not yet done, then stop without the manifest (a
    trial run: read the first parts, then run the same command without it to go on; the job and its output are the
    same, so nothing answered is redone). null: every shard. Not part of the job's identity."""
    retry_rejects: str | None = None
    """Batch inference job: answer only the records the finished job in this output (a folder or s3:// prefix)
    rejected, read where they are in the same --input (after the images they lacked were added, or with a larger
    infer.max_context), into a new --output: a job of its own (the records chosen are part of its identity); its
    results carry the same keys as that job's would have."""
    on_error: Literal["skip", "fail"] = "skip"
    """A record that cannot be answered (malformed line, missing or unreadable image). skip: write it to
    rejects.jsonl with its file, line and reason and go on; fail: stop the job at the first one."""
    track: bool = False
    """Log each batch inference job to MLflow (tracking.uri): a run tagged with the model version, with the
    job's metrics and its manifest."""


class EvalConfig(Section):
    metric: Literal["exact_match"] = "exact_match"
    """How a prediction is scored against its reference answer (exact match, case, spacing and final punctuation
    aside: vlmops/answers.py)."""
    evaluate_base: bool = True
    """Also run the eval split through the base model, to report the gain."""


class TrackingConfig(Section):
    uri: str = "sqlite:///outputs/mlflow.db"
    """MLflow tracking URI: a SQLite file for one machine, http(s)://server for a team."""
    experiment: str = "vlmops"
    """MLflow experiment name."""


class PromotionConfig(Section):
    """The gate a challenger passes to become `champion` (the `promote` flow, `vlmops promote`)."""

    metric: Literal["accuracy"] = "accuracy"
    """What challenger and champion are compared on: the share of the evaluation set answered right, scored
    with `eval.metric`."""
    min_margin: float = Field(0.0, ge=0.0, le=1.0)
    """How much the challenger must beat the champion by (0.02: two points of accuracy) to replace it; 0: at
    least as good. Without a champion the first version is promoted whatever its score."""
    eval_file: str | None = None
    """The evaluation set both answer (.json/.jsonl, records ending with the reference answer). null: the
    eval split of the challenger's dataset snapshot (restored from the DVC remote when not on this machine)."""


class RegistryConfig(Section):
    model_name: str = "vlmops-demo"
    """Registered model name in the MLflow model registry."""
    alias: str = "challenger"
    """Alias given to the newly registered version (not `champion`: only the promotion gate moves that one)."""
    auto_promote: bool = False
    """After registering, run the promotion gate in the same retrain flow run (else `vlmops promote` or the
    `promote` deployment does it later)."""
    promotion: PromotionConfig = PromotionConfig()
    """The champion/challenger gate."""

    @field_validator("alias")
    @classmethod
    def _not_champion(cls, value: str) -> str:
        if value == "champion":
            raise ValueError(
                "champion is the alias the promotion gate moves; registering with it would make every new version "
                "the champion unchecked: use another alias (the default, challenger) and `vlmops promote` or "
                "registry.auto_promote: true"
            )
        return value


# DVC's http remote: the one remote whose login vlmops takes from the URL (vlmops.versioning gives it to DVC as the
# remote's `auth: basic`, `user` and `password`). The others read theirs elsewhere (S3: the AWS variables or config).
DVC_LOGIN_SCHEMES = ("http://", "https://")


def dvc_url_login_refused(remote_url: str) -> str | None:
    """Why the DVC remote URL `remote_url` may not hold a password (DVC's remote of its scheme reads none from the
    URL), the password masked; None if it may."""
    login = uri_login(remote_url)
    if login is None or login.uri.startswith(DVC_LOGIN_SCHEMES):
        return None
    scheme = login.uri.partition("://")[0]
    return (
        f"{redact_uri(remote_url)} holds a password, which DVC's {scheme} remote does not read from its URL: take the "
        "login out of the URL and give the remote its credentials as DVC takes them (S3: AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY in the environment). Only an http(s) remote's user and password may be in the URL"
    )


class VersioningConfig(Section):
    enabled: bool = True
    """Track the dataset snapshot and the merged model with DVC and push them to the remote."""
    repo: str | None = None
    """DVC repository root (created with `dvc init` when missing); it must contain run.output_dir.
    null: run.output_dir itself."""
    remote_name: str = "local"
    """Name of the DVC remote to push to."""
    remote_url: str | None = None
    """URL of that remote: a folder, s3://bucket/prefix (credentials from the AWS variables), or
    https://user:password@host/path (DVC's http remote; the password is given to DVC in the repository's
    .dvc/config.local, to a pull in memory only, and masked wherever the URL is recorded). null:
    `<run.output_dir>/dvc-remote`."""

    @field_validator("remote_url")
    @classmethod
    def _login(cls, value: str | None) -> str | None:
        if value is not None and (refused := dvc_url_login_refused(value)):
            raise ValueError(refused)
        return value


class StorageConfig(Section):
    endpoint_url: str | None = None
    """S3 endpoint (SeaweedFS, MinIO, ...). null: AWS, or the AWS_ENDPOINT_URL environment variable."""
    region: str | None = None
    """S3 region. null: boto3's default chain."""
    url_max_mib: float = Field(20.0, gt=0)
    """Largest image downloaded by http(s) URL, in MiB; a larger one is refused, not cut (a batch inference job's
    reject: another value than the default is part of the job's identity)."""
    url_timeout_s: float = Field(30.0, gt=0)
    """Time limit for one image download (each try, and the whole body)."""
    url_allow_networks: list[str] = []  # noqa: RUF012 (a pydantic field: copied per config)
    """Non-public networks that image URLs may reach, as addresses or CIDRs (e.g. "10.1.2.0/24"). By default
    an http(s) URL (or a redirect) that resolves to a loopback, private or link-local address is refused (a batch
    inference job's reject: set, this is part of the job's identity)."""

    @field_validator("url_allow_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for network in value:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(f"{network!r} is not an IP address or network (e.g. 10.0.0.0/8)") from None
        return value
